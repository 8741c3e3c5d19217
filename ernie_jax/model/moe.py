"""ERNIE 4.5 text MoE block (spec §3.1): fp32 softmax router, correction bias for selection only,
unbiased top-k weights renormalised with norm_min, routed SwiGLU experts, shared experts weight 1."""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from ernie_jax.model import fp8
from ernie_jax.model.common import Buffer, make_param, normal
from ernie_jax.model.grouped import resolve_impl, routed_experts
from ernie_jax.model.mlp import MLP
from ernie_jax.model.router import RouterOutput, route
from ernie_jax.parallel import expert_parallel


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


class MoEFp8(nnx.Module):
  """Per-tensor FP8 scaling for the routed experts: token input, the three stacked expert weights,
  the SwiGLU intermediate, and the gradient of the experts' output."""

  def __init__(self, cfg):
    n = cfg.fp8_history_len
    self.x, self.gate, self.up, self.down, self.h, self.grad = (fp8.Fp8Scales(n) for _ in range(6))
    self.recipe, self.margin = cfg.fp8_recipe, cfg.fp8_margin

  def operand(self, name, v, reduce_axes=()):
    s = getattr(self, name)
    return fp8.fp8_operand(v, s.scale[...], s.history[...], fp8.E4M3, self.recipe, self.margin, reduce_axes)

  def output(self, y):
    return fp8.fp8_grad(y, self.grad.scale[...], self.grad.history[...], fp8.E5M2, self.recipe, self.margin)


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
          dtype=d, init_std=std, rngs=rngs, fp8_cfg=cfg)
      if cfg.moe_num_shared_experts > 0 else None)
    self.fp8 = MoEFp8(cfg) if cfg.fp8_recipe != "none" else None
    self.k = cfg.moe_k
    self.norm_min = cfg.moe_norm_min
    self.impl = cfg.moe_impl
    self.transport = cfg.moe_transport
    self.capacity_factor = cfg.moe_capacity_factor
    self.dtype = d

  def __call__(self, x: jax.Array):
    b, s, h = x.shape
    xt = x.reshape(b * s, h).astype(self.dtype)
    bias = None if self.router.correction_bias is None else self.router.correction_bias[...]
    e, d = self.experts, self.dtype
    gate, up, down = e.gate[...].astype(d), e.up[...].astype(d), e.down[...].astype(d)
    xe, act = xt, None  # expert input (the router always sees xt in full precision)
    if self.fp8 is not None:
      q = self.fp8
      xe, gate, up, down = q.operand("x", xt), q.operand("gate", gate), q.operand("up", up), q.operand("down", down)
      act = lambda h, axes=(): q.operand("h", h, axes)
    if self.transport != "none" and expert_parallel.active_mesh() is not None:
      y, r = expert_parallel.expert_parallel_moe(
        xe, self.router.kernel[...], bias, gate, up, down, k=self.k, norm_min=self.norm_min,
        transport=self.transport, impl=resolve_impl(self.impl), capacity_factor=self.capacity_factor,
        act=act, router_input=xt)
    else:
      r = route(xt, self.router.kernel[...], bias, self.k, self.norm_min)
      y = routed_experts(xe, gate, up, down, r.indices, r.weights.astype(d), self.impl, act)
    if self.fp8 is not None:
      y = self.fp8.output(y)
    y = checkpoint_name(y, "moe_out")
    if self.shared is not None:
      y = y + self.shared(xt)
    return y.reshape(b, s, h), r
