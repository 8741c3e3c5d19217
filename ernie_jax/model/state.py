"""Flat, string-keyed views of a model's state, and the abstract (shape-only) model of a config.

A parameter path is the '/'-joined key path of a variable in `nnx.state(model)` (list indices as
decimal strings), e.g. "groups/1/blocks/layers/0/mlp/experts/gate": the key of checkpoint tables,
Orbax items and sharding rules alike. `path_str` is the one place such a path is joined.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from ernie_jax.model import fp8, model_class


def path_str(keypath) -> str:
  """'/'-joined path of an nnx flat-state key tuple (strings, ints) or a jax tree key path
  (DictKey, SequenceKey, GetAttrKey)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keypath)


def flat_state(state) -> dict[str, Any]:
  """{parameter path: variable} of an `nnx.State` (e.g. `nnx.state(model)` or an abstract state)."""
  return {path_str(path): v for path, v in nnx.to_flat_state(state)}


def abstract_model(cfg):
  """(graphdef, abstract state) of the model of `cfg` (ModelConfig or VLConfig), without
  allocating parameters."""
  return nnx.split(nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0))))


def fresh_fp8_values(flat: dict[str, Any]) -> dict[str, np.ndarray]:
  """Fresh host values (scale 1, empty amax history) for the FP8 scaling state among `flat`
  ({path: abstract variable}); checkpoints without FP8 state load into FP8 models with these."""
  return {p: np.asarray(fp8.initial_value(p, v.shape)) for p, v in flat.items() if fp8.is_fp8_path(p)}
