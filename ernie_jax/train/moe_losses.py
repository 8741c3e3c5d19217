"""ERNIE MoE auxiliary losses and the aux-loss-free correction-bias update (spec §3.3, §3.4).

All functions take the model's `RouterOutput`, stacked over MoE layers ([L, T, ...]), and an optional
token mask [T] (1 = real token); losses are summed over MoE layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ernie_jax.model.decoder import layer_groups
from ernie_jax.model.moe.router import RouterOutput


def _mask(router: RouterOutput, mask):
  t = router.probs.shape[1]
  return jnp.ones((t,), jnp.float32) if mask is None else mask.reshape(t).astype(jnp.float32)


def load_balance_loss(router: RouterOutput, mask=None) -> jax.Array:
  """L_aux = E * sum_e me_e * ce_e per layer, summed over layers.

  me_e: mean router probability of expert e; ce_e: fraction of tokens whose UNBIASED top-k contains
  e (detached). Means are over the (masked) tokens.
  """
  m = _mask(router, mask)
  n = jnp.maximum(m.sum(), 1.0)
  num_experts, k = router.probs.shape[-1], router.indices.shape[-1]
  me = jnp.einsum("lte,t->le", router.probs, m) / n
  top = jax.lax.top_k(jax.lax.stop_gradient(router.probs), k)[1]  # without the correction bias
  hits = jax.nn.one_hot(top, num_experts, dtype=jnp.float32).sum(-2)  # [L, T, E]
  ce = jax.lax.stop_gradient(jnp.einsum("lte,t->le", hits, m) / n)
  return jnp.sum(num_experts * jnp.sum(me * ce, axis=-1))


def z_loss(router: RouterOutput, mask=None) -> jax.Array:
  """L_z = masked mean over tokens of logsumexp(router logits)^2, summed over layers."""
  m = _mask(router, mask)
  lse = jax.nn.logsumexp(router.logits, axis=-1)  # [L, T]
  return jnp.sum(jnp.einsum("lt,t->l", lse ** 2, m) / jnp.maximum(m.sum(), 1.0))


def orthogonal_loss(kernels: jax.Array) -> jax.Array:
  """Router orthogonality: W as [E, H] rows normalised, mean((W W^T - I)^2), summed over layers.

  kernels: router weights in our layout [L, H, E].
  """
  w = jnp.swapaxes(kernels.astype(jnp.float32), -1, -2)  # [L, E, H]
  w = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
  gram = jnp.einsum("leh,lfh->lef", w, w) - jnp.eye(w.shape[1])
  return jnp.sum(jnp.mean(gram ** 2, axis=(-1, -2)))


def expert_usage(router: RouterOutput, mask=None) -> jax.Array:
  """Tokens dispatched to each expert per MoE layer ([L, E] float), from the actual (biased) choice.

  Under jit with a data-sharded batch this sum is global, i.e. already all-reduced over replicas.
  """
  m = _mask(router, mask)
  num_experts = router.probs.shape[-1]
  hits = jax.nn.one_hot(router.indices, num_experts, dtype=jnp.float32).sum(-2)
  return jnp.einsum("lte,t->le", hits, m)


def router_kernels(model) -> jax.Array:
  """Router weights of all MoE layers in layer order, [L, H, E]."""
  return router_values(model, "kernel")


def router_values(model, name: str, router: str = "router") -> jax.Array:
  """Variable `name` of each MoE layer's `router` submodule, stacked in layer order [L_moe, ...]."""
  parts = []
  for g, positions, _, _ in moe_layers(model):
    stacked = jnp.stack([getattr(getattr(g.blocks.layers[j].mlp, router), name)[...] for j in positions],
                        axis=1)  # [R, P, ...]
    parts.append(stacked.reshape((-1,) + stacked.shape[2:]))
  return jnp.concatenate(parts, axis=0)


def moe_layers(model):
  """For each scanned group holding MoE layers: (group, positions of the MoE layers in its unit,
  repeats, the slice of a layer-ordered [L_moe, ...] array that covers the group)."""
  offset = 0
  for g, (unit, reps) in zip(model.groups, layer_groups(model.config.layer_kinds)):
    positions = [j for j, k in enumerate(unit) if k == "moe"]
    if positions:
      n = reps * len(positions)
      yield g, positions, reps, slice(offset, offset + n)
      offset += n


def apply_bias_step(model, step: jax.Array, router: str = "router") -> None:
  """Add a layer-ordered [L_moe, E] step to the correction bias of each MoE layer's `router`."""
  for g, positions, reps, rows in moe_layers(model):
    s = step[rows].reshape(reps, len(positions), -1)
    for p, j in enumerate(positions):
      var = getattr(g.blocks.layers[j].mlp, router).correction_bias
      var[...] = var[...] + s[:, p]


def update_correction_bias(model, usage: jax.Array, lr: float) -> None:
  """bias += lr * sign(mean_e(usage) - usage), per MoE layer (in place on the model's Buffers).

  Under-used experts get a larger bias and are picked more often. Gradients are not involved.
  """
  if model.config.moe_use_correction_bias:
    apply_bias_step(model, lr * jnp.sign(usage.mean(-1, keepdims=True) - usage))
