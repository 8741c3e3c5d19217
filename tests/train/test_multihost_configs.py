"""The multi-host example configs (experiments/configs/multihost_*.py, docs/multihost.md): each parses with its
recipe's parser, its own mesh / remat / grad_accum_steps at its device count is estimated by the planner to fit
0.9 x the device memory (and to use a real share of it: a layout that shrank by mistake fails too), its batch
splits over its process count, and the per-device total its docstring quotes is the planner's. No compilation."""

from __future__ import annotations

import glob
import os
import runpy

import pytest

from ernie_jax.cli.plan import parse_memory
from ernie_jax.parallel import MESH_AXES
from ernie_jax.train import config as config_lib
from ernie_jax.train.memory_model import Layout
from ernie_jax.train.plan import Planner
from ernie_jax.train.sft_config import parse_sft
from tests.helpers import REPO_ROOT

CONFIGS = os.path.join(REPO_ROOT, "experiments", "configs")
# name: (devices, memory per device, processes (one per TPU host / GPU node), parser)
MULTIHOST = {
  "multihost_21b_a3b_v5p64": (32, "95GB", 8, config_lib.parse),
  "multihost_21b_a3b_sft_h100x64": (64, "80GB", 8, parse_sft),
  "multihost_300b_a47b_v5p512": (256, "95GB", 64, config_lib.parse),
}
MARGIN = 0.9  # the planner's default share of the device memory a layout may use
LEAST = 0.4  # below this share of the device memory the layout would waste the devices it books


def load(name: str):
  module = runpy.run_path(os.path.join(CONFIGS, f"{name}.py"))
  return module["get_config"](), module["__doc__"]


def with_inputs(config):
  """The config with the required paths the launch command gives filled in (nothing is read)."""
  config.init_from = config.init_from or "/shared/ckpt/base"
  config.data.paths = config.data.paths or "/shared/corpus/*.jsonl"
  if "tokenizer" in config.data and not config.data.tokenizer and "finetune" not in config:
    config.data.tokenizer = "/shared/ckpt/base"
  return config


def test_every_multihost_config_is_listed():
  found = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIGS, "multihost_*.py"))}
  assert found == set(MULTIHOST)


@pytest.mark.parametrize("name", sorted(MULTIHOST))
def test_multihost_config_parses_and_fits(name):
  devices, memory, processes, parse = MULTIHOST[name]
  config, doc = load(name)
  cfg = parse(with_inputs(config))
  sizes = dict(zip(MESH_AXES, cfg.mesh.resolve(devices)))
  mesh = type("Mesh", (), {"shape": sizes})()
  config_lib.check_batch_layout(cfg, mesh, processes)
  planner = Planner(load(name)[0], devices)
  assert planner.config_layout() == sizes
  mem = planner.estimate(Layout(**sizes, remat=cfg.model.remat, grad_accum=cfg.run.grad_accum_steps))
  capacity = parse_memory(memory)[0]
  assert LEAST * capacity < mem.total <= MARGIN * capacity, (name, mem.total / 1e9)
  quoted = f"= {mem.total / 1e9:.2f} GB"
  assert quoted in " ".join(doc.split()), f"{name}'s docstring does not quote the planner's total ({quoted})"
