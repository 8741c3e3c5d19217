"""Expert-parallel MoE: route locally, exchange tokens so each device computes only its own
experts, send results back, combine with the router weights — all inside `jax.shard_map` over the
mesh's `expert` axis, with tokens also split over the data-like axes.

The transport (how tokens travel) is chosen by name (`ModelConfig.moe_transport`), see
`ernie_jax.parallel.transports`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ernie_jax.model.router import RouterOutput, route
from ernie_jax.parallel.transports import TRANSPORTS

EXPERT_AXIS = "expert"
TOKEN_AXES = ("data", "fsdp", "expert")  # tokens of one shard_map block: split over all of these


def active_mesh():
  """The mesh set with `jax.set_mesh`, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or EXPERT_AXIS not in mesh.shape:
    return None
  return mesh


def expert_parallel_moe(x, kernel, bias, gate, up, down, *, k: int, norm_min: float,
                        transport: str, impl: str, capacity_factor: float, act=None,
                        router_input=None):
  """x [T, H] (tokens) -> (y [T, H], RouterOutput with `dropped` per token shard).

  router_input: what the router sees (default x; with FP8, x is the quantised expert input and
  the router gets the full-precision tokens).

  act(h, reduce_axes): optional transform of the SwiGLU intermediate (the FP8 quantiser; it
  reduces its amax over `reduce_axes`, the mesh axes the tokens are split over)."""
  mesh = active_mesh()
  fn = TRANSPORTS[transport]
  token_axes = tuple(a for a in TOKEN_AXES if mesh.shape[a] > 1 or a == EXPERT_AXIS)
  n_shards = 1
  for a in token_axes:
    n_shards *= mesh.shape[a]
  if x.shape[0] % n_shards:
    raise ValueError(f"expert parallelism: {x.shape[0]} tokens are not divisible by the "
                     f"{n_shards} token shards of mesh axes {token_axes}")
  if gate.shape[0] % mesh.shape[EXPERT_AXIS]:
    raise ValueError(f"expert parallelism: {gate.shape[0]} experts are not divisible by the "
                     f"mesh's expert axis ({mesh.shape[EXPERT_AXIS]})")
  tok = P(token_axes or None, None)
  has_bias = bias is not None
  bias = bias if has_bias else jnp.zeros((kernel.shape[-1],), jnp.float32)

  router_input = x if router_input is None else router_input

  def local(x, xr, kernel, bias, gate, up, down):
    r = route(xr, kernel, bias if has_bias else None, k, norm_min)
    y, dropped = fn(x, r.indices, r.weights.astype(x.dtype), gate, up, down, axis=EXPERT_AXIS,
                    impl=impl, capacity_factor=capacity_factor, norm_min=norm_min,
                    act=None if act is None else (lambda h: act(h, token_axes)))
    return y, r.replace(dropped=dropped.reshape(1))

  router_spec = RouterOutput(tok, tok, tok, tok, P(token_axes or None))
  y, r = jax.shard_map(
    local, mesh=mesh,
    in_specs=(tok, tok, P(), P(), P(EXPERT_AXIS), P(EXPERT_AXIS), P(EXPERT_AXIS)),
    out_specs=(tok, router_spec),
  )(x, router_input, kernel, bias, gate, up, down)
  return y, r.replace(dropped=jnp.sum(r.dropped))
