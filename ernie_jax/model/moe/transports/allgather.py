"""All-gather / reduce-scatter transport (dropless): every device sees all tokens of its expert
group, computes the assignments that hit its own experts, and the partial outputs are summed and
scattered back. Communication grows with the group size; good for small expert counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ernie_jax.model.moe.dispatch import combine, gather_sorted, grouped_swiglu, sort_by_expert


def allgather_transport(x, idx, weights, gate, up, down, *, axis: str, impl: str, act=None, lora=None, **_):
  e_local = gate.shape[0]
  me = jax.lax.axis_index(axis)
  xa = jax.lax.all_gather(x, axis, tiled=True)  # [n*T, H]
  ia = jax.lax.all_gather(idx, axis, tiled=True)
  wa = jax.lax.all_gather(weights, axis, tiled=True)
  local = ia - me * e_local
  mine = (local >= 0) & (local < e_local)
  local = jnp.where(mine, local, e_local)  # everything else -> group e_local, sorted last, not computed
  order, group_sizes = sort_by_expert(local, e_local + 1)
  out = grouped_swiglu(gather_sorted(xa, order, local.shape[1]), group_sizes[:e_local], gate, up, down, impl, act,
                       lora)
  y = combine(checkpoint_name(out, "moe_expert_out"), order, jnp.where(mine, wa, 0)).astype(x.dtype)
  return jax.lax.psum_scatter(y, axis, scatter_dimension=0, tiled=True), jnp.zeros((), jnp.int32)
