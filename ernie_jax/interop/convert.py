"""Checkpoint conversion: HF / Paddle safetensors -> Orbax, Orbax (or a model) -> HF safetensors.

Everything streams. A checkpoint's tensors are described by *reads* (data tables in `hf.py` and
`paddle.py`): one source tensor and the parameter slots it fills — a slot being a parameter path
plus an index into its stacked leading axes (layer repeat, expert). Reads that fill the same
parameters form a group (a fused `qkv_proj` ties q, k and v together); groups are processed one
after another and each parameter is emitted in *blocks* of at most `block_bytes` (one layer, one
expert, or the whole parameter when it is small), which go straight to the Orbax writer.

ERNIE 4.5 VL checkpoints (a VL config.json, `hf_vl.is_vl_checkpoint`) go through the same engine
with the VL tables (`hf_vl.py`, `paddle_vl.py`: layouts `HFVLLayout`, `PaddleVLLayout`); their
Orbax checkpoints record `"architecture": "ernie4_5_vl_moe"`, and `export_hf` writes them back as
transformers VL checkpoints.

Peak host memory while converting is therefore about
    largest source tensor + its transformed copy (the embedding / lm_head, or one expert)
    + a few blocks (<= block_bytes each: the one being assembled per parameter of the group, one
      prefetched, <= 64 MiB of uncommitted writes; see `orbax_io`)
— independent of the model size. benchmarks/convert_streaming.py measures it.

Output directories are written under a temporary sibling and renamed into place only when
complete; on any error nothing is left behind.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np

from ernie_jax.config import ModelConfig
from ernie_jax.interop import hf, hf_config, hf_vl, orbax_io, paddle, paddle_config, paddle_vl
from ernie_jax.interop.hf import Slot
from ernie_jax.interop.safetensors_io import DTYPES, CheckpointError, SafetensorsReader, TensorInfo
from ernie_jax.interop import safetensors_writer as stw
from ernie_jax.config import VLConfig

FORMATS = ("orbax", "hf", "paddle")
STORAGE_DTYPES = ("auto", "bfloat16", "float32", "float16")
DEFAULT_BLOCK_BYTES = 64 << 20
DEFAULT_SHARD_BYTES = 5 << 30
_TAG_DTYPES = {"F32": "float32", "BF16": "bfloat16", "U16": "bfloat16", "F16": "float16"}
_FP32_PARAMS = ("router/kernel", "router/correction_bias")  # always fp32 (model and HF agree)


# ==================================================================================================
# Sources
class PickleReader:
  """Tensors of pickle checkpoints (torch `.bin`, Paddle `.pdparams`), loaded only on request
  (`allow_pickle`): unpickling can run arbitrary code. Whole files are loaded (torch memory-maps)."""

  def __init__(self, files: list[str], kind: str):
    self.tensors: dict[str, TensorInfo] = {}
    self._arrays: dict[str, Any] = {}
    for fn in files:
      for name, t in self._load(fn, kind).items():
        if name in self.tensors:
          raise CheckpointError(f"tensor '{name}' appears in two files (second: {fn})")
        arr = self._to_numpy(t)
        if arr is None:  # non-tensor entries (Paddle's StructuredToParameterName@@ etc.)
          continue
        tag = "U16" if arr.dtype == np.uint16 else stw.TAGS.get(arr.dtype)
        if tag is None:
          raise CheckpointError(f"{fn}: tensor '{name}' has unsupported dtype {arr.dtype}")
        self.tensors[name] = TensorInfo(name, fn, tag, tuple(arr.shape), 0, 0)
        self._arrays[name] = arr

  @staticmethod
  def _load(fn: str, kind: str) -> dict:
    if kind == "torch":
      import torch

      return torch.load(fn, map_location="cpu", weights_only=True, mmap=True)
    try:
      import paddle as paddle_framework  # noqa: F401
    except ImportError:
      raise CheckpointError(f"{fn}: reading .pdparams needs paddlepaddle, which is not installed "
                            "(pip install paddlepaddle, ideally in a separate environment, or convert "
                            "the checkpoint to safetensors with PaddleFormers first)") from None
    return paddle_framework.load(fn, return_numpy=True)

  @staticmethod
  def _to_numpy(t):
    if isinstance(t, np.ndarray):
      return t
    if type(t).__module__.startswith("torch"):
      import torch

      if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
      return t.numpy()
    return None

  def keys(self):
    return self.tensors.keys()

  def get(self, name: str) -> np.ndarray:
    return np.asarray(self._arrays[name])

  def close(self):
    self._arrays.clear()


def _pickle_files(path: str) -> tuple[list[str], str] | None:
  for index, kind in (("pytorch_model.bin.index.json", "torch"), ("model_state.pdparams.index.json", "paddle")):
    fn = os.path.join(path, index)
    if os.path.exists(fn):
      with open(fn) as f:
        files = sorted(set(json.load(f).get("weight_map", {}).values()))
      return [os.path.join(path, x) for x in files], kind
  for pattern, kind in (("*.bin", "torch"), ("*.pdparams", "paddle")):
    files = sorted(glob.glob(os.path.join(path, pattern)))
    files = [f for f in files if not os.path.basename(f).startswith("training_args")]
    if files:
      return files, kind
  return None


def _has_safetensors(path: str) -> bool:
  return (os.path.exists(os.path.join(path, "model.safetensors.index.json"))
          or bool(glob.glob(os.path.join(path, "*.safetensors"))))


def open_source(path: str, *, allow_pickle: bool = False):
  """A reader (`tensors`, `keys()`, `get(name)`, `close()`) over a checkpoint directory's weights:
  safetensors (single or sharded), or, with allow_pickle, torch `.bin` / Paddle `.pdparams`."""
  if _has_safetensors(path):
    return SafetensorsReader(path)
  found = _pickle_files(path)
  if found is None:
    raise CheckpointError(f"no .safetensors (or .bin / .pdparams) weight files in {path}")
  files, kind = found
  if not allow_pickle:
    raise CheckpointError(f"{files[0]} is a pickle file ({'torch .bin' if kind == 'torch' else 'Paddle .pdparams'}):"
                          " unpickling can run arbitrary code, so it is refused. Use a safetensors "
                          "checkpoint, or pass allow_pickle=True (--allow-pickle) if you trust the file")
  return PickleReader(files, kind)


def detect_format(path: str | os.PathLike) -> str:
  """'orbax', 'hf' or 'paddle' for a checkpoint directory (from its files and tensor names)."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint directory not found: {path}")
  if orbax_io.is_orbax_checkpoint(path):
    return "orbax"
  if not os.path.exists(os.path.join(path, "config.json")):
    raise CheckpointError(f"{path} has no config.json")
  if _has_safetensors(path):
    reader = SafetensorsReader(path)
    names = list(reader.keys())
    reader.close()
  else:
    found = _pickle_files(path)
    if found is None:
      raise CheckpointError(f"no .safetensors (or .bin / .pdparams) weight files in {path}")
    if found[1] == "paddle":
      return "paddle"
    names = []
  return "paddle" if paddle.detect_variant(names) else "hf"


