"""Dropless ragged all-to-all transport (TPU/GPU).

Assignments are sorted by global expert (so by destination device), exchanged with
`jax.lax.ragged_all_to_all` (variable-size chunks, no padding, nothing dropped), regrouped by local
expert for one grouped matmul, and sent back the same way.

XLA:CPU cannot compile `ragged_all_to_all`; on CPU (tests) `emulated_ragged_all_to_all` implements
the same contract with padded `all_to_all` + scatter, so the bookkeeping is tested everywhere and
the real primitive is used on accelerators.

The receive buffer is sized for the worst case (every assignment of the group to one device):
`n * T * k` rows. `buffer_factor < 1` shrinks it (rows past the buffer would be lost, so keep it 1
unless routing is known to be balanced).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ernie_jax.model.moe.dispatch import combine, gather_sorted, grouped_swiglu, sort_by_expert, unsort


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """Same semantics as `jax.lax.ragged_all_to_all` (output_offsets are offsets in the receiver's
  buffer), built from all_to_all of padded chunks."""
  del recv_sizes  # implied by the senders' send_sizes
  rows = operand.shape[0]
  n = input_offsets.shape[0]
  padded = jnp.concatenate([operand, jnp.zeros_like(operand)], axis=0)
  chunks = jax.vmap(lambda o: jax.lax.dynamic_slice_in_dim(padded, o, rows))(input_offsets)
  recv = jax.lax.all_to_all(chunks, axis_name, 0, 0)  # [source, rows, ...]
  sizes = jax.lax.all_to_all(send_sizes.reshape(n, 1), axis_name, 0, 0).reshape(n)
  offsets = jax.lax.all_to_all(output_offsets.reshape(n, 1), axis_name, 0, 0).reshape(n)
  i = jnp.arange(rows)
  dest = jnp.where(i[None] < sizes[:, None], offsets[:, None] + i[None], output.shape[0])
  return output.at[dest.reshape(-1)].set(recv.reshape((n * rows,) + operand.shape[1:]), mode="drop")


def _primitive():
  if jax.default_backend() == "cpu":
    return emulated_ragged_all_to_all
  return jax.lax.ragged_all_to_all


def ragged_transport(x, idx, weights, gate, up, down, *, axis: str, impl: str,
                     buffer_factor: float = 1.0, primitive=None, act=None, lora=None, **_):
  a2a = primitive or _primitive()
  t, h = x.shape
  k = idx.shape[1]
  n = jax.lax.axis_size(axis)
  me = jax.lax.axis_index(axis)
  e_local = gate.shape[0]
  order, group_sizes = sort_by_expert(idx, n * e_local)
  xs = gather_sorted(x, order, k)  # [N, H] grouped by destination device, then local expert
  counts = group_sizes.reshape(n, e_local)  # [dest, local expert]
  send_sizes = counts.sum(-1)
  input_offsets = jnp.cumsum(send_sizes) - send_sizes
  # Everyone's send sizes -> where my chunk lands in each receiver's buffer.
  all_sizes = jax.lax.all_gather(send_sizes, axis)  # [source, dest]
  output_offsets = (jnp.cumsum(all_sizes, axis=0) - all_sizes)[me]
  recv_counts = jax.lax.all_to_all(counts, axis, 0, 0)  # [source, local expert]
  recv_sizes = recv_counts.sum(-1)
  cap = max(1, int(n * t * k * buffer_factor))
  recv = a2a(xs, jnp.zeros((cap, h), x.dtype), input_offsets, send_sizes, output_offsets,
             recv_sizes, axis_name=axis)
  # Received rows are grouped by (source, local expert): regroup by local expert.
  seg = jnp.repeat(jnp.arange(n * e_local) % e_local, recv_counts.reshape(-1), total_repeat_length=cap)
  seg = jnp.where(jnp.arange(cap) < recv_sizes.sum(), seg, e_local)
  perm = jnp.argsort(seg, stable=True)
  ys = grouped_swiglu(gather_sorted(recv, perm, 1), recv_counts.sum(0), gate, up, down, impl, act, lora)
  ys = unsort(ys, perm)  # back to (source, local expert) order (both permutations: gathers both ways)
  # Return to the senders: chunk for source s goes to its buffer at s's input offset for me.
  recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
  all_inputs = jax.lax.all_gather(input_offsets, axis)  # [source, dest]
  back = a2a(ys, jnp.zeros_like(xs), recv_offsets, recv_sizes, all_inputs[:, me], send_sizes,
             axis_name=axis)
  return combine(checkpoint_name(back, "moe_expert_out"), order, weights).astype(x.dtype), jnp.zeros((), jnp.int32)
