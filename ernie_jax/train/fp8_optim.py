"""The Optax side of FP8 training.

FP8 scales and amax histories (`Fp8Meta` variables) receive, as their "gradient", the new value
computed in the backward pass. `with_fp8_overwrite(tx)` partitions the optimizer: every real
parameter goes through `tx` (Adam, weight decay, clipping never see FP8 state) and FP8 state gets a
zero update with no optimizer state; `Fp8Optimizer.update` then assigns the new values exactly
(`ernie_jax.train.step.TrainState` uses it whenever the model has FP8 state).
(An additive update `p + (g - p)` would not do: with p = 1 and g = 6e-10 it rounds to 0 in fp32.)
Gradient accumulation combines FP8 entries by maximum (`accumulate`); across data-parallel replicas
the amax is a global reduction inside the jitted step (plus `pmax` inside shard_map).
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


def with_fp8_overwrite(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` for parameters; FP8 state is left to `Fp8Optimizer`'s exact overwrite."""
  return optax.multi_transform({"params": tx, "fp8": optax.set_to_zero()}, fp8_labels)


class Fp8Optimizer(nnx.Optimizer):
  """nnx.Optimizer that also overwrites FP8 state with the values carried by its gradients.

  Build it with `wrt=FP8_WRT` and a `with_fp8_overwrite(tx)` transform. Without FP8 state in the
  model it behaves exactly like nnx.Optimizer."""

  def update(self, model, grads, /, **kwargs):
    updates = super().update(model, grads, **kwargs)
    new_fp8 = nnx.state(grads, Fp8Meta)
    if jax.tree.leaves(new_fp8):
      nnx.update(model, new_fp8)
    return updates


def accumulate(acc, grads):
  """Combine micro-batch gradients: sum for parameters, maximum for FP8 state."""
  return jax.tree_util.tree_map_with_path(
    lambda p, a, g: jnp.maximum(a, g) if _is_fp8_path(p) else a + g, acc, grads)


def average(acc, n: int):
  """Finish an accumulation of `n` micro-batches: mean for parameters, FP8 state unchanged."""
  return jax.tree_util.tree_map_with_path(lambda p, a: a if _is_fp8_path(p) else a / n, acc)
