"""Routed-expert computation: tokens sorted by expert -> grouped matmul -> unsorted and combined.

Three implementations of the same function `y[t] = sum_j w[t,j] * Expert_{idx[t,j]}(x[t])`:
* `ragged_dot`: `jax.lax.ragged_dot` grouped matmuls (the fast path on TPU/GPU; on XLA:CPU it
  lowers to a dense masked matmul over all experts, about E times the needed work);
* `blocked` (the CPU path): each expert's rows multiplied in chunks of a few sizes, large for the bulk of
  the group and small for its tail (`expert_loop`, own backward passes; waste < the smallest chunk per
  expert). With LoRA on the experts: each group padded to a multiple of a row block and a `lax.map` over
  the blocks (autodiff; the adapters need the block index);
* `loop`: every expert applied to every token, masked by the routing weights (the test oracle).
All are dropless and differentiable.

`sort_by_expert`, `gather_sorted`, `grouped_swiglu`, `combine` and `silu_gate` are the building blocks the
expert-parallel transports (`ernie_jax.model.moe.transports`) share. `mask_assignments` restricts an
expert set to some tokens (the VL modalities): the others get an out-of-range expert id, so the sort
puts them after the last group and the grouped matmul never computes them.

LoRA on the routed experts (`lora`: an `ExpertLora` of per-expert A [E, H, r] / B [E, r, I]) adds
`scale * ((x A_e) B_e)` to each projection inside the same grouping (`lora_ops`); `lora=None` runs
exactly the code without LoRA.
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ernie_jax.model import lora_ops
from ernie_jax.model.lora_ops import ExpertLora
from ernie_jax.model.moe import expert_loop


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
  """Flatten the (token, slot) assignments and order them by expert (stable): (order [T*k], group_sizes [E])."""
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  return order, jnp.bincount(flat, length=num_experts).astype(jnp.int32)


def inverse_permutation(p: jax.Array) -> jax.Array:
  return jnp.zeros_like(p).at[p].set(jnp.arange(p.shape[0], dtype=p.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gather_sorted(x: jax.Array, order: jax.Array, k: int) -> jax.Array:
  """x [T, H] -> [T*k, H]: each token's row once per routed slot, in `order`. Its backward gathers with the
  inverse permutation and sums the k slots (autodiff of the gather would scatter-add, slow on CPU)."""
  return x[order // k]


def _gather_sorted_fwd(x, order, k):
  return gather_sorted(x, order, k), order


def _gather_sorted_bwd(k, order, ct):
  return ct[inverse_permutation(order)].reshape(-1, k, ct.shape[-1]).sum(1), None


gather_sorted.defvjp(_gather_sorted_fwd, _gather_sorted_bwd)


@jax.custom_vjp
def unsort(a: jax.Array, order: jax.Array) -> jax.Array:
  """a [N, ...] in `order` -> the original order; backward: a gather in `order` (not a scatter-add)."""
  return a[inverse_permutation(order)]


def _unsort_fwd(a, order):
  return unsort(a, order), order


def _unsort_bwd(order, ct):
  return ct[order], None


unsort.defvjp(_unsort_fwd, _unsort_bwd)


def combine(out_sorted, order, weights):
  """Undo the sort and sum each token's k expert outputs with its routing weights."""
  t, k = weights.shape
  out = unsort(out_sorted, order).reshape(t, k, -1)
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

    a, b = (checkpoint_name(proj(xs, w, l), "moe_gate_up") for w, l in ((gate, lg), (up, lu)))
    return proj(silu_gate(a, b, act), down, ld)
  if impl != "blocked":
    raise ValueError(f"unknown grouped-matmul implementation {impl!r}")

  if lora is None:  # each group's rows in chunks, own backward passes (`expert_loop`)
    h = expert_loop.swiglu_hidden(xs, gate, up, group_sizes)
    if act is not None:  # on the whole intermediate (rows past the last group are zero)
      h = act(h)
    return expert_loop.matmul(h, down, group_sizes)

  def bproj(u, w, l, g, i):  # one block u [block, in], all rows of group g
    y = u @ w[g]
    return y if l is None else y + lora_ops.block_delta(u, l, g, i).astype(y.dtype)

  rows = xs.shape[0]
  block = _block_size(rows, gate.shape[0])
  dest, block_group, num_blocks = _blocked_layout(group_sizes, rows, block)
  buf = jnp.zeros((num_blocks * block, xs.shape[1]), xs.dtype).at[dest].set(xs, mode="drop")
  buf = buf.reshape(num_blocks, block, -1)
  blocks = jnp.arange(num_blocks)
  h = jax.lax.map(lambda a: silu_gate(*(checkpoint_name(bproj(a[0], w, l, a[1], a[2]), "moe_gate_up")
                                         for w, l in ((gate, lg), (up, lu)))), (buf, block_group, blocks))
  if act is not None:  # on the whole intermediate (padding rows are zero)
    h = act(h)
  out = jax.lax.map(lambda a: bproj(a[0], down, ld, a[1], a[2]), (h, block_group, blocks))
  return jnp.take(out.reshape(num_blocks * block, -1), dest, axis=0, mode="fill", fill_value=0)


