"""Small shared pieces: dtype lookup, parameter creation with logical axis names, buffers."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = Sequence[str | None]


class Buffer(nnx.Variable):
  """Non-trainable model state that is saved with the weights (e.g. the MoE correction bias).

  Not an `nnx.Param`, so optimizers built with `wrt=nnx.Param` never see it and it gets no gradient.
  """


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def normal(std: float) -> Callable:
  return jax.nn.initializers.normal(stddev=std)


def make_param(rngs: nnx.Rngs, init: Callable, shape: tuple[int, ...], dtype, axes: Axes) -> nnx.Param:
  """A parameter tagged with logical axis names (`sharding_names`).

  Logical names are mapped to mesh axes by the sharding rules of `ernie_jax.parallel`; eager
  sharding is off so models can be built without a mesh.
  """
  assert len(axes) == len(shape), (axes, shape)
  return nnx.Param(init(rngs.params(), shape, dtype), sharding_names=tuple(axes), eager_sharding=False)


def ones_param(shape: tuple[int, ...], dtype, axes: Axes) -> nnx.Param:
  return nnx.Param(jnp.ones(shape, dtype), sharding_names=tuple(axes), eager_sharding=False)
