"""Language-model and multi-token-prediction losses on packed batches.

A packed batch holds, per row of S positions: `inputs` (token ids), `targets` (the next token of
the same document), `segment_ids` (document number in the row, 0 = padding), `positions` (position
inside the document) and `loss_mask` (1 where `targets` is a real next token of the same document).

Losses are returned as (sum, count) pairs so gradient accumulation can normalise by the token
count of the whole batch, which makes N micro-batches exactly equal to one N-times larger batch.

`LossConfig` holds the coefficients of the pretraining objectives (the `loss` section of the training
config); the tasks of `ernie_jax.train.tasks` own one each.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from ernie_jax.model.lm import head_parts, lm_logits
from ernie_jax.train import linear_ce


@dataclasses.dataclass(frozen=True)
class LossConfig:
  mtp_weight: float = 0.1  # weight of the mean MTP loss over depths (spec §3.5: 0.1)
  moe_aux_coef: float = 1e-2  # load-balance loss coefficient (PaddleFormers default 1e-2)
  moe_z_coef: float = 1e-4  # router z-loss coefficient
  moe_orth_coef: float = 0.0  # router orthogonality loss coefficient
  bias_update_lr: float = 1e-3  # aux-loss-free correction-bias step size; 0 freezes the bias
  lm_chunk: int = 0  # positions per chunk of the fused LM head + cross-entropy (`linear_ce`); 0: whole fp32 logits


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-position negative log-likelihood in fp32: logits [B, S, V], targets [B, S] -> [B, S]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def lm_loss_sum(logits, targets, loss_mask) -> tuple[jax.Array, jax.Array]:
  """(sum of NLL over masked positions, number of masked positions)."""
  m = loss_mask.astype(jnp.float32)
  return jnp.sum(token_nll(logits, targets) * m), jnp.sum(m)


def head_nll_sum(model, hidden, targets, weights, chunk: int = 0) -> jax.Array:
  """sum over positions of weights * NLL of the model's final norm + LM head on `hidden` ([B, S, H], the last
  decoder layer's output: `CausalLMOutput.hidden`). chunk > 0: fused with the head a chunk of positions at a
  time (`linear_ce`, no [B, S, V] logits); 0: from the whole fp32 logits."""
  if chunk:
    y, w, vocab_major = head_parts(model, hidden)
    return linear_ce.nll_sum(y, w, targets, weights, chunk=chunk, vocab_major=vocab_major, rules=model.sharding_rules)
  return jnp.sum(token_nll(lm_logits(model, hidden), targets) * weights.astype(jnp.float32))


def head_token_nll(model, hidden, targets, chunk: int = 0) -> jax.Array:
  """Per-position NLL [B, S] fp32 of the final norm + LM head on `hidden` (chunk: see `head_nll_sum`; here its
  backward computes each chunk's logits again, `linear_ce.token_nll`)."""
  if chunk:
    y, w, vocab_major = head_parts(model, hidden)
    return linear_ce.token_nll(y, w, targets, chunk=chunk, vocab_major=vocab_major, rules=model.sharding_rules)
  return token_nll(lm_logits(model, hidden), targets)


def head_loss_sum(model, hidden, targets, loss_mask, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """`lm_loss_sum` of the LM head on `hidden` (see `head_nll_sum`)."""
  m = loss_mask.astype(jnp.float32)
  return head_nll_sum(model, hidden, targets, m, chunk), jnp.sum(m)


def _shift_left(x: jax.Array, n: int, fill) -> jax.Array:
  """x[:, t + n] at position t; `fill` past the end."""
  pad = jnp.full((x.shape[0], n) + x.shape[2:], fill, x.dtype)
  return jnp.concatenate([x[:, n:], pad], axis=1)


def mtp_targets(targets, segment_ids, loss_mask, depth: int) -> tuple[jax.Array, jax.Array]:
  """Targets and mask of MTP depth `depth` (0-based).

  Position t of depth d predicts input token t+d+2, i.e. `targets[t+d+1]`. It counts only when
  t+d+1 is inside the row, belongs to the same document as t (no MTP contribution across document
  boundaries of packed rows, spec §3.5) and is itself a real target.
  """
  n = depth + 1
  tgt = _shift_left(targets, n, 0)
  same_doc = _shift_left(segment_ids, n, -1) == segment_ids
  mask = (loss_mask > 0) & (_shift_left(loss_mask, n, 0) > 0) & same_doc
  return tgt, mask


def mtp_loss_sums(model, mtp_hidden: list[jax.Array], targets, segment_ids, loss_mask, chunk: int = 0):
  """Per depth: (sums [D], counts [D]) of the LM head on each MTP depth's hidden state
  (`ErnieForCausalLM.mtp_hidden`; chunk: see `head_nll_sum`)."""
  sums, counts = [], []
  for d, h in enumerate(mtp_hidden):
    tgt, mask = mtp_targets(targets, segment_ids, loss_mask, d)
    s, c = head_loss_sum(model, h, tgt, mask, chunk)
    sums.append(s)
    counts.append(c)
  return jnp.stack(sums), jnp.stack(counts)
