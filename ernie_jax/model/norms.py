"""RMSNorm, computed in fp32 (spec §2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.model.common import ones_param


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
