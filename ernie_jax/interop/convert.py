"""Checkpoint conversion: HF / Paddle safetensors -> Orbax, Orbax (or a model) -> HF safetensors.

Everything streams: `convert_to_orbax` opens the source once (`sources.open_checkpoint`: format,
reader, layout, config), checks it from the headers (`layouts.check_source`) and writes the
parameters block by block through the streaming engine (`stream.Conversion`) into Orbax
(`orbax_io.StreamedArray`); `export_hf` reads an Orbax checkpoint (or a model) one slice at a time
and writes transformers safetensors shards + config.json. ERNIE 4.5 VL checkpoints (a VL
config.json) go through the same engine with the VL tables; their Orbax checkpoints record
`"architecture": "ernie4_5_vl_moe"`, and `export_hf` writes them back as transformers VL checkpoints.

Peak host memory while converting is therefore about
    largest source tensor + its transformed copy (the embedding / lm_head, or one expert)
    + a few blocks (<= block_bytes each: the one being assembled per parameter of the group, one
      prefetched, <= 64 MiB of uncommitted writes; see `orbax_io`)
— independent of the model size. benchmarks/convert_streaming.py measures it.

Output directories are written under a temporary sibling and renamed into place only when
complete (`atomic_output`); on any error nothing is left behind, and the temporary directory of a
killed run is removed by the next run to the same output (`clean_stale_outputs`). The command-line tools and
`--verify` live in `ernie_jax.cli`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import ml_dtypes
import numpy as np
from flax import nnx

from ernie_jax.config import ModelConfig
from ernie_jax.interop import assets, hf_config
from ernie_jax.interop import orbax_io
from ernie_jax.interop import safetensors_writer as stw
from ernie_jax.interop.layouts import check_source, hf_layout, hf_vl_layout
from ernie_jax.interop.safetensors_io import DTYPES, CheckpointError
from ernie_jax.interop.sources import Source, open_checkpoint
from ernie_jax.interop.stream import DEFAULT_BLOCK_BYTES, Conversion
from ernie_jax.interop.transforms import Read
from ernie_jax.model.state import abstract_model, flat_state
from ernie_jax.config import VLConfig

STORAGE_DTYPES = ("auto", "bfloat16", "float32", "float16")
DEFAULT_SHARD_BYTES = 5 << 30
_TAG_DTYPES = {"F32": "float32", "BF16": "bfloat16", "U16": "bfloat16", "F16": "float16"}
_FP32_PARAMS = ("router/kernel", "router/correction_bias")  # always fp32 (model and HF agree)


def abstract_params(cfg: ModelConfig | VLConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{parameter path: (shape, dtype)} of the model of `cfg`, without allocating it."""
  _, abstract = abstract_model(cfg)
  return {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in flat_state(abstract).items()}


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
STALE_SECONDS = 3600  # an old-style temporary directory (no owner pid) older than this is stale
_OWNER = "owner.json"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # e.g. PermissionError: it exists
    return True
  return True


def clean_stale_outputs(dst: str | os.PathLike, log: Callable[[str], None] | None = None) -> list[str]:
  """Remove the temporary directories `.<name>.tmp-<pid>-*` next to `dst` left by conversions that
  were killed: those whose process (on this host) is gone, and old-style ones (no pid) older than
  STALE_SECONDS. Each removal is reported through `log` (default: stderr). Returns their paths."""
  dst = os.path.abspath(os.fspath(dst))
  parent, prefix = os.path.dirname(dst), f".{os.path.basename(dst)}.tmp-"
  removed = []
  try:
    names = [n for n in os.listdir(parent) if n.startswith(prefix)]
  except OSError:
    return removed
  host = socket.gethostname()
  for name in sorted(names):
    path = os.path.join(parent, name)
    if not os.path.isdir(path) or os.path.islink(path):
      continue
    m = re.match(r"(\d+)-", name[len(prefix):])
    if m:
      pid = int(m.group(1))
      try:
        with open(os.path.join(path, _OWNER)) as f:
          owner_host = json.load(f).get("host", host)
      except (OSError, ValueError, AttributeError):
        owner_host = host
      if owner_host != host or pid == os.getpid() or _pid_alive(pid):
        continue  # another host's, or still running
      why = f"its process {pid} is gone"
    else:
      try:
        age = time.time() - os.path.getmtime(path)
      except OSError:
        continue
      if age < STALE_SECONDS:
        continue
      why = f"{age / 3600:.1f} hours old"
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.exists(path):
      removed.append(path)
      (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
        f"removed stale temporary directory {path} left by an interrupted conversion ({why})")
  return removed


@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike, overwrite: bool = False):
  """Yield a path (not yet existing) to write the output to; on success it is renamed to `dst`
  (replacing it when overwrite), on error it is removed. It lives in a temporary directory next
  to `dst`, so the rename stays on one file system, named `.<name>.tmp-<pid>-*` (with an
  `owner.json` naming the host) so that a later run to the same `dst` removes it if this process
  is killed (`clean_stale_outputs`)."""
  dst = os.path.abspath(os.path.expanduser(os.fspath(dst)))
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f"output {dst} already exists (pass overwrite=True / --overwrite to replace it)")
  parent = os.path.dirname(dst)
  made = []
  p = parent
  while not os.path.exists(p):
    made.append(p)
    p = os.path.dirname(p)
  os.makedirs(parent, exist_ok=True)
  clean_stale_outputs(dst)
  work = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-{os.getpid()}-", dir=parent)
  ok = False
  try:
    with open(os.path.join(work, _OWNER), "w") as f:
      json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, f)
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


