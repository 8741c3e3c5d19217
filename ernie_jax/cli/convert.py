"""The converter command lines (`tools/convert/{hf,paddle}_to_orbax.py`, `orbax_to_hf.py`).

`main_to_orbax` / `main_to_hf` parse the arguments, open the source once, convert
(`ernie_jax.interop.convert`) and, with `--verify`, check the output against transformers
(`ernie_jax.cli.verify`) before it is moved into place. Failures become one-line messages and exit
codes: 0 OK, 1 error, 3 verification failed (nothing written).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import sys
from typing import Callable

from ernie_jax.cli.verify import paddle_reference, verify
from ernie_jax.config import ConfigError
from ernie_jax.interop.convert import STORAGE_DTYPES, ConversionReport, convert_to_orbax, export_hf
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.interop.sources import detect_format, open_checkpoint
from ernie_jax.interop.stream import DEFAULT_BLOCK_BYTES


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
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
  except (OSError, AttributeError):
    return False


def _parser(description: str):
  return argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def _log(quiet: bool):
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
_HELP_TOKENIZER = ("directory whose tokenizer files (tokenizer.model / tokenizer.json / tokenizer_config.json / "
                   "special_tokens_map.json / added_tokens.json / chat_template.jinja ...) and generation_config.json "
                   "are copied to --output (default: --input's own). A generation_config.json with the config's "
                   "bos / eos / pad ids is written when there is none.")
_HELP_OVERWRITE = ("replace --output if it exists; the old directory is removed only once the new one "
                   "is complete. Without it an existing --output is an error.")


def _report(result) -> None:
  """Print a `--verify` result; a failed one aborts the conversion before its output is committed."""
  print(f"verify: {result}")
  if not result.ok:
    raise VerificationFailed(str(result))


def main_to_orbax(fmt: str, description: str, argv=None) -> int:
  """`tools/convert/{hf,paddle}_to_orbax.py`."""
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
  p.add_argument("--tokenizer", metavar="DIR", default=None, help=_HELP_TOKENIZER)
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
      _report(verify(out, ref_dir, lossy=report.lossy, tolerance=args.tolerance))

  def run():
    if args.verify:
      require_transformers()
    source = open_checkpoint(args.input, allow_pickle=args.allow_pickle)
    if source.format != fmt:
      source.close()
      other = {"hf": "hf_to_orbax.py", "paddle": "paddle_to_orbax.py", "orbax": "orbax_to_hf.py"}[source.format]
      raise CheckpointError(f"{args.input} is a {source.format} checkpoint, not {fmt}: use {other}")
    r = convert_to_orbax(source, args.output, dtype=args.dtype, overwrite=args.overwrite,
                         block_bytes=int(args.block_mb * 2**20), tokenizer_dir=args.tokenizer,
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
                      "generation_config.json and the input's tokenizer files")
  p.add_argument("--dtype", choices=STORAGE_DTYPES, default="auto", help=_HELP_DTYPE)
  p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                 help="largest safetensors shard, e.g. 5GB (default), 500MB; one shard is written "
                      "as model.safetensors")
  p.add_argument("--verify", action="store_true", help=_HELP_VERIFY.replace(
    "the transformers reference", "transformers on the exported files against our model on --input"))
  p.add_argument("--tolerance", type=float, default=None, help=_HELP_TOL)
  p.add_argument("--overwrite", action="store_true", help=_HELP_OVERWRITE)
  p.add_argument("--tokenizer", metavar="DIR", default=None, help=_HELP_TOKENIZER)
  p.add_argument("--quiet", action="store_true", help="print only errors and the final summary")
  args = p.parse_args(argv)
  limit_heap_retention()

  def check(out: str, report: dict):
    _report(verify(args.input, out, lossy=report["lossy"], tolerance=args.tolerance))

  def run():
    if args.verify:
      require_transformers()
    if detect_format(args.input) != "orbax":
      raise CheckpointError(f"{args.input} is not an ernie_jax Orbax checkpoint")
    r = export_hf(args.input, args.output, dtype=args.dtype, overwrite=args.overwrite,
                  max_shard_bytes=parse_size(args.max_shard_size), tokenizer_dir=args.tokenizer,
                  before_commit=check if args.verify else None, log=_log(args.quiet))
    print(f"{args.input} -> {args.output}: {r['tensors']} tensors, {r['bytes'] / 1e9:.3f} GB in "
          f"{len(r['files'])} file(s), {r['dtype']}, {r['seconds']:.1f} s")

  return run_cli(run)
