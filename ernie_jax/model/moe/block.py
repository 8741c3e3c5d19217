"""The ERNIE 4.5 MoE block (spec §3.1, §4.1) as a list of "expert sets".

Each expert set is a router (fp32 softmax, correction bias for selection only, unbiased top-k
weights renormalised with norm_min) plus its routed SwiGLU experts. The text model has one set
(parameters `router`, `experts`); the VL model has two, text and vision (`text_router`,
`text_experts`, `vision_router`, `vision_experts`), with their own intermediate sizes: text tokens
are routed only among the text experts by the text router, vision tokens (placeholders and their
start / end tokens) only among the vision experts. With `vision=None` (text-only input, generated
tokens) the vision experts are skipped altogether. Shared experts (first set's intermediate x
moe_num_shared_experts) run on every token with weight 1.

Expert parallelism (`moe_transport` != "none" under a mesh with an `expert` axis) runs every set
through one `shard_map` (`expert_parallel.py`).

LoRA (`ernie_jax.model.lora`) on a set's routed experts lives on its `Experts` module (per-expert
A/B stacked like the weights) and is applied inside the grouped matmul of every `moe_impl` and
transport; shared experts are an `MLP` and carry their own LoRA.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from ernie_jax.model import fp8
from ernie_jax.model.layers import MLP, make_param, normal
from ernie_jax.model.lora_ops import expert_lora
from ernie_jax.model.moe import expert_parallel
from ernie_jax.model.moe.dispatch import mask_assignments, resolve_impl
from ernie_jax.model.moe.router import Router, VLRouterOutput


class ExpertSet(NamedTuple):
  """An expert set: `name` prefixes its parameters (`{name}_router`, `{name}_experts`; "" gives
  `router`, `experts`), `intermediate` is its experts' width."""

  name: str
  intermediate: int


def text_expert_sets(cfg) -> tuple[ExpertSet, ...]:
  return (ExpertSet("", cfg.moe_intermediate_size),)


def vl_expert_sets(cfg) -> tuple[ExpertSet, ...]:
  text, vision = cfg.moe_intermediate_size
  return (ExpertSet("text", text), ExpertSet("vision", vision))


def _attr(prefix: str, what: str) -> str:
  return f"{prefix}_{what}" if prefix else what


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

  def __init__(self, recipe: fp8.Fp8Recipe):
    self.x, self.gate, self.up, self.down, self.h, self.grad = (fp8.Fp8Scales(recipe.history_len) for _ in range(6))
    self.recipe, self.margin = recipe.recipe, recipe.margin

  def operand(self, name, v, reduce_axes=()):
    s = getattr(self, name)
    return fp8.fp8_operand(v, s.scale[...], s.history[...], fp8.E4M3, self.recipe, self.margin, reduce_axes)

  def output(self, y):
    return fp8.fp8_grad(y, self.grad.scale[...], self.grad.history[...], fp8.E5M2, self.recipe, self.margin)


