"""Routed-expert computation: tokens sorted by expert -> grouped matmul -> unsorted and combined.

Three implementations of the same function `y[t] = sum_j w[t,j] * Expert_{idx[t,j]}(x[t])`:
* `ragged_dot`: `jax.lax.ragged_dot` grouped matmuls (the fast path on TPU/GPU; on XLA:CPU it
  lowers to a dense masked matmul over all experts, about E times the needed work);
* `blocked`: each expert's group is padded to a multiple of a row block and a `lax.map` over blocks
  multiplies each block by its expert's weights (efficient on CPU; waste <= E blocks);
* `loop`: every expert applied to every token, masked by the routing weights (the test oracle).
All are dropless and differentiable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _silu_gate(a: jax.Array, b: jax.Array) -> jax.Array:
  return jax.nn.silu(a) * b


def experts_loop(x, gate, up, down, idx, weights):
  """Oracle. x [T,H]; gate/up [E,H,I]; down [E,I,H]; idx/weights [T,k]."""
  num_experts = gate.shape[0]
  y = jnp.zeros(x.shape, jnp.float32)
  for e in range(num_experts):
    w_e = jnp.sum(jnp.where(idx == e, weights, 0), axis=-1)  # [T]
    h = _silu_gate(x @ gate[e], x @ up[e]) @ down[e]
    y = y + (w_e[:, None] * h).astype(jnp.float32)
  return y.astype(x.dtype)


def _sort_by_expert(idx: jax.Array, num_experts: int):
  """Flatten the (token, slot) assignments and order them by expert (stable)."""
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  token_of = order // idx.shape[1]
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return order, token_of, group_sizes


def _combine(out_sorted, order, weights):
  """Undo the sort and sum each token's k expert outputs with its routing weights."""
  t, k = weights.shape
  inverse = jnp.argsort(order)
  out = out_sorted[inverse].reshape(t, k, -1)
  return jnp.einsum("tkh,tk->th", out, weights.astype(out.dtype))


def gmm_ragged(xs, w, group_sizes):
  return jax.lax.ragged_dot(xs, w, group_sizes)


def _block_size(rows: int, num_experts: int) -> int:
  per_expert = max(1, rows // num_experts)
  b = 8
  while b < per_expert and b < 128:
    b *= 2
  return b


def _blocked_layout(group_sizes: jax.Array, rows: int, block: int):
  """Destination row of each sorted row in the block-padded buffer, and each block's expert."""
  num_experts = group_sizes.shape[0]
  num_blocks = -(-rows // block) + num_experts
  padded = (group_sizes + block - 1) // block * block
  padded_end = jnp.cumsum(padded)
  padded_start = padded_end - padded
  start = jnp.cumsum(group_sizes) - group_sizes
  expert_of_row = jnp.repeat(jnp.arange(num_experts), group_sizes, total_repeat_length=rows)
  dest = padded_start[expert_of_row] + jnp.arange(rows) - start[expert_of_row]
  block_expert = jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right")
  return dest, jnp.minimum(block_expert, num_experts - 1), num_blocks


def experts_sorted(x, gate, up, down, idx, weights, impl: str = "ragged_dot"):
  """Dropless sorted dispatch. Same signature and result as `experts_loop`."""
  if impl == "blocked":
    return _experts_blocked(x, gate, up, down, idx, weights)
  if impl != "ragged_dot":
    raise ValueError(f"unknown grouped-matmul implementation {impl!r}")
  num_experts = gate.shape[0]
  order, token_of, group_sizes = _sort_by_expert(idx, num_experts)
  xs = x[token_of]  # [T*k, H], grouped by expert
  h = _silu_gate(gmm_ragged(xs, gate, group_sizes), gmm_ragged(xs, up, group_sizes))
  out = gmm_ragged(h, down, group_sizes)
  return _combine(out, order, weights).astype(x.dtype)


def _experts_blocked(x, gate, up, down, idx, weights):
  """Block-padded grouped matmul: gather tokens straight into expert-aligned blocks of rows, run
  one small matmul chain per block (`lax.map`), gather each (token, slot) result back."""
  num_experts = gate.shape[0]
  t, k = idx.shape
  order, token_of, group_sizes = _sort_by_expert(idx, num_experts)
  rows = t * k
  block = _block_size(rows, num_experts)
  dest, block_expert, num_blocks = _blocked_layout(group_sizes, rows, block)
  # padded slot -> source token (t = the zero row for padding); (token, slot) pair -> padded slot
  src = jnp.full((num_blocks * block,), t, jnp.int32).at[dest].set(token_of.astype(jnp.int32))
  pos = jnp.zeros((rows,), jnp.int32).at[order].set(dest.astype(jnp.int32))
  x_pad = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)], axis=0)
  buf = x_pad[src].reshape(num_blocks, block, -1)

  def one_block(args):
    xb, e = args
    return _silu_gate(xb @ gate[e], xb @ up[e]) @ down[e]

  out = jax.lax.map(one_block, (buf, block_expert)).reshape(num_blocks * block, -1)
  out = out[pos].reshape(t, k, -1)
  return jnp.einsum("tkh,tk->th", out, weights.astype(out.dtype)).astype(x.dtype)


def resolve_impl(impl: str) -> str:
  """'auto' picks ragged_dot on TPU/GPU and the blocked form on CPU."""
  if impl != "auto":
    return impl
  return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"


def routed_experts(x, gate, up, down, idx, weights, impl: str = "auto"):
  impl = resolve_impl(impl)
  if impl == "loop":
    return experts_loop(x, gate, up, down, idx, weights)
  return experts_sorted(x, gate, up, down, idx, weights, impl)