def read_config(path: str, fmt: str, **overrides) -> ModelConfig | VLConfig:
  if fmt in ("hf", "paddle") and hf_vl.is_vl_checkpoint(path):  # ERNIE 4.5 VL (config.json)
    return (hf_config.read_vl if fmt == "hf" else paddle_config.read_vl)(path, **overrides)
  if fmt == "hf":
    return hf_config.read_text(path, **overrides)
  if fmt == "paddle":
    return paddle_config.read_text(path, **overrides)
  if fmt == "orbax":
    return orbax_io.load_config(path, **overrides)
  raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {FORMATS}")


# ==================================================================================================
# Layouts: a checkpoint's tensor names as reads, with their shape rules and transforms
@dataclass(frozen=True)
class Read:
  name: str  # source tensor
  slots: tuple[Slot, ...]  # parameter slots it fills, in the order `to_params` returns them
  fuse: str = "none"


class HFLayout:
  name = "hf"
  dtypes = ("F32", "BF16", "F16")

  def reads(self, cfg: ModelConfig) -> dict[str, Read]:
    return {n: Read(n, (s,)) for n, s in hf.hf_name_map(cfg).items()}

  def source_shape(self, read: Read, targets) -> tuple[int, ...]:
    return hf.hf_shape(read.slots[0].kind, targets[0])

  def to_params(self, read: Read, x: np.ndarray, targets) -> list[np.ndarray]:
    return [hf.to_param(read.slots[0].kind, x, targets[0])]

  def decode(self, x: np.ndarray, tag: str) -> np.ndarray:
    return x

  def ignorable(self, cfg, name):
    return hf.ignorable(cfg, name)

  def describe_unexpected(self, cfg, name):
    return hf.describe_unexpected(cfg, name)

  # export (Orbax / model -> HF)
  def from_params(self, read: Read, values: list[np.ndarray]) -> np.ndarray:
    return hf.from_param(read.slots[0].kind, values[0])

  def absent_bias(self, cfg) -> list[tuple[str, tuple[int, ...]]]:
    """Tensors transformers always has but the model may lack (the correction bias): zeros."""
    if not cfg.is_moe or cfg.moe_use_correction_bias:
      return []
    return [(f"model.layers.{i}.mlp.moe_statics.e_score_correction_bias", (1, cfg.moe_num_experts))
            for i, kind in enumerate(cfg.layer_kinds) if kind == "moe"]

  def hf_config(self, cfg, dtype: str) -> dict:
    return hf_config.write_text(cfg, dtype)


