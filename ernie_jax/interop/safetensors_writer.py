"""Streaming safetensors writer: the header (with every offset) is written first from the known
names / dtypes / shapes, then each tensor's bytes as it is produced, so only one tensor is in
memory at a time. Also plans HF-style shards (`model-0000i-of-0000N.safetensors` + index)."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ernie_jax.interop.safetensors_io import DTYPES, CheckpointError

TAGS = {dt: tag for tag, dt in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
  name: str
  dtype: str  # safetensors tag: "BF16", "F32", ...
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize


def tag_of(dtype) -> str:
  return TAGS[np.dtype(dtype)]


def write_file(path: str, specs: list[TensorSpec], fetch: Callable[[str], np.ndarray],
               metadata: dict[str, str] | None = None) -> int:
  """Write one .safetensors file; `fetch(name)` is called once per tensor, in order, and must
  return an array of exactly the announced dtype and shape. Returns the bytes written."""
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for s in specs:
    header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
    offset += s.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for s in specs:
      x = fetch(s.name)
      if tuple(x.shape) != s.shape or x.dtype != DTYPES[s.dtype]:
        raise CheckpointError(f"internal error: tensor '{s.name}' is {x.dtype}{list(x.shape)}, "
                              f"announced {s.dtype}{list(s.shape)}")
      f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)  # bf16 has no buffer format
  return 8 + len(raw) + offset


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
  """Greedy, in order: start a new shard when the next tensor would exceed max_shard_bytes."""
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for s in specs:
    if shards[-1] and size + s.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(s)
    size += s.nbytes
  return shards


def shard_names(n: int) -> list[str]:
  if n == 1:
    return ["model.safetensors"]
  return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_checkpoint(directory: str, specs: list[TensorSpec], fetch: Callable[[str], np.ndarray],
                     max_shard_bytes: int) -> list[str]:
  """Write sharded safetensors (+ `model.safetensors.index.json` when more than one shard) into
  an existing directory. Returns the file names."""
  shards = plan_shards(specs, max_shard_bytes)
  names = shard_names(len(shards))
  for fn, shard in zip(names, shards):
    write_file(os.path.join(directory, fn), shard, fetch)
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
             "weight_map": {s.name: fn for fn, shard in zip(names, shards) for s in shard}}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  return names
