"""Layouts: a checkpoint format's tensor names as data, and the header check against a config.

A `Layout` is a frozen record of one on-disk layout: its name ("hf", "hf/vl", "paddle/native",
"paddle/paddleformers", "paddle/vl"), the name-map function (config -> {tensor name: `Read`}, from
the tables of `hf.py`, `hf_vl.py`, `paddle.py`, `paddle_vl.py`), the accepted dtype tags, how a
tensor's raw data is decoded (Paddle's U16 bf16 bits), which extra tensors are ignorable, and how an
unexpected name is described in errors. The transforms themselves are typed (`transforms.py`).

`layout_for` picks the layout of a format from the tensor names (Paddle variant, VL vision prefix);
`check_source` checks names, shapes and dtypes from the file headers before any data is read.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ernie_jax.config import ModelConfig
from ernie_jax.interop import hf, hf_vl, paddle, paddle_vl
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.interop.transforms import Read

HF_DTYPES = ("F32", "BF16", "F16")


def _raw(x: np.ndarray, tag: str) -> np.ndarray:
  return x


def _none_absent(cfg) -> list:
  return []


@dataclass(frozen=True)
class Layout:
  name: str
  reads: Callable[..., dict[str, Read]]  # cfg -> {tensor name: Read}
  dtypes: tuple[str, ...]  # accepted safetensors dtype tags
  ignorable: Callable[..., bool]  # (cfg, name): an extra tensor that carries nothing for us
  describe: Callable[..., str]  # (cfg, name): why an unexpected tensor does not fit the config
  decode: Callable[[np.ndarray, str], np.ndarray] = _raw  # (raw array, dtype tag) -> values
  absent: Callable[..., list] = _none_absent  # cfg -> [(name, shape)] export writes as zeros


def hf_layout() -> Layout:
  return Layout("hf", hf.hf_name_map, HF_DTYPES, hf.ignorable, hf.describe_unexpected, absent=hf.absent_bias)


def hf_vl_layout(vision_prefix: str = hf_vl.VISION_PREFIXES[0]) -> Layout:
  """ERNIE 4.5 VL HF checkpoints (`hf_vl` tables) with the vision tower under `vision_prefix`."""
  return Layout("hf/vl", functools.partial(hf_vl.vl_name_map, vision_prefix=vision_prefix), HF_DTYPES,
                hf_vl.ignorable, functools.partial(hf_vl.describe_unexpected, vision_prefix=vision_prefix),
                absent=hf_vl.absent_bias)


def paddle_layout(variant: str = "native") -> Layout:
  return Layout(f"paddle/{variant}", functools.partial(paddle.paddle_name_map, variant=variant),
                paddle.ACCEPTED_DTYPES, paddle.ignorable, paddle.describe_unexpected, decode=paddle.decode)


def paddle_vl_layout(vision_prefix: str = paddle_vl.VISION_PREFIXES[0]) -> Layout:
  """ERNIE 4.5 VL `-Paddle` checkpoints (`paddle_vl` tables: the native text layout plus vision,
  resampler and two-modality MoE) with the vision tower under `vision_prefix`."""
  return Layout("paddle/vl", functools.partial(paddle_vl.paddle_vl_name_map, vision_prefix=vision_prefix),
                paddle.ACCEPTED_DTYPES, paddle.ignorable,
                functools.partial(paddle_vl.describe_unexpected, vision_prefix=vision_prefix), decode=paddle.decode)


def layout_for(fmt: str, names, cfg=None) -> Layout:
  """The tensor layout of a checkpoint of format `fmt` ("hf" | "paddle") with tensor `names`; a
  VLConfig `cfg` selects the VL tables."""
  names = list(names)
  if cfg.is_vl:
    if fmt == "hf":
      return hf_vl_layout(hf_vl.detect_vision_prefix(names))
    if fmt == "paddle":
      if (paddle.detect_variant(names) or "native") != "native":
        raise CheckpointError("this ERNIE 4.5 VL checkpoint is in PaddleFormers' save_to_hf=False layout "
                              "(`model.` prefix, GQA-grouped qkv), which is only supported for the text "
                              "models; save it with PaddleFormers' default (HF) layout instead")
      return paddle_vl_layout(hf_vl.detect_vision_prefix(names, paddle_vl.VISION_PREFIXES))
  if fmt == "hf":
    return hf_layout()
  if fmt == "paddle":
    return paddle_layout(paddle.detect_variant(names) or "native")
  raise ValueError(f"no tensor layout for format {fmt!r}")


def _where(reader) -> str:
  files = sorted({i.file for i in reader.tensors.values()})
  return os.path.dirname(files[0]) if files else "?"


def check_source(reader, layout: Layout, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, Read]:
  """Names, shapes and dtypes from the headers against the config, before reading any data.

  shapes: {parameter path: full parameter shape}. Every error names the tensor and its file."""
  reads = layout.reads(cfg)
  present = set(reader.keys())
  unexpected = sorted(n for n in present - set(reads) if not layout.ignorable(cfg, n))
  if unexpected:
    n = unexpected[0]
    raise CheckpointError(f"unexpected tensor '{n}' in {os.path.dirname(reader.tensors[n].file) or _where(reader)}: "
                          f"{layout.describe(cfg, n)}"
                          + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
  missing = sorted(set(reads) - present)
  if missing:
    raise CheckpointError(f"missing tensor '{missing[0]}' in {_where(reader)}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  for name, read in reads.items():
    info = reader.tensors[name]
    targets = [tuple(shapes[s.path][len(s.index):]) for s in read.slots]
    want = tuple(read.source_shape(targets))
    if tuple(info.shape) != want:
      raise CheckpointError(f"tensor '{name}' has shape {list(info.shape)}, expected {list(want)} "
                            f"for the config ({info.file})")
    if info.dtype not in layout.dtypes:
      raise CheckpointError(f"tensor '{name}' has dtype {info.dtype}; expected "
                            f"{', '.join(layout.dtypes[:-1])} or {layout.dtypes[-1]} ({info.file})")
  return reads
