"""ERNIE 4.5 text MoE block (spec §3.1): fp32 softmax router, correction bias for selection only,
unbiased top-k weights renormalised with norm_min, routed SwiGLU experts, shared experts weight 1."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ernie_jax.model.common import Buffer, make_param, normal
from ernie_jax.model.grouped import routed_experts
from ernie_jax.model.mlp import MLP


@struct.dataclass
class RouterOutput:
  """What the router decided for each token ([T, ...], T = batch*seq); used by the MoE losses."""

  logits: jax.Array  # [T, E] fp32, before softmax (z-loss)
  probs: jax.Array  # [T, E] fp32 softmax (load-balance loss)
  indices: jax.Array  # [T, k] int32 selected experts (chosen with the correction bias)
  weights: jax.Array  # [T, k] fp32 renormalised unbiased probabilities of the selected experts


def route(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, k: int, norm_min: float) -> RouterOutput:
  logits = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  probs = jax.nn.softmax(logits, axis=-1)
  scores = probs if bias is None else probs + bias.astype(jnp.float32)
  _, indices = jax.lax.top_k(jax.lax.stop_gradient(scores), k)
  weights = jnp.take_along_axis(probs, indices, axis=-1)
  weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), norm_min)
  return RouterOutput(logits, probs, indices.astype(jnp.int32), weights)


class Router(nnx.Module):
  def __init__(self, hidden: int, num_experts: int, *, use_bias: bool, init_std: float, rngs: nnx.Rngs):
    self.kernel = make_param(rngs, normal(init_std), (hidden, num_experts), jnp.float32, ("embed", None))
    self.correction_bias = (
      Buffer(jnp.zeros((num_experts,), jnp.float32), sharding_names=(None,), eager_sharding=False)
      if use_bias else None)


class Experts(nnx.Module):
  """E SwiGLU experts with stacked weights gate/up [E, H, I], down [E, I, H]."""

  def __init__(self, num_experts: int, hidden: int, intermediate: int, *, param_dtype,
               init_std: float, rngs: nnx.Rngs):
    init = normal(init_std)
    self.gate = make_param(rngs, init, (num_experts, hidden, intermediate), param_dtype, ("experts", "embed", "expert_mlp"))
    self.up = make_param(rngs, init, (num_experts, hidden, intermediate), param_dtype, ("experts", "embed", "expert_mlp"))
    self.down = make_param(rngs, init, (num_experts, intermediate, hidden), param_dtype, ("experts", "expert_mlp", "embed"))


class MoE(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    pd, d = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    std = cfg.initializer_range
    self.router = Router(cfg.hidden_size, cfg.moe_num_experts, use_bias=cfg.moe_use_correction_bias,
                         init_std=std, rngs=rngs)
    self.experts = Experts(cfg.moe_num_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                           param_dtype=pd, init_std=std, rngs=rngs)
    self.shared = (
      MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.moe_num_shared_experts, param_dtype=pd,
          dtype=d, init_std=std, rngs=rngs)
      if cfg.moe_num_shared_experts > 0 else None)
    self.k = cfg.moe_k
    self.norm_min = cfg.moe_norm_min
    self.impl = cfg.moe_impl
    self.dtype = d

  def __call__(self, x: jax.Array, impl: str | None = None):
    b, s, h = x.shape
    xt = x.reshape(b * s, h).astype(self.dtype)
    bias = None if self.router.correction_bias is None else self.router.correction_bias[...]
    r = route(xt, self.router.kernel[...], bias, self.k, self.norm_min)
    e = self.experts
    d = self.dtype
    y = routed_experts(xt, e.gate[...].astype(d), e.up[...].astype(d), e.down[...].astype(d),
                       r.indices, r.weights.astype(d), impl or self.impl)
    if self.shared is not None:
      y = y + self.shared(xt)
    return y.reshape(b, s, h), r
