"""Modality-isolated heterogeneous MoE of ERNIE 4.5 VL (spec §4.1).

Two routers (text, vision), each with its own correction-bias row, and two expert sets with
different intermediate sizes. Text tokens are routed only among the text experts by the text
router, vision tokens (image / video placeholders and their start / end tokens) only among the
vision experts by the vision router; the routing math per modality is the text model's (§3.1).
Shared experts (text intermediate x moe_num_shared_experts) run on every token.

Each expert set sees only its own modality's assignments: the other modality's tokens are given an
out-of-range expert id, so the sort puts them after the last group and the grouped matmul never
computes them (the `loop` oracle masks them instead). With `vision=None` (text-only input and
generated tokens) the vision experts are skipped altogether.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from ernie_jax.model.grouped import _combine, _sort_by_expert, experts_loop, grouped_swiglu, resolve_impl
from ernie_jax.model.mlp import MLP
from ernie_jax.model.moe import Experts, Router
from ernie_jax.model.router import RouterOutput, route
from ernie_jax.model.vl.config_vl import VLConfig
from ernie_jax.parallel import expert_parallel
from ernie_jax.parallel.transports import TRANSPORTS
from ernie_jax.parallel.transports.all_to_all import capacity, dispatch_ranks


@struct.dataclass
class VLRouterOutput:
  """Both routers' decisions for every token ([T, ...], or [L, T, ...] stacked over MoE layers).
  Only the text rows of `text` and the vision rows of `vision` were used; the losses mask the rest
  with the model output's `vision_mask`."""

  text: RouterOutput
  vision: RouterOutput


def modality_experts(x, idx, weights, member, gate, up, down, impl: str = "auto"):
  """sum_j w[t,j] * Expert_{idx[t,j]}(x[t]) for tokens with member[t], 0 for the others (which
  are never dispatched). x [T, H]; idx/weights [T, k]; member [T] bool; gate/up [E,H,I]."""
  num_experts = gate.shape[0]
  idx = jnp.where(member[:, None], idx, num_experts)
  weights = jnp.where(member[:, None], weights, 0).astype(x.dtype)
  impl = resolve_impl(impl)
  if impl == "loop":
    return experts_loop(x, gate, up, down, idx, weights)
  order, token_of, group_sizes = _sort_by_expert(idx, num_experts)  # out-of-range ids: not counted
  out = grouped_swiglu(x[token_of], group_sizes, gate, up, down, impl)
  return _combine(out, order, weights).astype(x.dtype)


class VLMoE(nnx.Module):
  def __init__(self, cfg: VLConfig, *, rngs: nnx.Rngs):
    pd, d = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    std, h, e = cfg.initializer_range, cfg.hidden_size, cfg.moe_num_experts
    it, iv = cfg.moe_intermediate_size
    bias = cfg.moe_use_correction_bias
    self.text_router = Router(h, e, use_bias=bias, init_std=std, rngs=rngs)
    self.vision_router = Router(h, e, use_bias=bias, init_std=std, rngs=rngs)
    self.text_experts = Experts(e, h, it, param_dtype=pd, init_std=std, rngs=rngs)
    self.vision_experts = Experts(e, h, iv, param_dtype=pd, init_std=std, rngs=rngs)
    self.shared = (MLP(h, it * cfg.moe_num_shared_experts, param_dtype=pd, dtype=d, init_std=std, rngs=rngs)
                   if cfg.moe_num_shared_experts > 0 else None)
    self.k = cfg.moe_k
    self.norm_min = cfg.moe_norm_min
    self.impl = cfg.moe_impl
    self.transport = cfg.moe_transport
    self.capacity_factor = cfg.moe_capacity_factor
    self.dtype = d

  def _route(self, router: Router, xt):
    bias = None if router.correction_bias is None else router.correction_bias[...]
    return route(xt, router.kernel[...], bias, self.k, self.norm_min)

  def _weights(self, experts: Experts):
    d = self.dtype
    return experts.gate[...].astype(d), experts.up[...].astype(d), experts.down[...].astype(d)

  def __call__(self, x: jax.Array, vision: jax.Array | None):
    """x [B, S, H]; vision [B, S] bool (True = vision token) or None (all text).
    Returns (y [B, S, H], VLRouterOutput over the B*S tokens)."""
    b, s, h = x.shape
    xt = x.reshape(b * s, h).astype(self.dtype)
    rt, rv = self._route(self.text_router, xt), self._route(self.vision_router, xt)
    vis = jnp.zeros((b * s,), bool) if vision is None else vision.reshape(b * s)
    sets = [(~vis, rt, self._weights(self.text_experts))]
    if vision is not None:
      sets.append((vis, rv, self._weights(self.vision_experts)))
    if self.transport != "none" and expert_parallel.active_mesh() is not None:
      y, dropped = _expert_parallel(xt, sets, self.k, self.transport, resolve_impl(self.impl),
                                    self.capacity_factor, self.norm_min)
      rt = rt.replace(dropped=dropped[0])
      if vision is not None:
        rv = rv.replace(dropped=dropped[1])
    else:
      y = jnp.zeros_like(xt)
      for member, r, (gate, up, down) in sets:
        y = y + modality_experts(xt, r.indices, r.weights, member, gate, up, down, self.impl)
    if self.shared is not None:
      y = y + self.shared(xt)
    return y.reshape(b, s, h), VLRouterOutput(rt, rv)


