"""Expert-parallel MoE: route locally, exchange tokens so each device computes only its own
experts, send results back, combine with the router weights — all inside one `jax.shard_map` over
the mesh's `expert` axis, with tokens also split over the data-like axes.

One wrapper serves one or more expert sets (the text MoE has one, the VL MoE two: text and vision).
A set may be restricted to some tokens (`member`); the other tokens' assignments go nowhere. The
transport (how tokens travel) is chosen by name (`ModelConfig.moe_transport`), see
`ernie_jax.model.moe.transports`. A set's routed-expert LoRA adapters (`lora`) enter the shard_map
split over the `expert` axis with their experts (`P("expert")`); LoRA dropout keys enter replicated
and each device folds in its index.

Without expert parallelism (`moe_transport="none"`), `token_sharded_routed_experts` runs the routed experts
in a shard_map over the axes that split the tokens only, so that each device sorts its own tokens (for now
with the blocked grouped matmul and no LoRA).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ernie_jax.model import lora_ops
from ernie_jax.model.lora_ops import ExpertLora
from ernie_jax.model.moe.dispatch import resolve_impl, routed_experts
from ernie_jax.model.moe.router import RouterOutput, route
from ernie_jax.model.moe.transports import TRANSPORTS
from ernie_jax.model.moe.transports.all_to_all import capacity, dispatch_ranks

EXPERT_AXIS = "expert"
TOKEN_AXES = ("data", "fsdp", "expert")  # tokens of one shard_map block: split over all of these


class ExpertSetInputs(NamedTuple):
  """One expert set's arrays: router kernel [H, E] and correction bias [E] (or None), stacked
  expert weights gate/up [E, H, I], down [E, I, H], the tokens it serves (member [T] bool,
  None = all) and the experts' LoRA adapters (None: no LoRA)."""

  kernel: jax.Array
  bias: jax.Array | None
  gate: jax.Array
  up: jax.Array
  down: jax.Array
  member: jax.Array | None = None
  lora: ExpertLora | None = None


def _lora_args(lora: ExpertLora | None, ex):
  """shard_map arguments and specs of a set's adapters: A, B split like the experts, keys replicated."""
  args, specs = [], []
  for l in lora or ():
    if l is not None:
      args += [l.a, l.b] + ([] if l.key is None else [l.key])
      specs += [ex, ex] + ([] if l.key is None else [P()])
  return args, specs


def _lora_rebuild(lora: ExpertLora | None, rest, i: int):
  """Inverse of `_lora_args` inside shard_map: (local ExpertLora, next argument index)."""
  if lora is None:
    return None, i
  out = []
  for l in lora:
    if l is None:
      out.append(None)
      continue
    a, b = rest[i], rest[i + 1]
    i += 2
    key = None
    if l.key is not None:
      key, i = rest[i], i + 1
    out.append(l.replace(a=a, b=b, key=key))
  return ExpertLora(*out), i


def active_mesh():
  """The mesh set with `jax.set_mesh`, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or EXPERT_AXIS not in mesh.shape:
    return None
  return mesh


def token_sharded_routed_experts(x, gate, up, down, idx, weights, impl: str, act=None,
                                 lora: ExpertLora | None = None):
  """`dispatch.routed_experts` without expert parallelism on a mesh that splits the tokens (data / fsdp):
  each token shard sorts and computes its own assignments, inside a `jax.shard_map` that is manual over
  those axes only (the expert weights whole over them, e.g. gathered over fsdp; other axes such as
  `tensor` left to the compiler). Under plain jit XLA cannot split the sort over a sharded token axis:
  it gathers every token to every device, and each device computes the routed experts of the whole
  batch. Without an active mesh, or when the tokens do not divide over its shards, the global
  computation runs. So far only for the blocked grouped matmul (the CPU default) without LoRA: its custom
  VJPs keep no weights for the backward pass, while with jax.lax.ragged_dot (or LoRA's blocks) the
  shard_map keeps a copy of the layer's expert weights per layer as a residual (and jnp.searchsorted, which
  the LoRA blocks use, fails inside it on jax 0.10); those run the global computation.
  act(h, reduce_axes): as in `expert_parallel_moe`."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh is None or mesh.empty else tuple(a for a in TOKEN_AXES if mesh.shape.get(a, 1) > 1)
  shards = math.prod(mesh.shape[a] for a in axes)
  if not axes or x.shape[0] % shards or resolve_impl(impl) != "blocked" or lora is not None:
    return routed_experts(x, gate, up, down, idx, weights, impl, act, lora)  # (act's reduce axes default to none)
  tok, whole = P(axes), P()

  def local(x, idx, weights, gate, up, down):
    return routed_experts(x, gate, up, down, idx, weights, impl, None if act is None else (lambda h: act(h, axes)))

  return jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, whole, whole, whole), out_specs=tok,
                       axis_names=frozenset(axes))(x, idx, weights, gate, up, down)


