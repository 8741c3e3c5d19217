"""The Optax side of FP8 training.

FP8 scales and amax histories (`Fp8Meta` variables) receive, as their "gradient", the new value
computed in the backward pass. `with_fp8_overwrite(tx)` routes them to a transform that overwrites
each with that value, while every real parameter goes through `tx` (Adam, weight decay, clipping
never see FP8 state). Gradient accumulation combines FP8 entries by maximum (`accumulate`), and the
data-parallel combination is a global amax inside the jitted step (plus `pmax` inside shard_map).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ernie_jax.model.fp8 import Fp8Meta

#: what to differentiate with respect to, and what the optimizer owns, when training with FP8
FP8_WRT = nnx.Any(nnx.Param, Fp8Meta)


def _is_fp8_path(path) -> bool:
  return any(getattr(k, "key", None) == "fp8" for k in path)


def fp8_labels(tree):
  """'fp8' for FP8 scaling state (everything under an `fp8` submodule), 'params' otherwise."""
  return jax.tree_util.tree_map_with_path(lambda p, _: "fp8" if _is_fp8_path(p) else "params", tree)


def overwrite_with_gradient() -> optax.GradientTransformation:
  """updates = grads - params, so that params + updates == grads."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(grads, state, params):
    return jax.tree.map(lambda g, p: g - p, grads, params), state

  return optax.GradientTransformation(init, update)


def with_fp8_overwrite(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  return optax.multi_transform({"params": tx, "fp8": overwrite_with_gradient()}, fp8_labels)


def accumulate(acc, grads):
  """Combine micro-batch gradients: sum for parameters, maximum for FP8 state."""
  return jax.tree_util.tree_map_with_path(
    lambda p, a, g: jnp.maximum(a, g) if _is_fp8_path(p) else a + g, acc, grads)


def param_grads(grads):
  """The parameter part of a gradient tree (for norms and logging)."""
  return nnx.state(grads, nnx.Param)


def average(acc, n: int):
  """Finish an accumulation of `n` micro-batches: mean for parameters, FP8 state unchanged."""
  return jax.tree_util.tree_map_with_path(lambda p, a: a if _is_fp8_path(p) else a / n, acc)
