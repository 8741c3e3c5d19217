"""The CPU grouped matmul: rows sorted by expert, each expert's rows multiplied in chunks of a few sizes.

For expert e (rows [start_e, end_e) of the sorted buffer), chunks of `sizes[0]` rows are taken while that
many remain, then of `sizes[1]`, ..., and the last size covers the rest (its final chunk may run past end_e:
those rows are masked out of the result and of the weight gradients). The expert's weights are sliced
once, every dot is at least `sizes[-1]` rows and at most `sizes[-1] - 1` padding rows are computed per
expert. Why not one block size: XLA:CPU's dot rate falls with the row count (at H 512 -> 256, ~75-165
GFLOP/s at 64-128 rows vs ~270 at 2048: `benchmarks/components_vs_torch.py --parts rows`), so large chunks
for the bulk of a group and small ones for its tail beat fixed 128-row blocks of a padded buffer (each block
with its own copy of the expert's weights): ~1.4x forward and forward+backward at 512 rows per expert.

`swiglu_hidden(xs, gate, up, group_sizes)` and `matmul(h, down, group_sizes)` have their own backward
passes (the same chunks; each expert's weight gradient accumulated in place, written once); rows past
sum(group_sizes) give zeros. Inside a shard_map the weight gradients vary over the mesh axes the rows
vary over and not the weights (tokens split over data, experts over expert): they are summed over those
axes, which is what autodiff gives a weight that every data shard uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def chunk_sizes(rows: int, groups: int) -> tuple[int, ...]:
  """(big, big / 4, big / 16, ...) down to 8 rows, big = the power of two >= rows per group in [16, 512]."""
  big = 16
  while big < -(-rows // max(groups, 1)) and big < 512:
    big *= 2
  sizes = [big]
  while sizes[-1] // 4 >= 8:
    sizes.append(sizes[-1] // 4)
  return tuple(sizes)


def vma(x) -> frozenset:
  """The manual mesh axes `x` varies over inside a shard_map (empty outside one): `aval.mat.varying` in
  jax >= 0.10, `aval.vma` before."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  return frozenset(mat.varying if mat is not None else (getattr(aval, "vma", ()) or ()))


def _axes(*arrays) -> tuple[str, ...]:
  return tuple(sorted(frozenset().union(*(vma(a) for a in arrays))))


def _zeros(shape, dtype, axes):
  """Zeros varying over the mesh axes `axes` (a loop carry must keep one type from its first write on)."""
  z = jnp.zeros(shape, dtype)
  return jax.lax.pcast(z, axes, to="varying") if axes else z


def _for_each_chunk(group_sizes, sizes, carry, enter, step, leave):
  """carry through every chunk of every group: per group e, `ctx, local = enter(e)`; per chunk
  `local, carry = step(carry, local, ctx, pos, size, valid)` (rows [pos, pos + size), the first `valid`
  of them the group's); then `carry = leave(carry, local, e)`."""
  ends = jnp.cumsum(group_sizes)

  def per_group(e, carry):
    end = ends[e]
    ctx, local = enter(e)
    state = (end - group_sizes[e], local, carry)
    for i, s in enumerate(sizes):
      last = i == len(sizes) - 1

      def cond(st, s=s, last=last):
        return end - st[0] > 0 if last else end - st[0] >= s

      def body(st, s=s):
        pos, local, carry = st
        local, carry = step(carry, local, ctx, pos, s, jnp.minimum(end - pos, s))
        return pos + s, local, carry

      state = jax.lax.while_loop(cond, body, state)
    return leave(state[2], state[1], e)

  return jax.lax.fori_loop(0, group_sizes.shape[0], per_group, carry)


def _rows(a, pos, size, valid):
  """Rows [pos, pos + size) of a (padded) buffer, those past `valid` zeroed."""
  x = jax.lax.dynamic_slice_in_dim(a, pos, size)
  return jnp.where((jnp.arange(size) < valid)[:, None], x, 0)


def _write(buf, y, pos, valid):
  """buf with rows [pos, pos + valid) replaced by y's first `valid` rows."""
  old = jax.lax.dynamic_slice_in_dim(buf, pos, y.shape[0])
  keep = (jnp.arange(y.shape[0]) < valid)[:, None]
  return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(keep, y.astype(buf.dtype), old), pos, 0)


def _pad(a, n):
  return jnp.concatenate([a, jnp.zeros((n,) + a.shape[1:], a.dtype)])