def experts_sorted(x, gate, up, down, idx, weights, impl: str = "ragged_dot", act=None,
                   lora: ExpertLora | None = None):
  """Dropless sorted dispatch. Same signature and result as `experts_loop`."""
  order, group_sizes = sort_by_expert(idx, gate.shape[0])
  out = grouped_swiglu(gather_sorted(x, order, idx.shape[1]), group_sizes, gate, up, down, impl, act, lora)
  return combine(checkpoint_name(out, "moe_expert_out"), order, weights).astype(x.dtype)


def resolve_impl(impl: str) -> str:
  """'auto' picks ragged_dot on TPU/GPU and the blocked form on CPU."""
  if impl != "auto":
    return impl
  return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"


PALLAS_RAGGED_DOT_FLAG = "jax_ragged_dot_use_gpu_pallas_triton_lowering"
PALLAS_RAGGED_DOT_MODULE = "jax._src.lax.pallas_lowerings.gpu.ragged_dot"


def has_pallas_ragged_dot() -> bool:
  """Whether this jax ships the Pallas-Triton lowering of `jax.lax.ragged_dot` for GPUs (grouped matmul
  kernels for the forward and both gradients), behind the flag PALLAS_RAGGED_DOT_FLAG."""
  try:
    return (PALLAS_RAGGED_DOT_FLAG in jax.config.values
            and importlib.util.find_spec(PALLAS_RAGGED_DOT_MODULE) is not None)
  except ModuleNotFoundError:  # a parent package is missing
    return False


def use_gpu_grouped_matmul_kernel(moe_impl: str, backend: str | None = None) -> str | None:
  """For entry points (process-wide: it sets a jax flag). On GPU, route `jax.lax.ragged_dot` through jax's
  Pallas-Triton grouped matmul when this jax ships it: XLA's default GPU lowering of a ragged_dot may expand
  it into a dense matmul against every expert's weights (E times the FLOPs and an [rows, E x width]
  intermediate). Returns one line saying which lowering `moe_impl` gets, or None when it is not ragged_dot."""
  if resolve_impl(moe_impl) != "ragged_dot":
    return None
  if (backend or jax.default_backend()) != "gpu":
    return "ragged_dot: the backend's own lowering"
  if not has_pallas_ragged_dot():
    return (f"ragged_dot: XLA's default GPU lowering (jax {jax.__version__} has no Pallas-Triton ragged_dot "
            "lowering; if the MoE step is slow or out of memory, try moe_impl=blocked)")
  jax.config.update(PALLAS_RAGGED_DOT_FLAG, True)
  return "ragged_dot: jax's Pallas-Triton grouped matmul kernels"


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
