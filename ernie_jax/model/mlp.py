"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from ernie_jax.model import fp8
from ernie_jax.model.common import make_param, normal


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  h = checkpoint_name(jax.nn.silu(x @ gate) * (x @ up), "mlp_hidden")
  return checkpoint_name(h @ down, "mlp_out")


class MLPFp8(nnx.Module):
  def __init__(self, fp8_cfg):
    self.gate, self.up, self.down = (fp8.make_dot(fp8_cfg) for _ in range(3))


class MLP(nnx.Module):
  def __init__(self, hidden: int, intermediate: int, *, param_dtype, dtype, init_std: float,
               rngs: nnx.Rngs, fp8_cfg=None):
    init = normal(init_std)
    self.gate = make_param(rngs, init, (hidden, intermediate), param_dtype, ("embed", "mlp"))
    self.up = make_param(rngs, init, (hidden, intermediate), param_dtype, ("embed", "mlp"))
    self.down = make_param(rngs, init, (intermediate, hidden), param_dtype, ("mlp", "embed"))
    self.dtype = dtype
    self.fp8 = MLPFp8(fp8_cfg) if fp8_cfg is not None and fp8_cfg.fp8_recipe != "none" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    d = self.dtype
    x, gate, up, down = x.astype(d), self.gate[...].astype(d), self.up[...].astype(d), self.down[...].astype(d)
    if self.fp8 is None:
      return swiglu(x, gate, up, down)
    q = self.fp8
    h = jax.nn.silu(q.gate.einsum("...h,hi->...i", x, gate)) * q.up.einsum("...h,hi->...i", x, up)
    return q.down.einsum("...i,ih->...h", h, down)
