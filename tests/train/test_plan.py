"""The layout planner (`ernie_jax.train.plan`, `python -m ernie_jax.plan`): plans of the shipped configs whose
proposed overrides are valid config fields that fit, the communication formula on simple meshes, and the
one-line errors. No compilation (the estimates are checked against XLA in test_memory_model.py)."""

from __future__ import annotations

import importlib.util
import math
import os

import ml_collections
import pytest

from ernie_jax.cli import plan as plan_cli
from ernie_jax.config import ModelConfig
from ernie_jax.parallel import MESH_AXES, MeshConfig
from ernie_jax.train import config as config_lib
from ernie_jax.train.config import default_config
from ernie_jax.train.memory_model import Layout
from ernie_jax.train.plan import Planner, PlanError, with_placeholders

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shipped(name: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def apply(config, layout: Layout) -> ml_collections.ConfigDict:
  """The config with the layout's overrides set as the command line would (field by field)."""
  for arg in layout.overrides().split():
    key, value = arg[len("--config."):].split("=")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    assert leaf in node, f"{key} is not a config field"
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], str) else value
  return config


@pytest.mark.parametrize("name,devices,memory", [("ernie45_21b_a3b", 64, "95GB"), ("ernie45_300b_a47b", 512, "95GB"),
                                                  ("ernie45_0p3b", 1, "16GB"), ("sft_ernie45_21b_a3b", 16, "80GiB"),
                                                  ("dpo_ernie45_21b_a3b", 16, "80GiB")])
def test_shipped_config_plans_fit(name, devices, memory):
  lines = plan_cli.plan(shipped(name), name, devices, memory)
  text = "\n".join(lines)
  assert "chosen:" in text and "the config's mesh" in text
  planner = Planner(shipped(name), devices)
  usable = 0.9 * plan_cli.parse_memory(memory)[0]
  cands, _ = planner.candidates(usable, per_mesh=True)
  best = cands[0]
  assert best.layout.overrides() in lines[-1]
  assert best.memory.total <= usable
  assert [c.rank_key() for c in cands] == sorted(c.rank_key() for c in cands)
  # the overrides are real config fields, and the trainer's own checks accept the layout on `devices` devices
  config = apply(shipped(name), best.layout)
  cfg = planner.recipe.parse(with_placeholders(config))
  sizes = MeshConfig(**{a: getattr(cfg.mesh, a) for a in MESH_AXES}).resolve(devices)
  assert dict(zip(MESH_AXES, sizes)) == best.layout.sizes
  assert cfg.model.remat == best.layout.remat and cfg.run.grad_accum_steps == best.layout.grad_accum
  mesh = type("Mesh", (), {"shape": best.layout.sizes})()
  config_lib.check_batch_layout(cfg, mesh, 1)


def test_communication_formula():
  """Pure data parallelism all-reduces every gradient (2 (n-1)/n of its bytes per micro-batch); pure fsdp
  gathers the embed-sharded weights twice in the compute dtype and reduce-scatters their gradient, and
  all-reduces the replicated norm weights; tensor parallelism all-reduces [T, H] 6 times per recomputed
  layer plus once for the head."""
  model = ModelConfig.tiny_dense(num_hidden_layers=2, num_key_value_heads=2, dtype="bfloat16")
  c = default_config(model)
  c.global_batch_size, c.data.seq_len = 16, 64
  planner = Planner(c, 8)
  params = [(shape, axes) for axes, shape, *_ in planner._params]
  total = sum(math.prod(s) for s, _ in params) * 4
  lay = Layout(8, 1, 1, 1, "full", 2)
  comm = planner.communication(lay, planner.estimate(lay))
  assert comm["fsdp"] == comm["tensor"] == comm["expert"] == 0
  assert comm["data"] == pytest.approx(2 * 2 * 7 / 8 * total)

  lay = Layout(1, 8, 1, 1, "full", 1)
  comm = planner.communication(lay, planner.estimate(lay))
  sharded = sum(math.prod(s) for s, axes in params if "embed" in axes)
  assert comm["fsdp"] == pytest.approx(7 * sharded / 8 * (2 * 2 + 4))
  assert comm["data"] == pytest.approx(2 * 7 / 8 * (total / 4 - sharded) * 4)

  lay = Layout(4, 1, 2, 1, "full", 1)
  mem = planner.estimate(lay)
  comm = planner.communication(lay, mem)
  assert comm["tensor"] == pytest.approx((6 * model.num_hidden_layers + 1) * 2 * 1 / 2 * mem.tokens * 64 * 2)


def test_parse_memory():
  assert plan_cli.parse_memory("95GB")[0] == 95e9
  assert plan_cli.parse_memory("80GiB")[0] == 80 * 2 ** 30
  assert plan_cli.parse_memory("16000 mb")[0] == 16e9
  for bad, why in (("95GX", "unknown unit 'GX'"), ("95", "needs a positive number with a unit"), ("-1GB", "positive")):
    with pytest.raises(PlanError, match="--device-memory"):
      plan_cli.parse_memory(bad)
    with pytest.raises(PlanError, match=why):
      plan_cli.parse_memory(bad)


def test_one_line_errors(capsys):
  tiny = os.path.join(ROOT, "experiments", "configs", "tiny.py")
  with pytest.raises(PlanError, match="nothing fits 1 device x 1 MB.*smallest layout needs.*use more or larger"):
    plan_cli.plan(shipped("tiny"), tiny, 1, "1MB")
  with pytest.raises(PlanError, match="no mesh of 3 devices divides"):
    plan_cli.plan(shipped("tiny"), tiny, 3, "1GB")
  with pytest.raises(PlanError, match="--remat: unknown policy 'most'"):
    plan_cli.plan(shipped("tiny"), tiny, 1, "1GB", remats="full,most")
  for argv, status, message in (
      ([f"--config={tiny}", "--devices=1", "--device-memory=2 bananas"], 2, "--device-memory"),
      ([f"--config={tiny}", "--devices=1"], 2, "--config, --devices and --device-memory are required"),
      ([f"--config={tiny}", "--devices=1", "--device-memory=1MB"], 1, "nothing fits"),
      ([f"--config={tiny}", "--devices=1", "--device-memory=1GB", "--config.model.remat=sometimes"], 1,
       "config field 'model.remat'")):
    with pytest.raises(SystemExit) as exit_:
      plan_cli.main(["plan", *argv])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == status and message in err and len(err.splitlines()) == 1, err
  plan_cli.main(["plan", f"--config={tiny}", "--devices=8", "--device-memory=1GB", "--top=3"])
  out = capsys.readouterr().out
  assert "chosen:" in out and "--config.grad_accum_steps=" in out


def test_compile_flag_prints_xla_next_to_the_estimate():
  c = default_config(ModelConfig.tiny_dense(num_key_value_heads=2))
  c.global_batch_size, c.data.seq_len = 8, 64
  lines = plan_cli.plan(c, "tiny_dense", 8, "1GB", top=1, remats="full", compile_here=True)
  assert lines[-1].startswith("XLA (cpu, compiled here): arguments")
  with pytest.raises(PlanError, match="--compile compiles the chosen layout on the devices this process sees: 8"):
    plan_cli.plan(c, "tiny_dense", 4, "1GB", top=1, remats="full", compile_here=True)