class MoE(nnx.Module):
  """Routers, then experts, of each set (creation order fixes the parameter init), then shared
  experts and the FP8 state.

  sets: the expert sets (default: the text model's one set). fp8_recipe: FP8 routed and shared
  experts (one set only), None for none."""

  def __init__(self, cfg, sets: tuple[ExpertSet, ...] | None = None, *, fp8_recipe: fp8.Fp8Recipe | None = None,
               rngs: nnx.Rngs):
    sets = text_expert_sets(cfg) if sets is None else tuple(sets)
    if fp8_recipe is not None and len(sets) > 1:
      raise ValueError("FP8 routed experts support a single expert set")
    pd, d = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    std, h, e = cfg.initializer_range, cfg.hidden_size, cfg.moe_num_experts
    for s in sets:
      setattr(self, _attr(s.name, "router"),
              Router(h, e, use_bias=cfg.moe_use_correction_bias, init_std=std, rngs=rngs))
    for s in sets:
      setattr(self, _attr(s.name, "experts"),
              Experts(e, h, s.intermediate, param_dtype=pd, init_std=std, rngs=rngs))
    self.shared = (
      MLP(h, sets[0].intermediate * cfg.moe_num_shared_experts, param_dtype=pd, dtype=d, init_std=std,
          rngs=rngs, fp8_recipe=fp8_recipe)
      if cfg.moe_num_shared_experts > 0 else None)
    self.fp8 = MoEFp8(fp8_recipe) if fp8_recipe is not None else None
    self.set_names = tuple(s.name for s in sets)
    self.k = cfg.moe_k
    self.norm_min = cfg.moe_norm_min
    self.impl = cfg.moe_impl
    self.transport = cfg.moe_transport
    self.capacity_factor = cfg.moe_capacity_factor
    self.dtype = d

  def _members(self, vision, n: int):
    """Tokens of each set: one set serves all (None); two sets split by the vision mask, and the
    vision set is skipped (None entry in `active`) when there is no vision mask."""
    if len(self.set_names) == 1:
      return [None], [True]
    vis = jnp.zeros((n,), bool) if vision is None else vision.reshape(n)
    return [~vis, vis], [True, vision is not None]

  def __call__(self, x: jax.Array, vision: jax.Array | None = None):
    """x [B, S, H]; vision [B, S] bool (True = vision token) or None (all text; two sets only).
    Returns (y [B, S, H], RouterOutput (one set) or VLRouterOutput (two sets) over the B*S tokens)."""
    b, s, h = x.shape
    xt = x.reshape(b * s, h).astype(self.dtype)
    d = self.dtype
    members, active = self._members(vision, b * s)
    routers = [getattr(self, _attr(n, "router")) for n in self.set_names]
    weights, loras = [], []
    for n in self.set_names:
      e = getattr(self, _attr(n, "experts"))
      weights.append((e.gate[...].astype(d), e.up[...].astype(d), e.down[...].astype(d)))
      loras.append(expert_lora(e, d))
    xe, act = xt, None  # expert input (the routers always see xt in full precision)
    if self.fp8 is not None:
      q = self.fp8
      gate, up, down = weights[0]
      xe, weights[0] = q.operand("x", xt), (q.operand("gate", gate), q.operand("up", up), q.operand("down", down))
      act = lambda h, axes=(): q.operand("h", h, axes)
    used = [i for i in range(len(self.set_names)) if active[i]]
    if self.transport != "none" and expert_parallel.active_mesh() is not None:
      inputs = [expert_parallel.ExpertSetInputs(routers[i].kernel[...], routers[i].bias(), *weights[i], members[i],
                                                loras[i]) for i in used]
      y, rs = expert_parallel.expert_parallel_moe(
        xe, inputs, k=self.k, norm_min=self.norm_min, transport=self.transport,
        impl=resolve_impl(self.impl), capacity_factor=self.capacity_factor, act=act, router_input=xt)
      out = [None if i in used else r(xt, self.k, self.norm_min) for i, r in enumerate(routers)]
      for i, r in zip(used, rs):
        out[i] = r
    else:
      out = [r(xt, self.k, self.norm_min) for r in routers]
      y = None
      for i in used:
        gate, up, down = weights[i]
        idx, w = mask_assignments(out[i].indices, out[i].weights, members[i], gate.shape[0], d)
        y = jnp.zeros_like(xt) if y is None and members[i] is not None else y
        yi = expert_parallel.token_sharded_routed_experts(xe, gate, up, down, idx, w, self.impl, act, loras[i])
        y = yi if y is None else y + yi
    if self.fp8 is not None:
      y = self.fp8.output(y)
    y = checkpoint_name(y, "moe_out")
    if self.shared is not None:
      y = y + self.shared(xt)
    router = out[0] if len(out) == 1 else VLRouterOutput(*out)
    return y.reshape(b, s, h), router
