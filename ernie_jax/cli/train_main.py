"""The command-line plumbing shared by the training entry points (`experiments/pretrain.py`,
`experiments/sft.py`): absl flags with an ml-collections `--config` file, one-line errors for a bad
config file, override or run failure, and a `--help` that lists every config field with its default.

  run(recipe, doc, default_config, example)   parse the flags and train (exit 0 / 1 / 2 / 130)
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

import jax

from ernie_jax.data import DataError
from ernie_jax.data.tokenizers import TokenizerError
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.parallel import ShardingError, distributed
from ernie_jax.train import config as config_lib
from ernie_jax.train.trainer import NonFiniteError, train
from ernie_jax.train.workdir import WorkdirLockedError

#: errors of a run that are reported in one line (exit 1)
RUN_ERRORS = (config_lib.TrainConfigError, DataError, TokenizerError, CheckpointError, NonFiniteError,
              WorkdirLockedError, ShardingError)


def _flat_fields(tree, prefix: str = "") -> list[str]:
  """`--config.a.b=value` lines for every field of a config tree (its defaults)."""
  out = []
  for k in sorted(tree.keys()):
    v = tree[k]
    if hasattr(v, "keys"):
      out += _flat_fields(v, f"{prefix}{k}.")
    else:
      out.append(f"  --config.{prefix}{k}={v!r}")
  return out


def root_message(e: BaseException) -> str:
  """The innermost message of a flag-parsing error, on one line (ml-collections nests the original
  KeyError inside an AttributeError inside the flag error)."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  msg = str(e.args[0]) if e.args else str(e)
  return " ".join(line.strip() for line in msg.splitlines() if line.strip())


def flags_parser(doc: str, default_config: Callable) -> Callable[[list[str]], list[str]]:
  """absl's flags_parser: one-line errors for a bad `--config` file or override, and a `--help` that
  prints `doc` and every field of `default_config()` with its default."""

  def parse(argv: list[str]) -> list[str]:
    from absl import flags

    if any(a in ("--help", "-h", "--helpshort") for a in argv[1:]):
      print(doc.strip() + f"\n\nConfig fields (defaults of {default_config.__module__}.{default_config.__name__}(); "
            "an experiment config changes some):\n" + "\n".join(_flat_fields(default_config())))
      sys.exit(0)
    try:
      return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as e:
      unknown = "unknown config field " if isinstance(e.__cause__ or e.__context__, (AttributeError, KeyError)) else ""
      print(f"error: {unknown}{root_message(e)} (see --help for the config fields)", file=sys.stderr, flush=True)
      sys.exit(2)

  return parse


def main_for(recipe, script: str, example: str, config_flag) -> Callable[[list[str]], None]:
  """absl's main: train `config_flag.value` with `recipe`; `script` / `example` for the message when
  --config is missing."""

  def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint operation at INFO
    if config_flag.value is None:
      print(f"error: --config is required, e.g. python {script} --config={example} (see --help)",
            file=sys.stderr, flush=True)
      sys.exit(2)
    try:
      config = config_flag.value
      config.keys()  # (a lazily reported load failure surfaces here)
    except OSError as e:  # ml-collections reports a config file that failed to load only when it is read
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      print(f"error: --config: {lines[-1] if lines else e}", file=sys.stderr, flush=True)
      sys.exit(2)
    try:
      train(config, recipe)
    except RUN_ERRORS as e:
      fail(f"error: {e}", 1)
    except PermissionError as e:  # a read-only workdir / output directory
      fail(f"error: {e.strerror}: {e.filename} (choose a writable --config.workdir)", 1)
    except KeyboardInterrupt:  # Ctrl-C before the training loop (during start-up): nothing to save
      fail("interrupted during start-up; nothing saved", 130)
    except Exception as e:  # noqa: BLE001 -- a bug or a lost peer: with several processes, no hang (see `fail`)
      if not _several_processes():
        raise
      text = " ".join(str(e).split())[:400]
      fail(f"error: {type(e).__name__}: {text} (with several processes this is often another process that stopped: "
           f"see its own output)\n{traceback.format_exc().rstrip()}", 1)

  return main


def _several_processes() -> bool:
  return jax.distributed.is_initialized() and jax.process_count() > 1


def fail(message: str, code: int) -> None:
  """Print `message` (prefixed with the process index when there are several) and exit with `code`. With
  several processes the exit is immediate (`os._exit`): a normal exit would wait at JAX's shutdown barrier for
  processes that are themselves waiting for this one in a collective, and all would hang; this way the
  coordination service sees the process gone and stops the others within `distributed.heartbeat_timeout`. It
  first waits (at most 5 s) for the others to fail too, so that an error every process meets (a config error) is
  reported by each before process 0 takes the coordination service down."""
  if _several_processes():
    print(f"[process {jax.process_index()}] {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    distributed.wait_for_others("error-exit", seconds=5)  # all failed alike: every one reports before the exit
    os._exit(code)
  print(message, file=sys.stderr, flush=True)
  sys.exit(code)


def run(recipe, doc: str, default_config: Callable, script: str, example: str) -> None:
  """Define `--config`, parse the flags and train with `recipe` (the body of an entry point)."""
  from absl import app
  from ml_collections import config_flags

  flag = config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/configs/*.py)")
  app.run(main_for(recipe, script, example, flag), flags_parser=flags_parser(doc, default_config))
