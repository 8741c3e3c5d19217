"""Capacity-padded all-to-all: runs on every backend (incl. XLA:CPU).

Drop rule (documented, tested): on each source device, assignments (token t, slot j) are visited
in token-major order (t, then j); each expert keeps the first C of them, C = capacity. Dropped
assignments get weight 0 and the kept weights of that token are renormalised (ERNIE renormalises
after dispatch; sum clamped at norm_min). Shared experts and the residual still apply to every token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ernie_jax.model import lora_ops
from ernie_jax.model.moe.dispatch import silu_gate


def capacity(tokens: int, k: int, num_experts: int, factor: float) -> int:
  if factor <= 0:
    return tokens  # a token picks an expert at most once: nothing can be dropped
  return max(1, min(tokens, math.ceil(factor * tokens * k / num_experts)))


def dispatch_ranks(idx: jax.Array, num_experts: int):
  """Rank of each assignment among those to the same expert, in token-major order."""
  flat = idx.reshape(-1)
  onehot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)
  return jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - 1, flat[:, None], axis=1)[:, 0]


def renormalise_kept(weights, keep, norm_min: float):
  w = jnp.where(keep, weights, 0)
  return w / jnp.maximum(w.sum(-1, keepdims=True), norm_min)


def _proj(x, w, lora, eq, eq_a, eq_b):
  y = jnp.einsum(eq, x, w)
  return y if lora is None else y + lora_ops.einsum_delta(x, lora, eq_a, eq_b).astype(y.dtype)


def all_to_all_transport(x, idx, weights, gate, up, down, *, axis: str, impl: str,
                         capacity_factor: float = 2.0, norm_min: float = 1e-12, act=None, lora=None):
  del impl  # capacity-padded buffers are dense: a batched matmul per local expert
  t, h = x.shape
  k = idx.shape[1]
  n = jax.lax.axis_size(axis)
  e_local = gate.shape[0]
  num_experts = n * e_local
  c = capacity(t, k, num_experts, capacity_factor)
  flat = idx.reshape(-1)
  rank = dispatch_ranks(idx, num_experts)
  keep = rank < c
  slot = jnp.where(keep, flat * c + rank, num_experts * c)  # overflow -> a discarded row
  token = jnp.arange(t * k) // k
  send = jnp.zeros((num_experts * c + 1, h), x.dtype).at[slot].set(x[token])[:-1]
  # [dest device, local expert, slot] -> exchange -> [source device, local expert, slot]
  recv = jax.lax.all_to_all(send.reshape(n, e_local * c, h), axis, 0, 0)
  xe = recv.reshape(n, e_local, c, h).transpose(1, 0, 2, 3).reshape(e_local, n * c, h)
  d = x.dtype
  lg, lu, ld = lora or (None, None, None)
  in_eqs, out_eqs = ("ech,ehi->eci", "ech,ehr->ecr", "ecr,eri->eci"), ("eci,eih->ech", "eci,eir->ecr", "ecr,erh->ech")
  a, b = (checkpoint_name(_proj(xe, w.astype(d), l, *in_eqs), "moe_gate_up") for w, l in ((gate, lg), (up, lu)))
  he = silu_gate(a, b, act)
  ye = _proj(he, down.astype(d), ld, *out_eqs)
  back = ye.reshape(e_local, n, c, h).transpose(1, 0, 2, 3).reshape(n, e_local * c, h)
  out = jax.lax.all_to_all(back, axis, 0, 0).reshape(num_experts * c, h)
  out = checkpoint_name(jnp.concatenate([out, jnp.zeros((1, h), out.dtype)])[slot].reshape(t, k, h), "moe_expert_out")
  keep = keep.reshape(t, k)
  w = renormalise_kept(weights, keep, norm_min)
  y = jnp.einsum("tkh,tk->th", out, w.astype(out.dtype))
  return y, jnp.sum(~keep).astype(jnp.int32)
