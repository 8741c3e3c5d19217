"""Training losses of ERNIE 4.5 VL (spec §4.1, §3.3, §3.4).

* Router losses per modality: the text router's aux (load-balance) and z losses over the text
  tokens only, the vision router's over the vision tokens only (each normalised by its own token
  count), orthogonal losses of both router weights; summed over MoE layers and modalities.
* Token-balanced LM loss: the gradient is that of sum_t ce_t * mask_t / token_balance_seqlen (a
  constant, e.g. batch x seq), the reported value the usual masked mean
  (`loss = l_tb - stop_gradient(l_tb) + stop_gradient(mean)`, PF `ErniePretrainingCriterion`).
* Only text-typed targets get the LM loss (`text_target_mask`).
* Aux-loss-free balancing: per-modality expert usage and the sign update of each correction-bias row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ernie_jax.model.moe.router import VLRouterOutput
from ernie_jax.train import moe_losses


def modality_masks(vision_mask, mask=None):
  """(text [T], vision [T]) float masks over the flattened tokens; `mask` [B, S] drops padding."""
  v = vision_mask.reshape(-1).astype(jnp.float32)
  m = jnp.ones_like(v) if mask is None else mask.reshape(-1).astype(jnp.float32)
  return (1.0 - v) * m, v * m


def by_modality(router: VLRouterOutput, vision_mask, mask=None):
  """(("text", text RouterOutput, text token mask [T]), ("vision", ..., vision token mask [T]))."""
  text, vision = modality_masks(vision_mask, mask)
  return (("text", router.text, text), ("vision", router.vision, vision))


def load_balance_loss(router: VLRouterOutput, vision_mask, mask=None) -> jax.Array:
  text, vision = modality_masks(vision_mask, mask)
  return moe_losses.load_balance_loss(router.text, text) + moe_losses.load_balance_loss(router.vision, vision)


def z_loss(router: VLRouterOutput, vision_mask, mask=None) -> jax.Array:
  text, vision = modality_masks(vision_mask, mask)
  return moe_losses.z_loss(router.text, text) + moe_losses.z_loss(router.vision, vision)


def router_kernels(model) -> tuple[jax.Array, jax.Array]:
  """(text, vision) router weights of all MoE layers in layer order, each [L, H, E]."""
  return tuple(moe_losses.router_values(model, "kernel", r)
               for r in ("text_router", "vision_router"))


def orthogonal_loss(model) -> jax.Array:
  text, vision = router_kernels(model)
  return moe_losses.orthogonal_loss(text) + moe_losses.orthogonal_loss(vision)


# --------------------------------------------------------------------------------------------------
def text_target_mask(targets, config) -> jax.Array:
  """True where the target is a text token: image / video placeholders and their start / end tokens
  are vision-typed (PF token-type mapping) and get no LM loss."""
  return ~jnp.isin(targets, jnp.asarray(config.vision_token_ids, targets.dtype))


def token_balanced_lm_loss(logits, targets, loss_mask, token_balance_seqlen: float, count=None) -> jax.Array:
  """Value: masked mean NLL. Gradient: that of sum(NLL * mask) / token_balance_seqlen.
  count: the value's denominator (default: this mask's sum; under gradient accumulation, the
  whole batch's count, so that the micro-batches' values add up to the batch mean)."""
  m = loss_mask.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return token_balanced(jnp.sum(nll * m), m, token_balance_seqlen, count)


def token_balanced(total, loss_mask, token_balance_seqlen: float, count=None) -> jax.Array:
  """`token_balanced_lm_loss` from total = sum(NLL * mask) (e.g. `losses.head_nll_sum`)."""
  balanced = total / token_balance_seqlen
  mean = total / (jnp.maximum(loss_mask.astype(jnp.float32).sum(), 1.0) if count is None else count)
  return balanced - jax.lax.stop_gradient(balanced) + jax.lax.stop_gradient(mean)


# --------------------------------------------------------------------------------------------------
def expert_usage(router: VLRouterOutput, vision_mask, mask=None) -> jax.Array:
  """[L, 2, E]: tokens each expert received per MoE layer (row 0 text, row 1 vision), from the
  actual (bias-influenced) selection."""
  text, vision = modality_masks(vision_mask, mask)
  return jnp.stack([moe_losses.expert_usage(router.text, text),
                    moe_losses.expert_usage(router.vision, vision)], axis=1)


def update_correction_bias(model, usage: jax.Array, lr: float, *, text: bool = True, vision: bool = True) -> None:
  """bias_m += lr * sign(mean_e(usage_m) - usage_m) for each modality row m (in place).
  text=False keeps the text row fixed (e.g. a frozen text router)."""
  if not model.config.moe_use_correction_bias:
    return
  step = lr * jnp.sign(usage.mean(-1, keepdims=True) - usage)  # [L, 2, E]
  for m, (name, on) in enumerate((("text_router", text), ("vision_router", vision))):
    if on:
      moe_losses.apply_bias_step(model, step[:, m], name)