# --------------------------------------------------------------------------------------------------
def _transport_one(fn, name, x, member, idx, weights, gate, up, down, *, axis, impl, capacity_factor,
                   norm_min):
  """One modality through an expert-parallel transport, inside shard_map (local tokens)."""
  n = jax.lax.axis_size(axis)
  num_experts = n * gate.shape[0]
  weights = jnp.where(member[:, None], weights, 0).astype(x.dtype)
  if name == "all_to_all":
    # Capacity slots are taken in token-major order: put this modality's tokens first so the
    # other modality's (weight-0) tokens only fill slots no real assignment wanted.
    perm = jnp.argsort(~member, stable=True)
    y, _ = fn(x[perm], idx[perm], weights[perm], gate, up, down, axis=axis, impl=impl,
              capacity_factor=capacity_factor, norm_min=norm_min)
    y = jnp.zeros_like(y).at[perm].set(y)
    c = capacity(x.shape[0], idx.shape[1], num_experts, capacity_factor)
    kept = (dispatch_ranks(idx[perm], num_experts) < c).reshape(idx.shape)
    dropped = jnp.sum(~kept & member[perm][:, None]).astype(jnp.int32)
    return y, dropped
  idx = jnp.where(member[:, None], idx, num_experts)  # routed nowhere
  y, dropped = fn(x, idx, weights, gate, up, down, axis=axis, impl=impl,
                  capacity_factor=capacity_factor, norm_min=norm_min)
  return y, dropped


def _expert_parallel(xt, sets, k, transport, impl, capacity_factor, norm_min):
  """Both modalities through the transport inside one shard_map over the mesh's expert axis."""
  mesh = expert_parallel.active_mesh()
  fn = TRANSPORTS[transport]
  axis = expert_parallel.EXPERT_AXIS
  token_axes = tuple(a for a in expert_parallel.TOKEN_AXES if mesh.shape[a] > 1 or a == axis)
  shards = 1
  for a in token_axes:
    shards *= mesh.shape[a]
  if xt.shape[0] % shards:
    raise ValueError(f"expert parallelism: {xt.shape[0]} tokens are not divisible by the {shards} "
                     f"token shards of mesh axes {token_axes}")
  for _, _, (gate, _, _) in sets:
    if gate.shape[0] % mesh.shape[axis]:
      raise ValueError(f"expert parallelism: {gate.shape[0]} experts are not divisible by the "
                       f"mesh's expert axis ({mesh.shape[axis]})")
  tok, row = P(token_axes, None), P(token_axes)
  ex = P(axis)
  args, specs = [xt], [tok]
  for member, r, weights in sets:
    args += [member, r.indices, r.weights, *weights]
    specs += [row, tok, tok, ex, ex, ex]

  def local(x, *rest):
    y, dropped = jnp.zeros_like(x), []
    for i in range(len(sets)):
      member, idx, w, gate, up, down = rest[6 * i:6 * i + 6]
      yi, di = _transport_one(fn, transport, x, member, idx, w, gate, up, down, axis=axis, impl=impl,
                              capacity_factor=capacity_factor, norm_min=norm_min)
      y = y + yi
      dropped.append(di.reshape(1))
    return y, jnp.concatenate(dropped)

  y, dropped = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs),
                             out_specs=(tok, P(token_axes)))(*args)
  return y, jnp.sum(dropped.reshape(shards, len(sets)), axis=0)
