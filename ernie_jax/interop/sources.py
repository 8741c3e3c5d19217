"""Checkpoint sources: a checkpoint directory detected once into a `Source` (format, tensor reader,
config), and the tensor readers.

Formats: "orbax" (written by `ernie_jax.interop.orbax_io`), "hf" (config.json + safetensors, single
or sharded), "paddle" (`ernie.`- or PaddleFormers' `model.`-prefixed fused tensors). Weights are
read from safetensors (`SafetensorsReader`, from the headers first) or, only with allow_pickle,
from torch `.bin` / Paddle `.pdparams` pickles (`PickleReader`). `open_checkpoint` looks at the
directory once: Orbax detection, the weight files (pickle probing), the Paddle variant and the VL
vision prefix (the `Layout`) are each decided there and carried by the `Source`.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from ernie_jax.config import ModelConfig, VLConfig
from ernie_jax.interop import hf_config, orbax_io, paddle, paddle_config
from ernie_jax.interop import safetensors_writer as stw
from ernie_jax.interop.hf_vl import is_vl_config
from ernie_jax.interop.layouts import Layout, layout_for
from ernie_jax.interop.safetensors_io import CheckpointError, SafetensorsReader, TensorInfo

FORMATS = ("orbax", "hf", "paddle")


class PickleReader:
  """Tensors of pickle checkpoints (torch `.bin`, Paddle `.pdparams`), loaded only on request
  (`allow_pickle`): unpickling can run arbitrary code. Whole files are loaded (torch memory-maps)."""

  def __init__(self, files: list[str], kind: str):
    self.kind = kind  # "torch" | "paddle"
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


def _check_dir(path: str) -> None:
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint directory not found: {path}")


def _weights_format(kind: str, names) -> str:
  """kind: "safetensors", "torch" or "paddle" (the weight files)."""
  return "paddle" if kind == "paddle" or paddle.detect_variant(names) else "hf"


def _no_config_json(path: str) -> CheckpointError:
  """The error for a directory without config.json: an Orbax checkpoint missing pieces is named as such."""
  if orbax_io.looks_like_orbax(path):
    orbax_io.resolve(path)  # raises the specific error (an intact one was detected before)
  return CheckpointError(f"{path} has no config.json")


def detect_format(path: str | os.PathLike) -> str:
  """'orbax', 'hf' or 'paddle' for a checkpoint directory (from its files and tensor names)."""
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  _check_dir(path)
  if orbax_io.is_orbax_checkpoint(path):
    return "orbax"
  if not os.path.exists(os.path.join(path, "config.json")):
    raise _no_config_json(path)
  if _has_safetensors(path):
    reader = SafetensorsReader(path)
    names, kind = list(reader.keys()), "safetensors"
    reader.close()
  else:
    found = _pickle_files(path)
    if found is None:
      raise CheckpointError(f"no .safetensors (or .bin / .pdparams) weight files in {path}")
    names, kind = [], found[1]
  return _weights_format(kind, names)


def _is_vl_dir(path: str) -> bool:
  """Whether the directory's config.json describes an ERNIE 4.5 VL model (False if unreadable)."""
  try:
    with open(os.path.join(path, "config.json")) as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError):
    return False
  return isinstance(d, dict) and is_vl_config(d)


@dataclass
class Source:
  """A checkpoint directory, detected once. format: "orbax" | "hf" | "paddle"; reader: the tensor
  reader (None for Orbax, whose arrays `orbax_io` restores); info: the Orbax checkpoint's recorded
  info (None otherwise); is_vl: an ERNIE 4.5 VL checkpoint. Close it (or use `with`)."""
  path: str
  format: str
  is_vl: bool
  reader: Any = None
  info: dict | None = None

  def read_config(self, **overrides) -> ModelConfig | VLConfig:
    """The checkpoint's config (config.json, or the config recorded in an Orbax checkpoint)."""
    if self.format == "orbax":
      return orbax_io.config_from_info(self.info).replace(**overrides)
    fmt = hf_config if self.format == "hf" else paddle_config
    return (fmt.read_vl if self.is_vl else fmt.read_text)(self.path, **overrides)

  def layout(self, cfg: ModelConfig | VLConfig) -> Layout:
    """The tensor layout of the weights for `cfg` (a VLConfig selects the VL tables)."""
    return layout_for(self.format, self.reader.keys(), cfg)

  def close(self) -> None:
    if self.reader is not None:
      self.reader.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_checkpoint(path: str | os.PathLike, *, format: str = "auto", allow_pickle: bool = False,
                    verify: bool = True) -> Source:
  """Detect a checkpoint directory's format (unless `format` is given) and open its weights.

  `path` may be relative (it is made absolute). An Orbax checkpoint's files are checked against
  its recorded checksums first (`orbax_io.verify_checksums`; verify=False skips it)."""
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if format not in ("auto", *FORMATS):
    raise ValueError(f"unknown checkpoint format {format!r}; choose one of {FORMATS}")
  _check_dir(path)
  if format == "orbax" or (format == "auto" and orbax_io.is_orbax_checkpoint(path)):
    if verify:
      orbax_io.verify_checksums(path)
    info = orbax_io.read_info(path)
    return Source(path, "orbax", orbax_io.is_vl_info(info), info=info)
  if format == "auto" and not os.path.exists(os.path.join(path, "config.json")):
    raise _no_config_json(path)
  reader = open_source(path, allow_pickle=allow_pickle)
  fmt = _weights_format(getattr(reader, "kind", "safetensors"), reader.keys()) if format == "auto" else format
  return Source(path, fmt, _is_vl_dir(path), reader=reader)
