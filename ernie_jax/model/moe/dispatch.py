"""Routed-expert computation: tokens sorted by expert -> grouped matmul -> unsorted and combined.

Three implementations of the same function `y[t] = sum_j w[t,j] * Expert_{idx[t,j]}(x[t])`:
* `ragged_dot`: `jax.lax.ragged_dot` grouped matmuls (the fast path on TPU/GPU; on XLA:CPU it
  lowers to a dense masked matmul over all experts, about E times the needed work);
* `blocked`: each expert's group is padded to a multiple of a row block and a `lax.map` over blocks
  multiplies each block by its expert's weights (efficient on CPU; waste <= E blocks);
* `loop`: every expert applied to every token, masked by the routing weights (the test oracle).
All are dropless and differentiable.

`sort_by_expert`, `grouped_swiglu`, `combine` and `silu_gate` are the building blocks the
expert-parallel transports (`ernie_jax.model.moe.transports`) share. `mask_assignments` restricts an
expert set to some tokens (the VL modalities): the others get an out-of-range expert id, so the sort
puts them after the last group and the grouped matmul never computes them.

LoRA on the routed experts (`lora`: an `ExpertLora` of per-expert A [E, H, r] / B [E, r, I]) adds
`scale * ((x A_e) B_e)` to each projection inside the same grouping (`lora_ops`); `lora=None` runs
exactly the code without LoRA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ernie_jax.model import lora_ops
from ernie_jax.model.lora_ops import ExpertLora


def silu_gate(a: jax.Array, b: jax.Array, act=None) -> jax.Array:
  """The SwiGLU intermediate silu(a) * b; `act` (e.g. an FP8 quantiser) is applied to it before the
  down projection."""
  h = jax.nn.silu(a) * b
  return h if act is None else act(h)


def _loop_proj(x, w, lora, e):
  y = x @ w[e]
  return y if lora is None else y + lora_ops.expert_delta(x, lora, e)


def experts_loop(x, gate, up, down, idx, weights, act=None, lora: ExpertLora | None = None):
  """Oracle. x [T,H]; gate/up [E,H,I]; down [E,I,H]; idx/weights [T,k].

  `act` sees the whole intermediate at once (rows of unrouted tokens are zero)."""
  lg, lu, ld = lora or (None, None, None)
  num_experts = gate.shape[0]
  routed = jnp.stack([jnp.any(idx == e, axis=-1) for e in range(num_experts)])  # [E, T]
  h = jnp.stack([silu_gate(_loop_proj(x, gate, lg, e), _loop_proj(x, up, lu, e)) for e in range(num_experts)])
  h = jnp.where(routed[..., None], h, 0)  # [E, T, I]
  if act is not None:
    h = act(h)
  y = jnp.zeros(x.shape, jnp.float32)
  for e in range(num_experts):
    w_e = jnp.sum(jnp.where(idx == e, weights, 0), axis=-1)  # [T]
    y = y + (w_e[:, None] * _loop_proj(h[e], down, ld, e)).astype(jnp.float32)
  return y.astype(x.dtype)


def sort_by_expert(idx: jax.Array, num_experts: int):
  """Flatten the (token, slot) assignments and order them by expert (stable)."""
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  token_of = order // idx.shape[1]
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return order, token_of, group_sizes


def combine(out_sorted, order, weights):
  """Undo the sort and sum each token's k expert outputs with its routing weights."""
  t, k = weights.shape
  inverse = jnp.argsort(order)
  out = out_sorted[inverse].reshape(t, k, -1)
  return jnp.einsum("tkh,tk->th", out, weights.astype(out.dtype))