def convert_to_orbax(src: str | os.PathLike | Source, dst: str | os.PathLike, *, format: str = "auto",
                     dtype: str = "auto", overwrite: bool = False, allow_pickle: bool = False,
                     config: ModelConfig | None = None, block_bytes: int = DEFAULT_BLOCK_BYTES,
                     before_commit: Callable[[str, "ConversionReport"], None] | None = None,
                     log: Callable[[str], None] | None = None, tokenizer_dir: str | os.PathLike | None = None,
                     generation_config: dict | str | None = None) -> ConversionReport:
  """Convert an HF or Paddle checkpoint directory (or an open `sources.Source`) into an Orbax
  checkpoint at `dst`.

  format: "auto" | "hf" | "paddle". dtype: parameter storage dtype, "auto" keeps the source's
  (bf16 stays bf16; router weight and correction bias are always fp32). config: use this
  ModelConfig instead of the directory's config.json. before_commit(tmp_dir, report): called on
  the complete output before it is moved into place (e.g. verification); raising discards it.
  """
  t0 = time.perf_counter()
  source = src if isinstance(src, Source) else open_checkpoint(src, format=format, allow_pickle=allow_pickle)
  src = source.path
  try:
    if source.format not in ("hf", "paddle"):
      raise CheckpointError(f"{src}: cannot convert from format {source.format!r} (expected 'hf' or 'paddle')")
    with atomic_output(dst, overwrite) as out:
      reader = source.reader
      cfg = config or source.read_config()
      layout = source.layout(cfg)
      probe = abstract_params(cfg.replace(param_dtype="bfloat16"))
      reads = check_source(reader, layout, cfg, {p: s for p, (s, _) in probe.items()})
      storage = _storage_dtype(dtype, reader, reads)
      cfg = cfg.replace(param_dtype=storage)
      params = abstract_params(cfg)
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
      files = assets.find(tokenizer_dir if tokenizer_dir is not None else src if os.path.isdir(src) else None)
      orbax_io.save_state(out, arrays, cfg, metadata={"source": {
        "path": os.path.abspath(src), "format": layout.name, "storage_dtype": storage}},
        extra_files=lambda d: assets.write(d, cfg, files, generation_config))
      report = ConversionReport(src, os.fspath(dst), layout.name, cfg, storage,
                                _lossy(storage, reader, reads), len(reads), total, time.perf_counter() - t0)
      if before_commit is not None:
        before_commit(out, report)
  finally:
    source.close()
  return report


# ==================================================================================================
# Orbax / model -> HF
class _ModelParams:
  """Read access to an in-memory model's parameters with the OrbaxReader interface."""

  def __init__(self, model):
    self.config = model.config
    self._flat = {p: v.get_value() for p, v in flat_state(nnx.state(model)).items()}

  def shape(self, path):
    return tuple(self._flat[path].shape)

  def dtype(self, path):
    return np.dtype(self._flat[path].dtype)

  def read(self, path, index=()):
    return np.asarray(self._flat[path][index])

  def close(self):
    pass


def export_hf(src, dst: str | os.PathLike, *, dtype: str = "auto", overwrite: bool = False,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              before_commit: Callable[[str, dict], None] | None = None,
              log: Callable[[str], None] | None = None, tokenizer_dir: str | os.PathLike | None = None,
              generation_config: dict | str | None = None) -> dict:
  """Write an HF-layout checkpoint (safetensors shards + index + config.json) that transformers
  loads. src: an Orbax checkpoint directory or an `ErnieForCausalLM` (or an ERNIE 4.5 VL
  checkpoint / `Ernie45VLForConditionalGeneration`: a transformers VL checkpoint is written).
  Tensors are read, transposed and written one at a time. dtype: "auto" keeps each parameter's
  stored dtype (the router weight and correction bias are always fp32). before_commit(tmp_dir,
  report), tokenizer_dir, generation_config: see `convert_to_orbax` (default tokenizer_dir: the Orbax
  checkpoint directory; none for a model)."""
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
  if os.path.lexists(dst) and not overwrite:  # fail before reading anything
    raise FileExistsError(f"output {os.path.abspath(dst)} already exists (pass overwrite=True / "
                          "--overwrite to replace it)")
  params = orbax_io.OrbaxReader(src) if isinstance(src, (str, os.PathLike)) else _ModelParams(src)
  try:
    extra = assets.find(tokenizer_dir) if tokenizer_dir is not None else (
      assets.find(getattr(params, "directory", None)) or assets.find(src if isinstance(src, (str, os.PathLike)) else None))
    cfg = params.config
    vl = cfg.is_vl
    layout = hf_vl_layout() if vl else hf_layout()
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
      specs.append(stw.TensorSpec(name, stw.tag_of(dt), tuple(read.source_shape(targets))))
      fetchers[name] = (lambda r=read, d=dt: r.from_params(
        [params.read(s.path, s.index) for s in r.slots]).astype(d, copy=False))
    for name, shape in layout.absent(cfg):  # transformers always has the bias: zeros
      specs.append(stw.TensorSpec(name, "F32", shape))
      fetchers[name] = lambda shape=shape: np.zeros(shape, np.float32)
    stored = {params.dtype(s.path) for s in slots if not s.path.endswith(_FP32_PARAMS)}
    config_dtype = dtype if dtype != "auto" else ("bfloat16" if stored == {np.dtype(ml_dtypes.bfloat16)}
                                                  else "float16" if stored == {np.dtype(np.float16)} else "float32")
    hf_cfg = hf_config.write(cfg, config_dtype)
    t0 = time.perf_counter()
    total = sum(s.nbytes for s in specs)
    with atomic_output(dst, overwrite) as out:
      os.makedirs(out)
      files = stw.write_checkpoint(out, specs, lambda n: fetchers[n](), max_shard_bytes)
      with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
      assets.write(out, cfg, extra, generation_config)
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
