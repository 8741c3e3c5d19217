"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.model.common import make_param, normal


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  h = jax.nn.silu(x @ gate) * (x @ up)
  return h @ down


class MLP(nnx.Module):
  def __init__(self, hidden: int, intermediate: int, *, param_dtype, dtype, init_std: float,
               rngs: nnx.Rngs):
    init = normal(init_std)
    self.gate = make_param(rngs, init, (hidden, intermediate), param_dtype, ("embed", "mlp"))
    self.up = make_param(rngs, init, (hidden, intermediate), param_dtype, ("embed", "mlp"))
    self.down = make_param(rngs, init, (intermediate, hidden), param_dtype, ("mlp", "embed"))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    d = self.dtype
    return swiglu(x.astype(d), self.gate[...].astype(d), self.up[...].astype(d), self.down[...].astype(d))
