"""The checkpointable iterator of every data pipeline (text: `ernie_jax.data.pipeline.DataPipeline`,
image-caption: `ernie_jax.data.vl.VLDataPipeline`).

A pipeline is an iterator of dicts of numpy arrays (this process's rows of one global batch) over a
grain iterator `self._it`. Its position is `get_state()`, a small JSON-serialisable dict saved with
every checkpoint; `set_state()` resumes exactly where it was, so a restarted run sees the same
batches. (grain states hold numpy integers, bytes and tuples; JSON holds ints, latin-1 strings and
lists: `get_state` / `set_state` convert.)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np


class GrainIterator:
  """A grain iterator `self._it` whose position is saved and restored as JSON."""

  _it: Any

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    """The iterator position, JSON-serialisable."""
    return json.loads(json.dumps(self._it.get_state(), default=_jsonable))

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(_from_json(state))


def _jsonable(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, bytes):
    return x.decode("latin-1")
  raise TypeError(f"data iterator state holds a {type(x).__name__}, which is not JSON-serialisable")


def _from_json(x):
  # grain states hold tuples (e.g. remainder slices); JSON returns lists
  if isinstance(x, dict):
    return {k: _from_json(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_from_json(v) for v in x)
  return x
