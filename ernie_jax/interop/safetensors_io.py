"""Minimal, dependency-free safetensors reader: header parsing, tensors read lazily on demand.

Reads single files and sharded checkpoints (`model.safetensors.index.json`). Tensors are only read
when asked for, one at a time, so peak memory is bounded by the largest tensor. bf16 is returned as
`ml_dtypes.bfloat16`; `U16` (Paddle's raw bf16 bits) is returned as uint16 for the caller to bit-cast.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
  """A checkpoint file or tensor is missing, malformed or does not match the model."""


DTYPES = {
  "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
  "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
  "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
  name: str
  file: str
  dtype: str  # safetensors dtype tag, e.g. "BF16"
  shape: tuple[int, ...]
  start: int  # absolute byte offsets in the file
  end: int


def read_header(path: str) -> dict[str, TensorInfo]:
  """Parse one .safetensors header and check every tensor lies inside the file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CheckpointError(f"{path}: truncated safetensors file (no header)")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER or 8 + n > size:
      raise CheckpointError(f"{path}: truncated or corrupt safetensors header (length {n}, file {size} bytes)")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
  base = 8 + n
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    tag, shape, (a, b) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
    if tag not in DTYPES:
      raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {tag}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[tag].itemsize
    if b - a != nbytes:
      raise CheckpointError(f"{path}: tensor '{name}' byte range {b - a} != {nbytes} for {tag}{list(shape)}")
    if base + b > size:
      raise CheckpointError(f"{path}: truncated file: tensor '{name}' ends at byte {base + b} "
                            f"but the file has {size} bytes")
    out[name] = TensorInfo(name, path, tag, shape, base + a, base + b)
  return out


def checkpoint_files(directory: str) -> list[str]:
  """The .safetensors files of a checkpoint directory (sharded via the index when present)."""
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map", {})
    files = sorted(set(weight_map.values()))
    for fn in files:
      if not os.path.exists(os.path.join(directory, fn)):
        raise CheckpointError(f"{index} names shard '{fn}', which does not exist")
    return [os.path.join(directory, fn) for fn in files]
  files = sorted(fn for fn in os.listdir(directory) if fn.endswith(".safetensors"))
  if not files:
    raise CheckpointError(f"no .safetensors files in {directory}")
  return [os.path.join(directory, fn) for fn in files]


class SafetensorsReader:
  """All tensors of a (possibly sharded) checkpoint, read lazily through memory maps."""

  def __init__(self, path: str):
    files = checkpoint_files(path) if os.path.isdir(path) else [path]
    self.tensors: dict[str, TensorInfo] = {}
    for fn in files:
      for name, info in read_header(fn).items():
        if name in self.tensors:
          raise CheckpointError(f"tensor '{name}' appears in both {self.tensors[name].file} and {fn}")
        self.tensors[name] = info
    self._files: dict[str, object] = {}

  def keys(self):
    return self.tensors.keys()

  def get(self, name: str) -> np.ndarray:
    """The tensor as a fresh numpy array, read straight into its buffer. (Plain reads, not a
    memory map: mapped pages would stay charged to the process's RSS for the whole conversion.)"""
    info = self.tensors[name]
    f = self._files.get(info.file)
    if f is None:
      f = self._files[info.file] = open(info.file, "rb")
    out = np.empty(info.shape, DTYPES[info.dtype])
    f.seek(info.start)
    n = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    if n != info.end - info.start:
      raise CheckpointError(f"{info.file}: truncated file: tensor '{name}' could only read {n} of "
                            f"{info.end - info.start} bytes")
    return out

  def close(self):
    for f in self._files.values():
      f.close()
    self._files.clear()