def _block_size(rows: int, num_groups: int) -> int:
  per_group = max(1, rows // num_groups)
  b = 8
  while b < per_group and b < 128:
    b *= 2
  return b


def _blocked_layout(group_sizes: jax.Array, rows: int, block: int):
  """Destination row of each sorted row in the block-padded buffer (out of range for rows past the
  last group), and each block's group."""
  num_groups = group_sizes.shape[0]
  num_blocks = -(-rows // block) + num_groups
  padded = (group_sizes + block - 1) // block * block
  padded_end = jnp.cumsum(padded)
  padded_start = padded_end - padded
  end = jnp.cumsum(group_sizes)
  row = jnp.arange(rows)
  group_of_row = jnp.searchsorted(end, row, side="right")
  valid = group_of_row < num_groups
  g = jnp.minimum(group_of_row, num_groups - 1)
  dest = jnp.where(valid, padded_start[g] + row - (end[g] - group_sizes[g]), num_blocks * block)
  block_group = jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right")
  return dest, jnp.minimum(block_group, num_groups - 1), num_blocks


@jax.custom_vjp
def block_matmul(blocks: jax.Array, w: jax.Array, block_group: jax.Array) -> jax.Array:
  """blocks [N, b, in] @ w[block_group[n]] ([G, in, out]) -> [N, b, out], one block at a time. Its own
  backward accumulates each group's weight gradient in place (autodiff of the indexed weight would add a
  zero-filled [G, in, out] per block: ~15% of a projection's backward on CPU)."""
  return jax.lax.map(lambda a: a[0] @ w[a[1]], (blocks, block_group))


def _block_matmul_fwd(blocks, w, block_group):
  return block_matmul(blocks, w, block_group), (blocks, w, block_group)


def _block_matmul_bwd(res, dout):
  blocks, w, block_group = res
  dblocks = jax.lax.map(lambda a: (a[0] @ w[a[1]].T).astype(blocks.dtype), (dout, block_group))
  return dblocks, _add_block_grads(blocks, dout, block_group, w), None


block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def _vma(x) -> frozenset:
  """The manual mesh axes `x` varies over inside a shard_map (empty outside one): `aval.mat.varying` in
  jax >= 0.10, `aval.vma` before."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  return frozenset(mat.varying if mat is not None else (getattr(aval, "vma", ()) or ()))


def _add_block_grads(blocks, d, block_group, w):
  """Each group's weight gradient sum_n blocks[n].T @ d[n] over its blocks, accumulated in place. Inside a
  shard_map the blocks may vary over more mesh axes than `w` (tokens split over data, weights over experts):
  the accumulator varies like them, and the sum over those extra axes is the weight's gradient (what autodiff
  gives a weight used by every data shard)."""
  extra = tuple(sorted((_vma(blocks) | _vma(d) | _vma(block_group)) - _vma(w)))
  zeros = jnp.zeros_like(w)
  if extra:
    zeros = jax.lax.pcast(zeros, extra, to="varying")

  def add_block(n, dw):
    g = block_group[n]
    return jax.lax.dynamic_update_index_in_dim(dw, dw[g] + (blocks[n].T @ d[n]).astype(dw.dtype), g, 0)

  dw = jax.lax.fori_loop(0, blocks.shape[0], add_block, zeros)
  return jax.lax.psum(dw, extra) if extra else dw


@jax.custom_vjp
def block_swiglu_hidden(blocks: jax.Array, gate: jax.Array, up: jax.Array, block_group: jax.Array) -> jax.Array:
  """silu(blocks[n] @ gate[g]) * (blocks[n] @ up[g]) with g = block_group[n]: [N, b, H] -> [N, b, I], both
  projections and the gate in one pass per block; its backward like `block_matmul`'s."""
  return jax.lax.map(lambda a: silu_gate(a[0] @ gate[a[1]], a[0] @ up[a[1]]), (blocks, block_group))


def _block_swiglu_hidden_fwd(blocks, gate, up, block_group):
  a, b = jax.lax.map(lambda x: (x[0] @ gate[x[1]], x[0] @ up[x[1]]), (blocks, block_group))
  return silu_gate(a, b), (blocks, gate, up, block_group, a, b)


def _block_swiglu_hidden_bwd(res, dh):
  blocks, gate, up, block_group, a, b = res
  sig = jax.nn.sigmoid(a)
  da = (dh * b * sig * (1 + a * (1 - sig))).astype(blocks.dtype)  # d silu(a) = sig(a) (1 + a (1 - sig(a)))
  db = (dh * a * sig).astype(blocks.dtype)
  dblocks = jax.lax.map(lambda x: (x[0] @ gate[x[2]].T + x[1] @ up[x[2]].T).astype(blocks.dtype),
                        (da, db, block_group))
  return (dblocks, _add_block_grads(blocks, da, block_group, gate), _add_block_grads(blocks, db, block_group, up),
          None)


block_swiglu_hidden.defvjp(_block_swiglu_hidden_fwd, _block_swiglu_hidden_bwd)


def grouped_swiglu(xs, group_sizes, gate, up, down, impl: str, act=None, lora: ExpertLora | None = None):
  """SwiGLU of each row of `xs` with its group's weights; rows are sorted by group and rows past
  sum(group_sizes) give zeros. xs [N, H]; gate/up [G, H, I]; down [G, I, H]; group_sizes [G];
  lora: the groups' adapters (A/B stacked over the G groups like the weights; two extra grouped
  matmuls through the rank per projection)."""
  lg, lu, ld = lora or (None, None, None)
  if impl == "ragged_dot":
    def proj(u, w, l):
      y = jax.lax.ragged_dot(u, w, group_sizes)
      return y if l is None else y + lora_ops.ragged_delta(u, l, group_sizes).astype(y.dtype)

    return proj(silu_gate(proj(xs, gate, lg), proj(xs, up, lu), act), down, ld)
  if impl != "blocked":
    raise ValueError(f"unknown grouped-matmul implementation {impl!r}")

  def bproj(u, w, l, g, i):  # one block u [block, in], all rows of group g
    y = u @ w[g]
    return y if l is None else y + lora_ops.block_delta(u, l, g, i).astype(y.dtype)

  rows = xs.shape[0]
  block = _block_size(rows, gate.shape[0])
  dest, block_group, num_blocks = _blocked_layout(group_sizes, rows, block)
  buf = jnp.zeros((num_blocks * block, xs.shape[1]), xs.dtype).at[dest].set(xs, mode="drop")
  buf = buf.reshape(num_blocks, block, -1)
  blocks = jnp.arange(num_blocks)
  if lora is None:  # (custom VJPs: the weight gradients accumulate in place)
    h = block_swiglu_hidden(buf, gate, up, block_group)
  else:
    h = jax.lax.map(lambda a: silu_gate(bproj(a[0], gate, lg, a[1], a[2]), bproj(a[0], up, lu, a[1], a[2])),
                    (buf, block_group, blocks))
  if act is not None:  # on the whole intermediate (padding rows are zero)
    h = act(h)
  if lora is None:
    out = block_matmul(h, down, block_group)
  else:
    out = jax.lax.map(lambda a: bproj(a[0], down, ld, a[1], a[2]), (h, block_group, blocks))
  return jnp.take(out.reshape(num_blocks * block, -1), dest, axis=0, mode="fill", fill_value=0)


def experts_sorted(x, gate, up, down, idx, weights, impl: str = "ragged_dot", act=None,
                   lora: ExpertLora | None = None):
  """Dropless sorted dispatch. Same signature and result as `experts_loop`."""
  order, token_of, group_sizes = sort_by_expert(idx, gate.shape[0])
  out = grouped_swiglu(x[token_of], group_sizes, gate, up, down, impl, act, lora)
  return combine(out, order, weights).astype(x.dtype)


def resolve_impl(impl: str) -> str:
  """'auto' picks ragged_dot on TPU/GPU and the blocked form on CPU."""
  if impl != "auto":
    return impl
  return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"


def routed_experts(x, gate, up, down, idx, weights, impl: str = "auto", act=None, lora: ExpertLora | None = None):
  impl = resolve_impl(impl)
  if impl == "loop":
    return experts_loop(x, gate, up, down, idx, weights, act, lora)
  return experts_sorted(x, gate, up, down, idx, weights, impl, act, lora)


def mask_assignments(idx, weights, member, num_experts: int, dtype):
  """(idx, weights) with the assignments of tokens outside `member` [T] sent to the out-of-range
  expert `num_experts` with weight 0; weights cast to `dtype`. member None: every token."""
  if member is None:
    return idx, weights.astype(dtype)
  return (jnp.where(member[:, None], idx, num_experts),
          jnp.where(member[:, None], weights, 0).astype(dtype))
