"""Logical axis names -> mesh axes, by a rule table.

Every parameter carries logical axis names (metadata `out_sharding`, e.g. ('layers', 'experts',
'embed', 'expert_mlp')). A rule table maps each logical name to a mesh axis, a tuple of mesh axes,
or None (replicated). `state_shardings` turns a model state into NamedShardings; `shard_model` builds
a model directly in that layout (parameters are created inside a jitted function with those
output shardings, so the full model never sits on one device).

Activations are constrained with `constrain(x, axes, rules)`; the models pass their
`sharding_rules` (set by `with_rules`, e.g. by `shard_model` / `from_pretrained` given custom
rules; None means DEFAULT_RULES) explicitly down to every constraint.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Activations: "batch" (tokens split over every data-like axis, incl. expert), "length",
# "act_embed" / "act_heads" / "act_vocab" (the hidden, per-head and logits dimensions).
DEFAULT_RULES: Rules = (
  ("batch", ("data", "fsdp", "expert")),
  ("length", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_vocab", "tensor"),
  ("layers", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("experts", "expert"),
  ("expert_mlp", "tensor"),
  ("norm", None),
)


class ShardingError(ValueError):
  pass


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules | None = None) -> jax.Array:
  """Sharding constraint from logical activation axes (mapped by `rules`, default DEFAULT_RULES)
  when a mesh is set (`jax.set_mesh`); a no-op otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = logical_to_spec(axes, x.shape, DEFAULT_RULES if rules is None else rules, mesh,
                         what=f"activation {tuple(axes)}")
  return jax.lax.with_sharding_constraint(x, spec)


def with_rules(model: nnx.Module, rules: Rules | None) -> nnx.Module:
  """Record custom rules on a model (its `sharding_rules`), so its forward constrains the
  activations with the same rules its parameters were sharded with. None / DEFAULT_RULES: no-op."""
  if rules is not None and tuple(rules) != tuple(DEFAULT_RULES):
    model.sharding_rules = tuple(tuple(r) if isinstance(r, list) else r for r in rules)
  return model


def _lookup(rules: Rules, name: str | None):
  if name is None:
    return None
  found, value = False, None
  for k, v in rules:  # last match wins (as in flax.nnx logical rules)
    if k == name:
      found, value = True, v
  if not found:
    raise ShardingError(f"no sharding rule for logical axis '{name}' (rules: {[k for k, _ in rules]})")
  return value


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh,
                    what: str = "array") -> P:
  """PartitionSpec for an array with logical `axes`; a mesh axis of size 1 is dropped, a dimension
  that the mesh axes do not divide is an error naming the array."""
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    target = _lookup(rules, name)
    names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    names = tuple(n for n in names if mesh.shape.get(n, 1) > 1)
    for n in names:
      if n not in mesh.shape:
        raise ShardingError(f"{what}: rule for '{name}' names mesh axis '{n}', not in {tuple(mesh.shape)}")
      if n in used:
        raise ShardingError(f"{what}: mesh axis '{n}' used twice in {tuple(axes)}")
      used.add(n)
    size = 1
    for n in names:
      size *= mesh.shape[n]
    if dim % size:
      raise ShardingError(f"{what}: dimension '{name}' of size {dim} is not divisible by mesh axes "
                          f"{names} (size {size}); change the mesh or the rule for '{name}'")
    spec.append(None if not names else (names[0] if len(names) == 1 else names))
  return P(*spec)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def state_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES, *, skip_non_arrays: bool = False):
  """The state with each Variable's value replaced by its NamedSharding (same tree structure as
  the state, so it can be passed as jit out_shardings or to device_put). Optimizer moments carry
  their parameter's logical axis names. skip_non_arrays: leave variables that hold no array alone
  (optax `MaskedNode`s of a multi_transform, e.g. in a train state with FP8)."""

  def one(path, var):
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    if skip_non_arrays and not hasattr(value, "shape"):
      return var
    axes = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
    shape = value.shape
    if axes is None:
      axes = (None,) * len(shape)
    sharding = NamedSharding(mesh, logical_to_spec(axes, shape, rules, mesh, _path_str(path)))
    return var.replace(sharding) if isinstance(var, nnx.Variable) else sharding

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(make: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Build `make()` with every variable created directly in its sharded layout."""
  abstract = nnx.eval_shape(make)
  graphdef, abs_state = nnx.split(abstract)
  shardings = state_shardings(abs_state, mesh, rules)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
  return with_rules(nnx.merge(graphdef, state), rules)


def batch_shards(rules: Rules | None = None) -> int:
  """How many ways the current mesh (`jax.set_mesh`) splits the logical `batch` axis (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return 1
  target = _lookup(DEFAULT_RULES if rules is None else rules, "batch")
  names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
  n = 1
  for name in names:
    n *= mesh.shape.get(name, 1)
  return n


def batch_spec(mesh: Mesh, rules: Rules = DEFAULT_RULES, ndim: int = 2) -> P:
  """PartitionSpec of a [batch, seq, ...] input."""
  target = _lookup(rules, "batch")
  names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
  names = tuple(n for n in names if mesh.shape.get(n, 1) > 1)
  first = None if not names else (names[0] if len(names) == 1 else names)
  return P(first, *([None] * (ndim - 1)))