class HFVLLayout(HFLayout):
  """ERNIE 4.5 VL HF checkpoints (`hf_vl` tables); the vision prefix is detected from the names."""

  name = "hf/vl"

  def __init__(self, names=()):
    self.vision_prefix = hf_vl.detect_vision_prefix(names)

  def reads(self, cfg: VLConfig) -> dict[str, Read]:
    return {n: Read(n, tuple(s)) for n, s in hf_vl.vl_name_map(cfg, self.vision_prefix).items()}

  def source_shape(self, read: Read, targets) -> tuple[int, ...]:
    return hf_vl.source_shape(read.slots, targets)

  def to_params(self, read: Read, x: np.ndarray, targets) -> list[np.ndarray]:
    return hf_vl.to_params(read.slots, x, targets)

  def ignorable(self, cfg, name):
    return hf_vl.ignorable(cfg, name)

  def describe_unexpected(self, cfg, name):
    return hf_vl.describe_unexpected(cfg, name, self.vision_prefix)

  def from_params(self, read: Read, values: list[np.ndarray]) -> np.ndarray:
    return hf_vl.from_params(read.slots, values)

  def absent_bias(self, cfg) -> list[tuple[str, tuple[int, ...]]]:
    return hf_vl.absent_bias(cfg)

  def hf_config(self, cfg, dtype: str) -> dict:
    return hf_config.write_vl(cfg, dtype)


class PaddleLayout:
  dtypes = paddle.ACCEPTED_DTYPES

  def __init__(self, variant: str = "native"):
    self.variant = variant
    self.name = f"paddle/{variant}"

  def reads(self, cfg: ModelConfig) -> dict[str, Read]:
    return {n: Read(n, t.slots, t.fuse) for n, t in paddle.paddle_name_map(cfg, self.variant).items()}

  def source_shape(self, read: Read, targets) -> tuple[int, ...]:
    return paddle.paddle_shape(paddle.PaddleTensor(read.slots, read.fuse), targets)

  def to_params(self, read: Read, x: np.ndarray, targets) -> list[np.ndarray]:
    return paddle.to_params(paddle.PaddleTensor(read.slots, read.fuse), x, targets)

  def decode(self, x: np.ndarray, tag: str) -> np.ndarray:
    return paddle.decode(x, tag)

  def ignorable(self, cfg, name):
    return paddle.ignorable(cfg, name)

  def describe_unexpected(self, cfg, name):
    return paddle.describe_unexpected(cfg, name)


class PaddleVLLayout(PaddleLayout):
  """ERNIE 4.5 VL `-Paddle` checkpoints (`paddle_vl` tables: the native layout plus vision,
  resampler and two-modality MoE); the vision prefix is detected from the names."""

  def __init__(self, names=()):
    super().__init__("native")
    self.name = "paddle/vl"
    self.vision_prefix = hf_vl.detect_vision_prefix(names, paddle_vl.VISION_PREFIXES)

  def reads(self, cfg: VLConfig) -> dict[str, Read]:
    return {n: Read(n, t.slots, t.fuse) for n, t in paddle_vl.paddle_vl_name_map(cfg, self.vision_prefix).items()}

  # fuse "rows" (the [2, E] correction bias) has the HF layout's row slots; the rest is text Paddle
  def source_shape(self, read: Read, targets) -> tuple[int, ...]:
    rows = read.fuse == "rows"
    return hf_vl.source_shape(read.slots, targets) if rows else super().source_shape(read, targets)

  def to_params(self, read: Read, x: np.ndarray, targets) -> list[np.ndarray]:
    return hf_vl.to_params(read.slots, x, targets) if read.fuse == "rows" else super().to_params(read, x, targets)

  def describe_unexpected(self, cfg, name):
    return paddle_vl.describe_unexpected(cfg, name, self.vision_prefix)


def layout_for(fmt: str, names, cfg=None) -> HFLayout | PaddleLayout:
  """The tensor layout of a checkpoint of format `fmt` with tensor `names`; a VLConfig `cfg`
  selects the VL tables."""
  if isinstance(cfg, VLConfig):
    names = list(names)
    if fmt == "hf":
      return HFVLLayout(names)
    if fmt == "paddle":
      if (paddle.detect_variant(names) or "native") != "native":
        raise CheckpointError("this ERNIE 4.5 VL checkpoint is in PaddleFormers' save_to_hf=False layout "
                              "(`model.` prefix, GQA-grouped qkv), which is only supported for the text "
                              "models; save it with PaddleFormers' default (HF) layout instead")
      return PaddleVLLayout(names)
  if fmt == "hf":
    return HFLayout()
  if fmt == "paddle":
    return PaddleLayout(paddle.detect_variant(names) or "native")
  raise ValueError(f"no tensor layout for format {fmt!r}")


def _where(reader) -> str:
  files = sorted({i.file for i in reader.tensors.values()})
  return os.path.dirname(files[0]) if files else "?"


