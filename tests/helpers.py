"""Helpers shared by the test modules (fixtures live in `conftest.py`)."""

from __future__ import annotations

import contextlib
import io
import os
import re

import numpy as np
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel(a, b) -> float:
  """max |a - b| / max |b| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def flat_arrays(state) -> dict[str, np.ndarray]:
  """An nnx state (or `nnx.state(model)`) as {"a/b/c": host array}."""
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def run_config(config, workdir, xla_cache, **overrides):
  """An experiment config (ml-collections) for a test run in `workdir`, with the shared XLA cache and
  `overrides` given as dotted field names ({"optim.lr": 1e-3, "steps": 5})."""
  config.workdir = str(workdir)
  config.compilation_cache_dir = xla_cache
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def scan_residuals(f, *args) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype name, shape) of each residual autodiff keeps from a scan in f's backward pass (the decoder's layer
  loop: stacked over the layers), from `jax.ad_checkpoint.print_saved_residuals`."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(f, *args)
  found = (re.match(r"(\w+)\[([\d,]*)\] output of scan", line) for line in out.getvalue().splitlines())
  return [(m.group(1), tuple(int(x) for x in m.group(2).split(",") if x)) for m in found if m]
