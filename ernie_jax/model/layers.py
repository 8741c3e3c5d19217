"""The small building blocks of the model (spec §2):

* parameters: `make_param` / `ones_param` tag each parameter with logical axis names
  (`sharding_names`, mapped to mesh axes by `ernie_jax.parallel.sharding`); `Buffer` is saved,
  non-trainable state (the MoE correction bias);
* `RMSNorm`, computed in fp32;
* rotary position embedding with ERNIE's interleaved (GPT-J) pairing: pair (2i, 2i+1) of each head
  is rotated by angle pos * theta^(-2i/d). This is NOT the NeoX half-rotation; the checkpoints' q/k
  rows are laid out for the interleaved form;
* the SwiGLU feed-forward down(silu(gate(x)) * up(x)), no biases, optionally with FP8 matmuls, or
  with LoRA branches (`lora_ops`) on gate / up / down.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from ernie_jax.model import fp8
from ernie_jax.model.lora_ops import adapter, add

Axes = Sequence[str | None]


class Buffer(nnx.Variable):
  """Non-trainable model state that is saved with the weights (e.g. the MoE correction bias).

  Not an `nnx.Param`, so optimizers built with `wrt=nnx.Param` never see it and it gets no gradient.
  """


def normal(std: float) -> Callable:
  return jax.nn.initializers.normal(stddev=std)


def make_param(rngs: nnx.Rngs, init: Callable, shape: tuple[int, ...], dtype, axes: Axes) -> nnx.Param:
  """A parameter tagged with logical axis names (`sharding_names`).

  Logical names are mapped to mesh axes by the sharding rules of `ernie_jax.parallel`; eager
  sharding is off so models can be built without a mesh.
  """
  assert len(axes) == len(shape), (axes, shape)
  return nnx.Param(init(rngs.params(), shape, dtype), sharding_names=tuple(axes), eager_sharding=False)


def ones_param(shape: tuple[int, ...], dtype, axes: Axes) -> nnx.Param:
  return nnx.Param(jnp.ones(shape, dtype), sharding_names=tuple(axes), eager_sharding=False)


# --------------------------------------------------------------------------------------------------
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """`(x_f32 * rsqrt(mean(x_f32^2) + eps)).astype(x.dtype) * weight`."""
  xf = x.astype(jnp.float32)
  var = jnp.mean(xf * xf, axis=-1, keepdims=True)
  return (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype) * weight.astype(x.dtype)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, param_dtype):
    self.weight = ones_param((dim,), param_dtype, ("norm",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight[...], self.eps)


# --------------------------------------------------------------------------------------------------
def inv_frequencies(head_dim: int, theta: float) -> jax.Array:
  exponent = jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / head_dim
  return 1.0 / (theta ** exponent)


def rope_angles(positions: jax.Array, head_dim: int, theta: float, compression_ratio: float = 1.0):
  """cos, sin of shape [..., head_dim // 2] (fp32) for integer `positions` of shape [...]."""
  pos = positions.astype(jnp.float32) / compression_ratio
  angles = pos[..., None] * inv_frequencies(head_dim, theta)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate x [B, S, N, D] with cos/sin [B, S, D/2]; computed in fp32, returned in x.dtype."""
  xf = x.astype(jnp.float32)
  x0, x1 = xf[..., 0::2], xf[..., 1::2]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


# --------------------------------------------------------------------------------------------------
def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, loras=(None, None, None)) -> jax.Array:
  """down(silu(x gate) * (x up)); `loras`: optional (gate, up, down) `lora_ops.Lora` branches."""
  lg, lu, ld = loras
  a_eq, b_eq = "...h,hr->...r", "...r,ri->...i"
  lead = x.shape[:-1]
  x = x.reshape(-1, x.shape[-1])  # [tokens, H]: 2-D matmuls (XLA:CPU runs the weight gradients of [B, S, H]
  #                                  inputs, contracted over two dims, ~1.5x slower)
  h = checkpoint_name(jax.nn.silu(add(x @ gate, x, lg, a_eq, b_eq)) * add(x @ up, x, lu, a_eq, b_eq), "mlp_hidden")
  return checkpoint_name(add(h @ down, h, ld, a_eq, b_eq), "mlp_out").reshape(*lead, down.shape[-1])


class MLPFp8(nnx.Module):
  def __init__(self, recipe: fp8.Fp8Recipe):
    self.gate, self.up, self.down = (fp8.make_dot(recipe) for _ in range(3))


class MLP(nnx.Module):
  def __init__(self, hidden: int, intermediate: int, *, param_dtype, dtype, init_std: float,
               rngs: nnx.Rngs, fp8_recipe: fp8.Fp8Recipe | None = None):
    init = normal(init_std)
    self.gate = make_param(rngs, init, (hidden, intermediate), param_dtype, ("embed", "mlp"))
    self.up = make_param(rngs, init, (hidden, intermediate), param_dtype, ("embed", "mlp"))
    self.down = make_param(rngs, init, (intermediate, hidden), param_dtype, ("mlp", "embed"))
    self.dtype = dtype
    self.fp8 = None if fp8_recipe is None else MLPFp8(fp8_recipe)

  def __call__(self, x: jax.Array) -> jax.Array:
    d = self.dtype
    x, gate, up, down = x.astype(d), self.gate[...].astype(d), self.up[...].astype(d), self.down[...].astype(d)
    if self.fp8 is None:  # (LoRA refuses FP8 models: ernie_jax.model.lora)
      return swiglu(x, gate, up, down, tuple(adapter(self, n, d) for n in ("gate", "up", "down")))
    q = self.fp8
    h = jax.nn.silu(q.gate.einsum("...h,hi->...i", x, gate)) * q.up.einsum("...h,hi->...i", x, up)
    return q.down.einsum("...i,ih->...h", h, down)
