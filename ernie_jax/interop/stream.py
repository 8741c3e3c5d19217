"""The streaming engine: checked reads of a checkpoint -> parameter blocks.

A checkpoint's tensors are described by *reads* (`transforms.Read`, from the tables of a `Layout`):
one source tensor and the parameter slots it fills — a slot being a parameter path plus an index
into its stacked leading axes (layer repeat, expert). Reads that fill the same parameters form a
group (a fused `qkv_proj` ties q, k and v together); groups are processed one after another and
each parameter is emitted in *blocks* of at most `block_bytes` (one layer, one expert, or the whole
parameter when it is small). `Conversion` is the `orbax_io.BlockSource` the converters stream to
Orbax; `iter_params` yields whole parameters (`ernie_jax.from_pretrained`).

Peak host memory is therefore about the largest source tensor + its transformed copy + a few
blocks, independent of the model size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from ernie_jax.config import ModelConfig
from ernie_jax.interop.layouts import Layout, check_source
from ernie_jax.interop.safetensors_io import DTYPES, CheckpointError
from ernie_jax.interop.transforms import UINT, Read

DEFAULT_BLOCK_BYTES = 64 << 20


# The streaming engine
@dataclass
class _Param:
  shape: tuple[int, ...]
  dtype: np.dtype
  nidx: int = -1  # stacked leading axes addressed by slot indices
  lead: int = 0  # leading axes written one index at a time
  slots: int = 0

  @property
  def slot_shape(self):
    return self.shape[self.nidx:]

  @property
  def chunk_shape(self):
    return (1,) * self.lead + self.shape[self.lead:]

  @property
  def slots_per_block(self) -> int:
    return int(np.prod(self.shape[self.lead:self.nidx], dtype=np.int64))


@dataclass
class _Group:
  params: set[str] = field(default_factory=set)
  reads: list[Read] = field(default_factory=list)


class Conversion:
  """Turns checked reads into parameter blocks (an `orbax_io.BlockSource`).

  params: {path: (shape, dtype)} of the target model state. block_bytes: largest block to
  assemble (None: whole parameters)."""

  def __init__(self, reader, layout: Layout, reads: dict[str, Read], params: dict[str, tuple[tuple[int, ...], Any]],
               block_bytes: int | None = DEFAULT_BLOCK_BYTES, progress: Callable[[int], None] | None = None):
    self.reader, self.layout, self.progress = reader, layout, progress
    self.params = {p: _Param(tuple(s), np.dtype(d)) for p, (s, d) in params.items()}
    parent: dict[str, str] = {p: p for p in self.params}

    def find(p):
      while parent[p] != p:
        parent[p] = parent[parent[p]]
        p = parent[p]
      return p

    for read in reads.values():
      for s in read.slots:
        if s.path not in self.params:
          raise CheckpointError(f"internal error: '{read.name}' maps to unknown parameter '{s.path}'")
        prm = self.params[s.path]
        if prm.nidx not in (-1, len(s.index)):
          raise CheckpointError(f"internal error: inconsistent slot indices for '{s.path}'")
        prm.nidx = len(s.index)
        prm.slots += 1
        parent[find(s.path)] = find(read.slots[0].path)
    for path, prm in self.params.items():
      if prm.nidx < 0:
        raise CheckpointError(f"no tensor of the checkpoint fills parameter '{path}'")
      if prm.slots != int(np.prod(prm.shape[:prm.nidx], dtype=np.int64)):
        raise CheckpointError(f"internal error: {prm.slots} tensors fill parameter '{path}' {list(prm.shape)}")
      prm.lead = 0 if block_bytes is None else next(
        (j for j in range(prm.nidx + 1) if np.prod(prm.shape[j:], dtype=np.int64) * prm.dtype.itemsize <= block_bytes),
        prm.nidx)
    order = {p: i for i, p in enumerate(sorted(self.params))}
    groups: dict[str, _Group] = {}
    for read in reads.values():
      g = groups.setdefault(find(read.slots[0].path), _Group())
      g.reads.append(read)
      g.params.update(s.path for s in read.slots)
    for g in groups.values():
      g.reads.sort(key=lambda r: (r.slots[0].index, r.name))
    self.groups = sorted(groups.values(), key=lambda g: min(order[p] for p in g.params))

  def lead(self, path: str) -> int:
    return self.params[path].lead

  def blocks(self, paths=None) -> Iterator[tuple[str, tuple[int, ...], np.ndarray]]:
    paths = set(self.params) if paths is None else set(paths)
    for group in self.groups:
      if not group.params & paths:
        continue
      pending: dict[str, list] = {}
      for read in group.reads:
        info = self.reader.tensors[read.name]
        targets = [self.params[s.path].slot_shape for s in read.slots]
        x = self.layout.decode(self.reader.get(read.name), info.dtype)
        parts = read.to_params(x, targets)
        for slot, part in zip(read.slots, parts):
          if slot.path not in paths:
            continue
          prm = self.params[slot.path]
          key = slot.index[:prm.lead]
          if prm.slots_per_block == 1:  # the part is the block: no staging copy
            block = np.ascontiguousarray(part).astype(prm.dtype, copy=False)
            yield slot.path, key, block.reshape(prm.chunk_shape)
            continue
          cur = pending.get(slot.path)
          if cur is None:
            cur = pending[slot.path] = [key, np.empty(prm.chunk_shape, prm.dtype), 0]
          elif cur[0] != key:
            raise CheckpointError(f"internal error: blocks of '{slot.path}' out of order")
          _assign(cur[1][(0,) * prm.lead + slot.index[prm.lead:]], part)  # casts to the storage dtype
          cur[2] += 1
          if cur[2] == prm.slots_per_block:
            del pending[slot.path]
            yield slot.path, key, cur[1]
        del x, parts
        if self.progress is not None:
          self.progress(int(np.prod(info.shape, dtype=np.int64)) * DTYPES[info.dtype].itemsize)
      if pending:
        raise CheckpointError(f"internal error: parameter '{next(iter(pending))}' was not completely filled")


def _assign(dst: np.ndarray, src: np.ndarray) -> None:
  """dst[...] = src; same-dtype copies go through raw unsigned ints (bf16's copy loop is slow)."""
  u = UINT.get(dst.dtype.itemsize)
  if src.dtype == dst.dtype and u is not None and src.ndim:
    dst.view(u)[...] = src.view(u)
  else:
    dst[...] = src


def iter_params(reader, layout: Layout, cfg: ModelConfig, flat) -> Iterator[tuple[str, np.ndarray]]:
  """Check the checkpoint against `flat` ({path: abstract variable}) and yield (path, host
  array) one parameter (group) at a time, in the variables' dtypes."""
  shapes = {p: (tuple(v.shape), v.dtype) for p, v in flat.items()}
  reads = check_source(reader, layout, cfg, {p: s for p, (s, _) in shapes.items()})
  for path, _, arr in Conversion(reader, layout, reads, shapes, block_bytes=None).blocks():
    yield path, arr