def _apply(xs, weights, group_sizes, widths, fn):
  """Buffers [R, width] for each of `widths`: fn(x_chunk, *expert weights) (a tuple, one array per width) for
  every chunk, written to its rows."""
  sizes = chunk_sizes(xs.shape[0], group_sizes.shape[0])
  xp = _pad(xs, sizes[0])
  axes = _axes(xs, group_sizes, *weights)
  outs = tuple(_zeros((xp.shape[0], w), xs.dtype, axes) for w in widths)

  def step(outs, local, ws, pos, s, valid):
    ys = fn(jax.lax.dynamic_slice_in_dim(xp, pos, s), *ws)
    return local, tuple(_write(o, y, pos, valid) for o, y in zip(outs, ys))

  outs = _for_each_chunk(group_sizes, sizes, outs, lambda e: (tuple(w[e] for w in weights), ()), step,
                         lambda outs, local, e: outs)
  return tuple(o[:xs.shape[0]] for o in outs)


def _backward(xs, cts, weights, group_sizes, dx_fn):
  """(dxs [R, H], per-weight gradients) of per-chunk projections `x @ w` whose output cotangents are `cts`
  (one [R, out] per weight); dx_fn(cts_chunk, weights_e) is the chunk's input gradient."""
  sizes = chunk_sizes(xs.shape[0], group_sizes.shape[0])
  p = sizes[0]
  xp, cps = _pad(xs, p), tuple(_pad(c, p) for c in cts)
  axes = _axes(xs, group_sizes, *cts, *weights)
  dws = tuple(_zeros(w.shape, jnp.float32, axes) for w in weights)
  dx = _zeros(xp.shape, xs.dtype, axes)

  def enter(e):
    return tuple(w[e] for w in weights), tuple(_zeros(w.shape[1:], jnp.float32, axes) for w in weights)

  def step(carry, acc, ws, pos, s, valid):
    dx, dws = carry
    x = _rows(xp, pos, s, valid)
    c = tuple(jax.lax.dynamic_slice_in_dim(cp, pos, s) for cp in cps)  # (x's masked rows zero the products)
    acc = tuple(a + jnp.dot(x.T, ci, preferred_element_type=jnp.float32) for a, ci in zip(acc, c))
    return acc, (_write(dx, dx_fn(c, ws), pos, valid), dws)

  def leave(carry, acc, e):
    dx, dws = carry
    return dx, tuple(jax.lax.dynamic_update_index_in_dim(d, a, e, 0) for d, a in zip(dws, acc))

  dx, dws = _for_each_chunk(group_sizes, sizes, (dx, dws), enter, step, leave)
  dws = tuple(_sum_extra(d, w).astype(w.dtype) for d, w in zip(dws, weights))
  return _sum_extra(dx[:xs.shape[0]], xs), dws


def _sum_extra(dw, w):
  """dw summed over the mesh axes it varies over and `w` does not."""
  extra = tuple(sorted(vma(dw) - vma(w)))
  return jax.lax.psum(dw, extra) if extra else dw


@jax.custom_vjp
def matmul(h: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """h [R, in] (sorted by group) @ w[group of the row] ([G, in, out]) -> [R, out]."""
  return _apply(h, (w,), group_sizes, (w.shape[-1],), lambda x, we: (x @ we,))[0]


def _matmul_fwd(h, w, group_sizes):
  return matmul(h, w, group_sizes), (h, w, group_sizes)


def _matmul_bwd(res, dout):
  h, w, group_sizes = res
  dh, (dw,) = _backward(h, (dout,), (w,), group_sizes, lambda c, ws: c[0] @ ws[0].T)
  return dh, dw, None


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _silu_gate(a, b):
  return jax.nn.silu(a) * b


@jax.custom_vjp
def swiglu_hidden(xs: jax.Array, gate: jax.Array, up: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """silu(x @ gate[g]) * (x @ up[g]) of each row x of xs [R, H] with its group g -> [R, I]."""
  return _apply(xs, (gate, up), group_sizes, (gate.shape[-1],), lambda x, g, u: (_silu_gate(x @ g, x @ u),))[0]


def _swiglu_hidden_fwd(xs, gate, up, group_sizes):
  i = gate.shape[-1]
  a, b = _apply(xs, (gate, up), group_sizes, (i, i), lambda x, g, u: (x @ g, x @ u))
  a, b = checkpoint_name(a, "moe_gate_up"), checkpoint_name(b, "moe_gate_up")
  return _silu_gate(a, b), (xs, gate, up, group_sizes, a, b)


def _swiglu_hidden_bwd(res, dh):
  xs, gate, up, group_sizes, a, b = res
  sig = jax.nn.sigmoid(a)
  da = (dh * b * sig * (1 + a * (1 - sig))).astype(xs.dtype)  # d silu(a) = sig(a) (1 + a (1 - sig(a)))
  db = (dh * a * sig).astype(xs.dtype)
  dxs, (dgate, dup) = _backward(xs, (da, db), (gate, up), group_sizes,
                                lambda c, ws: c[0] @ ws[0].T + c[1] @ ws[1].T)
  return dxs, dgate, dup, None


swiglu_hidden.defvjp(_swiglu_hidden_fwd, _swiglu_hidden_bwd)