def check_source(reader, layout, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, Read]:
  """Names, shapes and dtypes from the headers against the config, before reading any data.

  shapes: {parameter path: full parameter shape}. Every error names the tensor and its file."""
  reads = layout.reads(cfg)
  present = set(reader.keys())
  unexpected = sorted(n for n in present - set(reads) if not layout.ignorable(cfg, n))
  if unexpected:
    n = unexpected[0]
    raise CheckpointError(f"unexpected tensor '{n}' in {os.path.dirname(reader.tensors[n].file) or _where(reader)}: "
                          f"{layout.describe_unexpected(cfg, n)}"
                          + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
  missing = sorted(set(reads) - present)
  if missing:
    raise CheckpointError(f"missing tensor '{missing[0]}' in {_where(reader)}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  for name, read in reads.items():
    info = reader.tensors[name]
    targets = [tuple(shapes[s.path][len(s.index):]) for s in read.slots]
    want = tuple(layout.source_shape(read, targets))
    if tuple(info.shape) != want:
      raise CheckpointError(f"tensor '{name}' has shape {list(info.shape)}, expected {list(want)} "
                            f"for the config ({info.file})")
    if info.dtype not in layout.dtypes:
      raise CheckpointError(f"tensor '{name}' has dtype {info.dtype}; expected "
                            f"{', '.join(layout.dtypes[:-1])} or {layout.dtypes[-1]} ({info.file})")
  return reads


# ==================================================================================================
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

  def __init__(self, reader, layout, reads: dict[str, Read], params: dict[str, tuple[tuple[int, ...], Any]],
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
        parts = self.layout.to_params(read, x, targets)
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
  u = hf._UINT.get(dst.dtype.itemsize)
  if src.dtype == dst.dtype and u is not None and src.ndim:
    dst.view(u)[...] = src.view(u)
  else:
    dst[...] = src


def iter_params(reader, layout, cfg: ModelConfig, flat) -> Iterator[tuple[str, np.ndarray]]:
  """Check the checkpoint against `flat` ({path: abstract variable}) and yield (path, host
  array) one parameter (group) at a time, in the variables' dtypes."""
  shapes = {p: (tuple(v.shape), v.dtype) for p, v in flat.items()}
  reads = check_source(reader, layout, cfg, {p: s for p, (s, _) in shapes.items()})
  for path, _, arr in Conversion(reader, layout, reads, shapes, block_bytes=None).blocks():
    yield path, arr


def _abstract_params(cfg: ModelConfig | VLConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  from ernie_jax.loading import _flat_state, abstract_model

  _, abstract = abstract_model(cfg)
  return {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in _flat_state(abstract).items()}


def _storage_dtype(dtype: str, reader, reads: dict[str, Read]) -> str:
  if dtype != "auto":
    if dtype not in STORAGE_DTYPES:
      raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    return dtype
  tags = {reader.tensors[r.name].dtype for r in reads.values()
          if not any(s.path.endswith(_FP32_PARAMS) for s in r.slots)}
  kinds = {_TAG_DTYPES.get(t, "float32") for t in tags}
  return kinds.pop() if len(kinds) == 1 else "float32"


def _lossy(storage: str, reader, reads) -> bool:
  """Whether storing in `storage` rounds some source tensor."""
  rank = {"float32": 2, "bfloat16": 1, "float16": 1}
  for r in reads.values():
    if any(s.path.endswith(_FP32_PARAMS) for s in r.slots):
      continue
    src = _TAG_DTYPES.get(reader.tensors[r.name].dtype, "float32")
    if src != storage and rank[src] >= rank[storage]:
      return True
  return False


# ==================================================================================================
# Atomic output directories
@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike, overwrite: bool = False):
  """Yield a path (not yet existing) to write the output to; on success it is renamed to `dst`
  (replacing it when overwrite), on error it is removed. It lives in a temporary directory next
  to `dst`, so the rename stays on one file system."""
  dst = os.path.abspath(os.fspath(dst))
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f"output {dst} already exists (pass overwrite=True / --overwrite to replace it)")
  parent = os.path.dirname(dst)
  made = []
  p = parent
  while not os.path.exists(p):
    made.append(p)
    p = os.path.dirname(p)
  os.makedirs(parent, exist_ok=True)
  work = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
  ok = False
  try:
    out = os.path.join(work, "out")
    yield out
    if not os.path.isdir(out):
      raise CheckpointError(f"internal error: nothing was written for {dst}")
    if os.path.lexists(dst):
      if not overwrite:
        raise FileExistsError(f"output {dst} appeared while converting (pass --overwrite to replace it)")
      old = os.path.join(work, "old")
      os.rename(dst, old)
      try:
        os.rename(out, dst)
      except BaseException:
        os.rename(old, dst)
        raise
    else:
      os.rename(out, dst)
    ok = True
  finally:
    shutil.rmtree(work, ignore_errors=True)
    if not ok:
      for d in made:  # parents we created, innermost first
        with contextlib.suppress(OSError):
          os.rmdir(d)


# ==================================================================================================
# HF / Paddle -> Orbax
@dataclass
class ConversionReport:
  input: str
  output: str
  format: str  # "hf", "paddle/native", ...
  config: ModelConfig
  storage_dtype: str
  lossy: bool  # some source tensor was rounded to storage_dtype
  tensors: int
  bytes_read: int
  seconds: float


def convert_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, *, format: str = "auto",
                     dtype: str = "auto", overwrite: bool = False, allow_pickle: bool = False,
                     config: ModelConfig | None = None, block_bytes: int = DEFAULT_BLOCK_BYTES,
                     before_commit: Callable[[str, "ConversionReport"], None] | None = None,
                     log: Callable[[str], None] | None = None) -> ConversionReport:
  """Convert an HF or Paddle checkpoint directory into an Orbax checkpoint at `dst`.

  format: "auto" | "hf" | "paddle". dtype: parameter storage dtype, "auto" keeps the source's
  (bf16 stays bf16; router weight and correction bias are always fp32). config: use this
  ModelConfig instead of the directory's config.json. before_commit(tmp_dir, report): called on
  the complete output before it is moved into place (e.g. verification); raising discards it.
  """
  t0 = time.perf_counter()
  src = os.fspath(src)
  fmt = detect_format(src) if format == "auto" else format
  if fmt not in ("hf", "paddle"):
    raise CheckpointError(f"{src}: cannot convert from format {fmt!r} (expected 'hf' or 'paddle')")
  with atomic_output(dst, overwrite) as out:
    reader = open_source(src, allow_pickle=allow_pickle)
    try:
      cfg = config or read_config(src, fmt)
      layout = layout_for(fmt, reader.keys(), cfg)
      probe = _abstract_params(cfg.replace(param_dtype="bfloat16"))
      reads = check_source(reader, layout, cfg, {p: s for p, (s, _) in probe.items()})
      storage = _storage_dtype(dtype, reader, reads)
      cfg = cfg.replace(param_dtype=storage)
      params = _abstract_params(cfg)
      total = sum(int(np.prod(i.shape, dtype=np.int64)) * DTYPES[i.dtype].itemsize
                  for n, i in reader.tensors.items() if n in reads)
      done = [0, time.perf_counter(), 0.0]

      def progress(nbytes):
        done[0] += nbytes
        if log and (done[0] >= total or time.perf_counter() - done[1] > 10):
          done[1] = time.perf_counter()
          log(f"  {done[0] / 1e9:.2f} / {total / 1e9:.2f} GB")

      if log:
        log(f"{src}: {layout.name} layout, {len(reads)} tensors, {total / 1e9:.2f} GB -> {storage} parameters")
      conv = Conversion(reader, layout, reads, params, block_bytes=block_bytes, progress=progress)
      arrays = {p: orbax_io.StreamedArray(p, s, d, conv.lead(p), conv) for p, (s, d) in params.items()}
      orbax_io.save_state(out, arrays, cfg, metadata={"source": {
        "path": os.path.abspath(src), "format": layout.name, "storage_dtype": storage}})
      report = ConversionReport(src, os.fspath(dst), layout.name, cfg, storage,
                                _lossy(storage, reader, reads), len(reads), total, time.perf_counter() - t0)
    finally:
      reader.close()
    if before_commit is not None:
      before_commit(out, report)
  return report


# ==================================================================================================
# Orbax / model -> HF
class _ModelParams:
  """Read access to an in-memory model's parameters with the OrbaxReader interface."""

  def __init__(self, model):
    from flax import nnx

    self.config = model.config
    self._flat = {"/".join(str(k) for k in p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}

  def shape(self, path):
    return tuple(self._flat[path].shape)

  def dtype(self, path):
    return np.dtype(self._flat[path].dtype)

  def read(self, path, index=()):
    return np.asarray(self._flat[path][index])

  def close(self):
    pass


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def export_hf(src, dst: str | os.PathLike, *, dtype: str = "auto", overwrite: bool = False,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              before_commit: Callable[[str, dict], None] | None = None,
              log: Callable[[str], None] | None = None) -> dict:
  """Write an HF-layout checkpoint (safetensors shards + index + config.json) that transformers
  loads. src: an Orbax checkpoint directory or an `ErnieForCausalLM` (or an ERNIE 4.5 VL
  checkpoint / `Ernie45VLForConditionalGeneration`: a transformers VL checkpoint is written).
  Tensors are read, transposed and written one at a time. dtype: "auto" keeps each parameter's
  stored dtype (the router weight and correction bias are always fp32). before_commit(tmp_dir,
  report): see `convert_to_orbax`."""
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
  if os.path.lexists(dst) and not overwrite:  # fail before reading anything
    raise FileExistsError(f"output {os.path.abspath(dst)} already exists (pass overwrite=True / "
                          "--overwrite to replace it)")
  params = orbax_io.OrbaxReader(src) if isinstance(src, (str, os.PathLike)) else _ModelParams(src)
  try:
    cfg = params.config
    layout = HFVLLayout() if isinstance(cfg, VLConfig) else HFLayout()
    names = layout.reads(cfg)
    slots = [s for r in names.values() for s in r.slots]
    specs, fetchers = [], {}

    def out_dtype(path):
      if path.endswith(_FP32_PARAMS):
        return np.dtype(np.float32)
      return params.dtype(path) if dtype == "auto" else np.dtype(dtype if dtype != "bfloat16" else ml_dtypes.bfloat16)

    # parameter-major order (all slices of one parameter in a row): each storage chunk is read once
    for name in sorted(names, key=lambda n: (names[n].slots[0].path, names[n].slots[0].index)):
      read = names[name]
      targets = [params.shape(s.path)[len(s.index):] for s in read.slots]
      dt = out_dtype(read.slots[0].path)
      specs.append(stw.TensorSpec(name, stw.tag_of(dt), tuple(layout.source_shape(read, targets))))
      fetchers[name] = (lambda r=read, d=dt: layout.from_params(
        r, [params.read(s.path, s.index) for s in r.slots]).astype(d, copy=False))
    for name, shape in layout.absent_bias(cfg):  # transformers always has the bias: zeros
      specs.append(stw.TensorSpec(name, "F32", shape))
      fetchers[name] = lambda shape=shape: np.zeros(shape, np.float32)
    stored = {params.dtype(s.path) for s in slots if not s.path.endswith(_FP32_PARAMS)}
    config_dtype = dtype if dtype != "auto" else ("bfloat16" if stored == {np.dtype(ml_dtypes.bfloat16)}
                                                  else "float16" if stored == {np.dtype(np.float16)} else "float32")
    hf_cfg = layout.hf_config(cfg, config_dtype)
    t0 = time.perf_counter()
    total = sum(s.nbytes for s in specs)
    with atomic_output(dst, overwrite) as out:
      os.makedirs(out)
      files = stw.write_checkpoint(out, specs, lambda n: fetchers[n](), max_shard_bytes)
      with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
      with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                   "pad_token_id": cfg.pad_token_id}, f, indent=2)
      report = {"tensors": len(specs), "bytes": total, "files": files,
                "seconds": time.perf_counter() - t0, "dtype": config_dtype,
                "lossy": any(out_dtype(s.path) != params.dtype(s.path)
                             and out_dtype(s.path).itemsize <= params.dtype(s.path).itemsize
                             for s in slots)}
      if before_commit is not None:
        before_commit(out, report)
    if log:
      log(f"wrote {len(specs)} tensors, {total / 1e9:.2f} GB in {len(files)} file(s) to {dst}")
    return report
  finally:
    params.close()


