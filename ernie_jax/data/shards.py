"""The global batch drawn from a fixed number of data shards, so that it does not depend on the process count.

With `run.data_shards = V`, shard v (v = 0 .. V-1) is its own pipeline over rows / documents v, v+V, v+2V, ...
of the source, and yields `global_batch_size / V` rows per step. Process p of P reads only the shards
p*V/P .. (p+1)*V/P - 1. The rows are laid out so that micro-batch a of the global batch is, for every shard in
order, that shard's a-th slice of rows: process p's local rows `[A * (V/P) * r/A, ...]` (A micro-batches,
r = rows per shard) then concatenate across processes into exactly the global batch a one-process run builds.
So a 1-process and a 2-process run (any P dividing V) see the same batches in the same order, and the data
position (every shard's, gathered by the trainer) resumes on any such process count.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ernie_jax.data.sources import DataError


class ShardedBatches:
  """This process's rows of each global batch, read from its data shards (see the module docstring).

  make(shard_index, shard_count, rows) -> a pipeline (a `GrainIterator`) over that shard yielding `rows` rows
  per step."""

  def __init__(self, make: Callable[[int, int, int], Any], *, shards: int, global_batch: int, grad_accum: int,
               process_index: int = 0, process_count: int = 1):
    if shards < 1 or shards % process_count:
      raise DataError(f"run.data_shards={shards} is not a multiple of the {process_count} processes")
    if global_batch % (shards * grad_accum):
      raise DataError(f"run.global_batch_size={global_batch} is not divisible by run.data_shards={shards} x "
                      f"run.grad_accum_steps={grad_accum}")
    self.shard_count, self.grad_accum = shards, grad_accum
    per = shards // process_count
    self.indices = list(range(process_index * per, (process_index + 1) * per))
    self.rows_per_shard = global_batch // shards
    self.pipelines = [make(i, shards, self.rows_per_shard) for i in self.indices]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(p) for p in self.pipelines]
    if len(parts) == 1:
      return parts[0]
    a = self.grad_accum
    out = {}
    for k in parts[0]:
      xs = [np.asarray(p[k]) for p in parts]
      split = np.stack([x.reshape((a, x.shape[0] // a) + x.shape[1:]) for x in xs], axis=1)  # [A, shards, r/A, ...]
      out[k] = split.reshape((-1,) + xs[0].shape[1:])
    return out

  # -- the position ------------------------------------------------------------------------------------------
  def get_state(self) -> dict[str, Any]:
    """{"shards": {"<shard index>": position}} of this process's shards (JSON-serialisable)."""
    return {"shards": {str(i): p.get_state() for i, p in zip(self.indices, self.pipelines)}}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resume from a position holding (at least) this process's shards: a `get_state`, or several merged
    (`merge_states`). A position of the single-pipeline layout (before data shards) counts as shard 0 of 1."""
    shards = state["shards"] if "shards" in state else {"0": state}
    missing = [i for i in self.indices if str(i) not in shards]
    if missing:
      raise DataError(f"the saved data position holds shards {sorted(shards, key=int)}, not shard {missing[0]} "
                      f"of this run's run.data_shards={self.shard_count}")
    for i, p in zip(self.indices, self.pipelines):
      p.set_state(shards[str(i)])

  # -- what the recipes report -------------------------------------------------------------------------------
  @property
  def num_documents(self) -> int:
    """Documents (rows, examples) in this process's shards."""
    return sum(p.num_documents for p in self.pipelines)

  @property
  def stats(self) -> dict[str, int]:
    """The fine-tuning pipelines' row counts ("rows", "truncated", ...), summed over this process's shards."""
    out: dict[str, int] = {}
    for p in self.pipelines:
      for k, v in p.stats.items():
        out[k] = out.get(k, 0) + v
    return out

  @property
  def first(self):
    """This process's first shard pipeline (for what every shard shares: renderer, template, tokenizer)."""
    return self.pipelines[0]


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
  """Every process's `ShardedBatches.get_state()` -> one position holding all shards."""
  out: dict[str, Any] = {}
  for s in states:
    out.update(s["shards"])
  return {"shards": dict(sorted(out.items(), key=lambda kv: int(kv[0])))}