def _masked_transport(fn, name, x, member, idx, weights, gate, up, down, *, axis, impl, capacity_factor,
                      norm_min, act, lora=None):
  """One expert set restricted to the tokens of `member`, inside shard_map (local tokens)."""
  n = jax.lax.axis_size(axis)
  num_experts = n * gate.shape[0]
  weights = jnp.where(member[:, None], weights, 0).astype(x.dtype)
  if name == "all_to_all":
    # Capacity slots are taken in token-major order: put this set's tokens first so the other
    # tokens (weight 0) only fill slots no real assignment wanted.
    perm = jnp.argsort(~member, stable=True)
    y, _ = fn(x[perm], idx[perm], weights[perm], gate, up, down, axis=axis, impl=impl,
              capacity_factor=capacity_factor, norm_min=norm_min, act=act, lora=lora)
    y = jnp.zeros_like(y).at[perm].set(y)
    c = capacity(x.shape[0], idx.shape[1], num_experts, capacity_factor)
    kept = (dispatch_ranks(idx[perm], num_experts) < c).reshape(idx.shape)
    return y, jnp.sum(~kept & member[perm][:, None]).astype(jnp.int32)
  idx = jnp.where(member[:, None], idx, num_experts)  # routed nowhere
  return fn(x, idx, weights, gate, up, down, axis=axis, impl=impl, capacity_factor=capacity_factor,
            norm_min=norm_min, act=act, lora=lora)


def expert_parallel_moe(x, sets, *, k: int, norm_min: float, transport: str, impl: str,
                        capacity_factor: float, act=None, router_input=None):
  """x [T, H] (tokens), sets: ExpertSetInputs -> (y [T, H], [RouterOutput per set], with `dropped`
  summed over the token shards).

  router_input: what the routers see (default x; with FP8, x is the quantised expert input and
  the router gets the full-precision tokens).

  act(h, reduce_axes): optional transform of the SwiGLU intermediate (the FP8 quantiser; it
  reduces its amax over `reduce_axes`, the mesh axes the tokens are split over).

  The outputs of sets restricted by `member` are summed onto zeros; a single unrestricted set's
  output is returned as is."""
  mesh = active_mesh()
  fn = TRANSPORTS[transport]
  token_axes = tuple(a for a in TOKEN_AXES if mesh.shape[a] > 1 or a == EXPERT_AXIS)
  n_shards = 1
  for a in token_axes:
    n_shards *= mesh.shape[a]
  if x.shape[0] % n_shards:
    raise ValueError(f"expert parallelism: {x.shape[0]} tokens are not divisible by the "
                     f"{n_shards} token shards of mesh axes {token_axes}")
  for s in sets:
    if s.gate.shape[0] % mesh.shape[EXPERT_AXIS]:
      raise ValueError(f"expert parallelism: {s.gate.shape[0]} experts are not divisible by the "
                       f"mesh's expert axis ({mesh.shape[EXPERT_AXIS]})")
  tok, row, ex = P(token_axes or None, None), P(token_axes or None), P(EXPERT_AXIS)
  router_input = x if router_input is None else router_input
  local_act = None if act is None else (lambda h: act(h, token_axes))
  args, specs = [x, router_input], [tok, tok]
  for s in sets:
    bias = jnp.zeros((s.kernel.shape[-1],), jnp.float32) if s.bias is None else s.bias
    args += [s.kernel, bias, s.gate, s.up, s.down]
    specs += [P(), P(), ex, ex, ex]
    if s.member is not None:
      args.append(s.member)
      specs.append(row)
    lora_args, lora_specs = _lora_args(s.lora, ex)
    args += lora_args
    specs += lora_specs

  def local(x, xr, *rest):
    y, routers, i = None, [], 0
    for s in sets:
      kernel, bias, gate, up, down = rest[i:i + 5]
      i += 5
      r = route(xr, kernel, None if s.bias is None else bias, k, norm_min)
      member = None
      if s.member is not None:
        member, i = rest[i], i + 1
      lora, i = _lora_rebuild(s.lora, rest, i)
      lora = lora_ops.fold_devices(lora, token_axes)
      if s.member is None:
        yi, dropped = fn(x, r.indices, r.weights.astype(x.dtype), gate, up, down, axis=EXPERT_AXIS,
                         impl=impl, capacity_factor=capacity_factor, norm_min=norm_min, act=local_act,
                         lora=lora)
      else:
        y = jnp.zeros_like(x) if y is None else y
        yi, dropped = _masked_transport(fn, transport, x, member, r.indices, r.weights, gate, up, down,
                                        axis=EXPERT_AXIS, impl=impl, capacity_factor=capacity_factor,
                                        norm_min=norm_min, act=local_act, lora=lora)
      y = yi if y is None else y + yi
      routers.append(r.replace(dropped=dropped.reshape(1)))
    return y, routers

  router_spec = RouterOutput(tok, tok, tok, tok, row)
  y, routers = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs),
                             out_specs=(tok, [router_spec] * len(sets)))(*args)
  return y, [r.replace(dropped=jnp.sum(r.dropped)) for r in routers]