# ==================================================================================================
# Verification against transformers
@dataclass
class VerifyResult:
  max_abs: float
  rel: float  # max_abs / max |reference logit|
  top1: float  # fraction of positions whose argmax agrees
  tolerance: float
  min_top1: float

  @property
  def ok(self) -> bool:
    return self.rel <= self.tolerance and self.top1 >= self.min_top1

  def __str__(self):
    return (f"max |Δ logits| = {self.max_abs:.3e} ({self.rel:.3e} of max |ref|, tolerance {self.tolerance:.0e}); "
            f"top-1 agreement {self.top1:.2%} (need ≥ {self.min_top1:.0%}): {'OK' if self.ok else 'FAILED'}")


def verify(orbax_dir, hf_dir, *, lossy: bool = False, tolerance: float | None = None, batch: int = 2,
           seq: int = 16, seed: int = 0) -> VerifyResult:
  """Logits of our model loaded from `orbax_dir` vs transformers' from `hf_dir` (both fp32
  compute) on random token sequences (for a VL model: two prompts with an image each, see
  `hf_vl.reference_logits`). Needs torch + transformers."""
  try:
    import torch
    import transformers
  except ImportError:
    raise RuntimeError("--verify needs torch and transformers (pip install 'ernie-jax[convert]')") from None
  import jax.numpy as jnp

  ours = orbax_io.load_model(orbax_dir, dtype="float32", param_dtype="float32")
  cfg = ours.config
  if isinstance(cfg, VLConfig):
    a, b = hf_vl.reference_logits(ours, hf_dir, seed=seed)
    return _verify_result(a, b, lossy, tolerance)
  tokens = np.random.RandomState(seed).randint(min(3, cfg.vocab_size - 1), cfg.vocab_size, size=(batch, seq))
  a = np.asarray(ours(jnp.asarray(tokens, jnp.int32)).logits, np.float64)
  del ours
  try:
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  except TypeError:  # transformers 4.x
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
  with torch.no_grad():
    b = ref.eval()(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy().astype(np.float64)
  return _verify_result(a, b, lossy, tolerance)


def _verify_result(a: np.ndarray, b: np.ndarray, lossy: bool, tolerance: float | None) -> VerifyResult:
  diff = float(np.abs(a - b).max())
  tol = tolerance if tolerance is not None else (5e-2 if lossy else 1e-4)
  return VerifyResult(diff, diff / max(float(np.abs(b).max()), 1e-30),
                      float((a.argmax(-1) == b.argmax(-1)).mean()), tol, 0.9 if lossy else 0.99)


@contextlib.contextmanager
def paddle_reference(src: str, cfg: ModelConfig, *, allow_pickle: bool = False, near: str | None = None):
  """A temporary HF checkpoint made from a Paddle one by the official Paddle -> HF rules
  (`paddle.reference_hf_tensors`, or `paddle_vl.reference_hf_tensors` for VL; independent of
  the conversion tables), for `verify`."""
  reader = open_source(src, allow_pickle=allow_pickle)
  work = tempfile.mkdtemp(prefix=".paddle-reference-", dir=near)
  try:
    variant = paddle.detect_variant(reader.keys()) or "native"
    get = lambda n: paddle.decode(reader.get(n), reader.tensors[n].dtype)
    names = sorted(reader.keys(), key=_natural_key)
    vl = isinstance(cfg, VLConfig)
    tensors = dict(paddle_vl.reference_hf_tensors(get, names, cfg) if vl
                   else paddle.reference_hf_tensors(get, names, cfg, variant))
    specs = [stw.TensorSpec(n, stw.tag_of(x.dtype), tuple(x.shape)) for n, x in tensors.items()]
    stw.write_checkpoint(work, specs, tensors.__getitem__, DEFAULT_SHARD_BYTES)
    tensors.clear()
    with open(os.path.join(work, "config.json"), "w") as f:
      json.dump(hf_config.write(cfg, "float32"), f)
    yield work
  finally:
    reader.close()
    shutil.rmtree(work, ignore_errors=True)


# ==================================================================================================
# Command-line plumbing shared by tools/convert/*.py
class VerificationFailed(Exception):
  """--verify found the converted model disagreeing with the reference."""


EXIT_OK, EXIT_ERROR, EXIT_VERIFY = 0, 1, 3


def parse_size(text: str) -> int:
  """'5GB', '500MB', '64KiB' or a number of bytes."""
  m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
  if not m:
    raise ValueError(f"cannot parse size {text!r} (e.g. 5GB, 500MB)")
  base = 1024 if m.group(3) else 1000
  return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def require_transformers() -> None:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError:
    raise RuntimeError("--verify needs torch and transformers (pip install 'ernie-jax[convert]'), "
                       "or drop --verify") from None


def run_cli(fn: Callable[[], None]) -> int:
  """Run a converter, mapping failures to a one-line message and an exit code."""
  import sys

  from ernie_jax.config import ConfigError

  try:
    fn()
  except VerificationFailed as e:
    print(f"verification FAILED: {e}; nothing was written", file=sys.stderr)
    return EXIT_VERIFY
  except (CheckpointError, ConfigError, FileExistsError, FileNotFoundError, ValueError, RuntimeError,
          NotADirectoryError, PermissionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_ERROR
  return EXIT_OK


def limit_heap_retention(threshold: int = 1 << 20) -> bool:
  """Have glibc serve allocations >= threshold with mmap (returned to the OS on free).

  Streaming allocates and frees many block-sized buffers from several threads; with glibc's
  default (a dynamic threshold up to 32 MiB, one heap arena per thread) freed blocks stay in the
  heaps and the peak RSS creeps up with the number of tensors (by ~90 MiB from 1 to 4 GB in
  benchmarks/convert_streaming.py). The CLIs call this; it is a no-op off glibc."""
  try:
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
  except (OSError, AttributeError):
    return False


def _parser(description: str):
  import argparse

  return argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def _log(quiet: bool):
  import sys

  return None if quiet else (lambda m: print(m, file=sys.stderr, flush=True))


_HELP_DTYPE = ("parameter dtype written. auto (default): keep the checkpoint's (bf16 stays bf16, fp32 "
               "stays fp32; mixed -> float32). The MoE router weight and correction bias are always "
               "float32. A narrower dtype rounds the weights (--verify then uses the looser tolerance).")
_HELP_VERIFY = ("before moving the output into place, run it and the transformers reference on a few "
                "random token sequences (fp32 compute), print max |Δ logits| and top-1 agreement, and "
                "fail with exit status 3 (writing nothing) beyond --tolerance. Needs torch + "
                "transformers and host memory for both models.")
_HELP_TOL = ("largest max |Δ logits| / max |reference logit| --verify accepts (default 1e-4, or 5e-2 "
             "with ≥ 90%% top-1 agreement when --dtype rounds the weights)")
_HELP_OVERWRITE = ("replace --output if it exists; the old directory is removed only once the new one "
                   "is complete. Without it an existing --output is an error.")


def main_to_orbax(fmt: str, description: str, argv=None) -> int:
  """`tools/convert/{hf,paddle}_to_orbax.py`."""
  import sys

  what = "Hugging Face" if fmt == "hf" else "Paddle"
  p = _parser(description)
  p.add_argument("--input", required=True, metavar="DIR",
                 help=f"{what} checkpoint directory: config.json + *.safetensors (one file, or shards "
                      "with model.safetensors.index.json)")
  p.add_argument("--output", required=True, metavar="DIR",
                 help="Orbax checkpoint directory to create (items 'state' and 'model_config')")
  p.add_argument("--dtype", choices=STORAGE_DTYPES, default="auto", help=_HELP_DTYPE)
  p.add_argument("--verify", action="store_true", help=_HELP_VERIFY)
  p.add_argument("--tolerance", type=float, default=None, help=_HELP_TOL)
  p.add_argument("--overwrite", action="store_true", help=_HELP_OVERWRITE)
  p.add_argument("--allow-pickle", action="store_true",
                 help="also read pickle weight files (torch .bin, Paddle .pdparams; the latter need "
                      "paddlepaddle). Unpickling can execute arbitrary code: only for files you "
                      "trust. Pickle files are loaded whole, without streaming.")
  p.add_argument("--block-mb", type=float, default=DEFAULT_BLOCK_BYTES / 2**20, metavar="MIB",
                 help="largest block assembled in memory, in MiB (default %(default)g). Bigger "
                      "parameters are written one layer / one expert at a time, which also becomes "
                      "their storage chunk.")
  p.add_argument("--quiet", action="store_true", help="print only errors and the final summary")
  args = p.parse_args(argv)
  limit_heap_retention()

  def check(out: str, report: ConversionReport):
    if fmt == "hf":
      ref = contextlib.nullcontext(args.input)
    else:
      ref = paddle_reference(args.input, report.config, allow_pickle=args.allow_pickle,
                             near=os.path.dirname(out))
    with ref as ref_dir:
      result = verify(out, ref_dir, lossy=report.lossy, tolerance=args.tolerance)
    print(f"verify: {result}")
    if not result.ok:
      raise VerificationFailed(str(result))

  def run():
    if args.verify:
      require_transformers()
    found = detect_format(args.input)
    if found != fmt:
      other = {"hf": "hf_to_orbax.py", "paddle": "paddle_to_orbax.py", "orbax": "orbax_to_hf.py"}[found]
      raise CheckpointError(f"{args.input} is a {found} checkpoint, not {fmt}: use {other}")
    r = convert_to_orbax(args.input, args.output, format=fmt, dtype=args.dtype,
                         overwrite=args.overwrite, allow_pickle=args.allow_pickle,
                         block_bytes=int(args.block_mb * 2**20),
                         before_commit=check if args.verify else None, log=_log(args.quiet))
    print(f"{r.input} ({r.format}) -> {r.output}: {r.tensors} tensors, {r.bytes_read / 1e9:.3f} GB, "
          f"{r.storage_dtype} parameters, {r.seconds:.1f} s")

  return run_cli(run)


def main_to_hf(description: str, argv=None) -> int:
  """`tools/convert/orbax_to_hf.py`."""
  p = _parser(description)
  p.add_argument("--input", required=True, metavar="DIR",
                 help="ernie_jax Orbax checkpoint (or a CheckpointManager directory: latest step)")
  p.add_argument("--output", required=True, metavar="DIR",
                 help="HF checkpoint directory to create: *.safetensors (+ index), config.json, "
                      "generation_config.json")
  p.add_argument("--dtype", choices=STORAGE_DTYPES, default="auto", help=_HELP_DTYPE)
  p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                 help="largest safetensors shard, e.g. 5GB (default), 500MB; one shard is written "
                      "as model.safetensors")
  p.add_argument("--verify", action="store_true", help=_HELP_VERIFY.replace(
    "the transformers reference", "transformers on the exported files against our model on --input"))
  p.add_argument("--tolerance", type=float, default=None, help=_HELP_TOL)
  p.add_argument("--overwrite", action="store_true", help=_HELP_OVERWRITE)
  p.add_argument("--quiet", action="store_true", help="print only errors and the final summary")
  args = p.parse_args(argv)
  limit_heap_retention()

  def check(out: str, report: dict):
    result = verify(args.input, out, lossy=report["lossy"], tolerance=args.tolerance)
    print(f"verify: {result}")
    if not result.ok:
      raise VerificationFailed(str(result))

  def run():
    if args.verify:
      require_transformers()
    if detect_format(args.input) != "orbax":
      raise CheckpointError(f"{args.input} is not an ernie_jax Orbax checkpoint")
    r = export_hf(args.input, args.output, dtype=args.dtype, overwrite=args.overwrite,
                  max_shard_bytes=parse_size(args.max_shard_size),
                  before_commit=check if args.verify else None, log=_log(args.quiet))
    print(f"{args.input} -> {args.output}: {r['tensors']} tensors, {r['bytes'] / 1e9:.3f} GB in "
          f"{len(r['files'])} file(s), {r['dtype']}, {r['seconds']:.1f} s")

  return run_cli(run)
