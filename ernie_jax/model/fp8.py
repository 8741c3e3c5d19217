"""FP8 scaled matmuls for Flax NNX (E4M3 forward operands, E5M2 gradients).

Each FP8 matmul site keeps, per tensor role (input, kernel, output-gradient), a scale and an amax
history as `Fp8Meta` variables. They are not parameters: the backward pass returns their NEW values
as their "gradients", and the optimizer overwrites them with those (`overwrite_with_gradient` in
`ernie_jax.train.fp8_optim`), outside Adam, weight decay and clipping.

Scale convention: a tensor x is stored as q = saturate(x / scale) in FP8 and read back as q * scale,
so scale = amax * 2^margin / fp8_max.
* delayed scaling: x is quantised with the stored scale (derived from previous steps' amaxes); the
  history is then rolled (newest first) and the new scale is max(history) * 2^margin / fp8_max.
* current scaling: x is quantised with a scale from its own amax (history still recorded).
A zero or non-finite amax keeps the previous scale.

XLA on H100-class GPUs rewrites `dequant(q_x) @ dequant(q_w)` into an FP8 GEMM; on CPU the same
program runs emulated (numerically identical, slow).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2


class Fp8Meta(nnx.Variable):
  """FP8 scaling state (scale or amax history): overwritten with the value its gradient carries."""


def fp8_max(dtype) -> float:
  return float(jnp.finfo(dtype).max)


def quantize(x, scale, dtype):
  """Saturating cast of x / scale to `dtype`."""
  m = fp8_max(dtype)
  return jnp.clip(x.astype(jnp.float32) / scale, -m, m).astype(dtype)


def dequantize(q, scale, dtype):
  return (q.astype(jnp.float32) * scale).astype(dtype)


def qdq(x, scale, dtype):
  return dequantize(quantize(x, scale, dtype), scale, x.dtype)


def amax(x):
  return jnp.max(jnp.abs(x)).astype(jnp.float32)


def scale_from_amax(a, old_scale, dtype, margin: float):
  new = a * (2.0 ** margin) / fp8_max(dtype)
  return jnp.where((a > 0) & jnp.isfinite(a), new, old_scale).astype(jnp.float32)


def roll_history(history, a):
  return jnp.roll(history, 1).at[0].set(a)


def _update(x, scale, history, dtype, recipe: str, margin: float, reduce_axes):
  """-> (scale used to quantise x now, new scale, new history)."""
  a = amax(x)
  if reduce_axes:  # inside shard_map: the amax of the whole tensor
    a = jax.lax.pmax(a, reduce_axes)
  new_history = roll_history(history, a)
  new_scale = scale_from_amax(jnp.max(new_history), scale, dtype, margin)
  current = scale_from_amax(a, scale, dtype, margin)
  # delayed scaling uses the stored scale, except before any amax was recorded (first step)
  use = jnp.where(jnp.max(history) > 0, scale, current) if recipe == "delayed" else current
  return use, new_scale, new_history


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def fp8_operand(x, scale, history, dtype=E4M3, recipe="delayed", margin=0.0, reduce_axes=()):
  """Forward: x quantised to `dtype` and back. Backward: straight-through for x; the new scale and
  history are returned as the cotangents of `scale` and `history`."""
  use, _, _ = _update(x, scale, history, dtype, recipe, margin, reduce_axes)
  return qdq(x, use, dtype)


def _operand_fwd(x, scale, history, dtype, recipe, margin, reduce_axes):
  use, new_scale, new_history = _update(x, scale, history, dtype, recipe, margin, reduce_axes)
  return qdq(x, use, dtype), (new_scale, new_history)


def _operand_bwd(dtype, recipe, margin, reduce_axes, res, g):
  new_scale, new_history = res
  return g, new_scale, new_history


fp8_operand.defvjp(_operand_fwd, _operand_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def fp8_grad(y, scale, history, dtype=E5M2, recipe="delayed", margin=0.0, reduce_axes=()):
  """Forward: identity. Backward: the incoming gradient is quantised to `dtype` (E5M2) and back;
  the new gradient scale and history are the cotangents of `scale` and `history`."""
  return y


def _grad_fwd(y, scale, history, dtype, recipe, margin, reduce_axes):
  return y, (scale, history)


def _grad_bwd(dtype, recipe, margin, reduce_axes, res, g):
  scale, history = res
  use, new_scale, new_history = _update(g, scale, history, dtype, recipe, margin, reduce_axes)
  return qdq(g, use, dtype), new_scale, new_history


fp8_grad.defvjp(_grad_fwd, _grad_bwd)


class Fp8Scales(nnx.Module):
  """Scale + amax history of one tensor role."""

  def __init__(self, history_len: int):
    self.scale = Fp8Meta(initial_value("scale", ()))
    self.history = Fp8Meta(initial_value("history", (history_len,)))


def initial_value(path: str, shape) -> jax.Array:
  """The fresh FP8 state at `path` (".../scale" = 1, ".../history" = 0), e.g. when a checkpoint
  trained without FP8 is loaded into an FP8 model."""
  name = path.rsplit("/", 1)[-1]
  if name not in ("scale", "history"):
    raise ValueError(f"{path!r} is not an FP8 scale or amax history")
  return (jnp.ones if name == "scale" else jnp.zeros)(shape, jnp.float32)


def is_fp8_path(path: str) -> bool:
  """True for FP8 scaling state: every variable under an `fp8` submodule ("a/fp8/b/scale")."""
  return "fp8" in path.split("/")


class Fp8Dot(nnx.Module):
  """FP8 state of one matmul site: `y = fp8_grad(einsum(fp8(x), fp8(w)))`."""

  def __init__(self, recipe: str, history_len: int, margin: float):
    self.input = Fp8Scales(history_len)
    self.kernel = Fp8Scales(history_len)
    self.grad = Fp8Scales(history_len)
    self.recipe = recipe
    self.margin = margin

  def operand(self, x, which: str, reduce_axes=()):
    s = getattr(self, which)
    return fp8_operand(x, s.scale[...], s.history[...], E4M3, self.recipe, self.margin, reduce_axes)

  def output(self, y, reduce_axes=()):
    return fp8_grad(y, self.grad.scale[...], self.grad.history[...], E5M2, self.recipe, self.margin,
                    reduce_axes)

  def einsum(self, eq: str, x, w):
    y = jnp.einsum(eq, self.operand(x, "input"), self.operand(w, "kernel"))
    return self.output(y)


@dataclasses.dataclass(frozen=True)
class Fp8Recipe:
  """What the FP8 matmul sites need from the config: the scaling recipe ("delayed" / "current"),
  the amax history length and the margin. Layers get one of these, or None (no FP8)."""

  recipe: str
  history_len: int
  margin: float

  @classmethod
  def of(cls, cfg) -> "Fp8Recipe | None":
    """The recipe of a model config, None when it has FP8 off."""
    if cfg.fp8_recipe == "none":
      return None
    return cls(cfg.fp8_recipe, cfg.fp8_history_len, cfg.fp8_margin)


def make_dot(recipe: Fp8Recipe) -> Fp8Dot:
  return Fp8Dot(recipe.recipe, recipe.history_len, recipe.margin)


def einsum(fp8: Fp8Dot | None, eq: str, x, w):
  return jnp.einsum(eq, x, w) if fp8 is None else fp8.einsum(eq, x, w)
