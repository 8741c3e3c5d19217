"""Preference optimisation end to end (experiments/dpo.py, `ernie_jax.train.dpo`): the tiny DPO run moves the
held-out reward accuracy from 0.5 to >= 0.9 without collapsing the chosen log-prob; every reference mode starts at
loss log 2 with zero rewards, and the frozen copy and the precomputed log-probs give the same steps; DPO with LoRA
on the routed experts on data2 x expert4 equals one device; a resumed run is exact and refuses another base;
bad configs and rows are named before anything compiles."""

import json
import math
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ernie_jax.cli import export as export_cli
from ernie_jax.config import LoraConfig, ModelConfig
from ernie_jax.data import DataError, stdlib_qa
from ernie_jax.data.preference import PreferenceDataConfig, make_preference_pipeline
from ernie_jax.data.tokenizers import get_tokenizer
from ernie_jax.interop.peft import load_peft_adapter
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.model import model_class
from ernie_jax.model.lora import merge_lora
from ernie_jax.parallel import MeshConfig
from ernie_jax.train.config import TrainConfigError
from ernie_jax.train.dpo import PreferenceTuning
from ernie_jax.train.dpo_losses import DPOConfig
from ernie_jax.train.dpo_task import Preference
from ernie_jax.train.metrics import read_jsonl
from ernie_jax.train.optimizer import OptimConfig
from ernie_jax.train.param_groups import GroupsConfig, make_grouped_optimizer, trained_filter
from ernie_jax.train.sft import AddLora
from ernie_jax.train.step import (abstract_train_state, batch_sharding, build_mesh, create_train_state,
                                  make_train_step, put_batch)
from ernie_jax.train.trained import load_trained
from ernie_jax.train.trainer import train
from tests.helpers import REPO_ROOT, flat_arrays, rel, run_config

sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))
from configs import dpo_tiny  # noqa: E402

MICRO = {"model.hidden_size": 64, "model.num_hidden_layers": 2, "model.num_attention_heads": 2,
         "model.num_key_value_heads": 2, "model.head_dim": 32, "model.intermediate_size": 128,
         "data.seq_len": 256, "data.pairs_per_row": 2, "global_batch_size": 8, "metrics.log_every": 1,
         "metrics.progress_bar": False, "metrics.tensorboard": False, "optim.warmup_steps": 0,
         "optim.min_lr_ratio": 1.0, "finetune.sample_tokens": 0, "finetune.eval_batches": 2}


def _config(workdir, xla_cache, **overrides):
  return run_config(dpo_tiny.get_config(), workdir, xla_cache, **overrides)


def _metrics(workdir):
  return {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r}


def test_tiny_dpo_raises_heldout_reward_accuracy(tmp_path, xla_cache):
  over = {"steps": 20, "metrics.progress_bar": False, "metrics.tensorboard": False, "model.num_hidden_layers": 2,
          "finetune.eval_every": 0, "checkpoint.every_steps": 0}
  summary = train(_config(tmp_path / "run", xla_cache, **over), PreferenceTuning())
  assert summary["eval_rewards/accuracies_at_start"] == 0.5  # policy == reference: every margin is 0 (a tie)
  assert abs(summary["eval_loss_at_start"] - math.log(2)) < 1e-6
  assert summary["eval_rewards/accuracies"] >= 0.9, summary
  assert summary["eval_rewards/margins"] > 0
  # the chosen answers' log-prob does not collapse: it stays within 10% of where it started
  start, end = summary["eval_logps/chosen_at_start"], summary["eval_logps/chosen"]
  assert end > 1.1 * start, (start, end)  # (log-probs are negative)
  info = json.load(open(tmp_path / "run" / "run_info.json"))
  assert info["reference"] == "copy" and info["kind"] == "dpo"
  heldout = stdlib_qa.preference_pairs("heldout")  # every held-out pair fits, and all were evaluated
  assert summary["eval_data"] == {"rows": len(heldout), "truncated": 0, "dropped": 0, "skipped": 0}, summary
  assert summary["eval_pairs"] == len(heldout) and summary["train_data"]["skipped"] == 0, summary


@pytest.mark.parametrize("method", ["full", "lora"])
def test_reference_modes_start_at_log2_and_agree(tmp_path, xla_cache, method):
  """Step 1: the policy equals the reference (LoRA B = 0 / the initial model), so the sigmoid loss is log 2 and
  every reward is 0; the frozen copy and the precomputed log-probs then give the same next steps. The full
  fine-tuning run with precomputed log-probs computes its log-probs (policy and reference) with the LM head
  fused into the cross-entropy, 16 positions at a time (`loss.lm_chunk`): the same steps."""
  modes = ["copy", "precomputed"] if method == "full" else ["lora_base", "precomputed"]
  got = {}
  for mode in modes:
    over = {**MICRO, "steps": 3, "optim.lr": 1e-3, "finetune.method": method, "dpo.reference": mode}
    if method == "full" and mode == "precomputed":
      over["loss.lm_chunk"] = 16
    summary = train(_config(tmp_path / mode, xla_cache, **over), PreferenceTuning())
    m = _metrics(tmp_path / mode)
    # policy == reference: rewards 0 up to fp32 rounding (two compiled passes; exactly 0 on some CPUs only)
    assert abs(m[1]["dpo_loss"] - math.log(2)) < 1e-6 and abs(m[1]["rewards/margins"]) < 1e-5, m[1]
    assert m[1]["rewards/accuracies"] == 0.5
    assert summary["eval_loss_at_start"] == pytest.approx(math.log(2), abs=1e-6)
    got[mode] = [m[s]["loss"] for s in (1, 2, 3)]
  a, b = got.values()
  np.testing.assert_allclose(a, b, rtol=2e-5)
  assert a[2] < a[0]  # and the loss moves
  assert (tmp_path / "precomputed" / "reference_logps.npz").exists()
  # the trained policy comes out like an SFT run's (LoRA: base + adapters, merged on export)
  trained = load_trained(str(tmp_path / modes[0]))
  assert trained.kind == method and trained.step == 3
  assert export_cli.main(["--workdir", str(tmp_path / modes[0]), "--output", str(tmp_path / "hf")]) == 0
  assert (tmp_path / "hf" / "model.safetensors").exists() or any((tmp_path / "hf").glob("*.safetensors"))
  if method == "lora":  # its adapter in peft's format, loaded back onto the (seeded) base: the same merged model
    assert export_cli.main(["--workdir", str(tmp_path / modes[0]), "--output", str(tmp_path / "peft"),
                            "--format", "peft"]) == 0
    cfg = trained.model.config
    base = load_peft_adapter(model_class(cfg)(cfg, rngs=nnx.Rngs(0)), tmp_path / "peft")
    want, got = flat_arrays(nnx.state(merge_lora(trained.model))), flat_arrays(nnx.state(merge_lora(base)))
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


MOE = ModelConfig.tiny_moe(num_hidden_layers=2, moe_layer_start_index=1, moe_num_experts=8, moe_k=2,
                           moe_capacity_factor=0.0, initializer_range=0.3)


def _moe_step(mesh, batch):
  tx, schedule = make_grouped_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), GroupsConfig(), 10)
  wrt, adapt = trained_filter("lora"), AddLora(LoraConfig(rank=4, targets=("attn", "shared", "experts")), 0)
  graphdef, state = create_train_state(MOE, tx, seed=0, mesh=mesh, wrt=wrt, adapt=adapt)
  _, shardings, _ = abstract_train_state(MOE, tx, 0, mesh, wrt=wrt, adapt=adapt)
  task = Preference(DPOConfig(), "lora_base", pairs_per_row=2)
  step = make_train_step(graphdef, shardings, None, schedule, wrt=wrt, task=task, grad_accum=2, donate=False)
  with jax.set_mesh(mesh):
    placed = put_batch(batch, 2, batch_sharding(mesh))
    for _ in range(2):
      state, metrics = step(state, placed)
  lora = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state["model"])
          if isinstance(v, nnx.LoRAParam)}
  return jax.device_get(metrics), lora


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_lora_dpo_on_data2_expert4_equals_one_device():
  cfg = PreferenceDataConfig(tokenizer="bytes", seq_len=256, pairs_per_row=2, shuffle=False)
  batch = next(make_preference_pipeline(cfg, get_tokenizer("bytes"), batch_size=16))  # 2 micro-batches of 8 rows
  one = _moe_step(build_mesh(None, jax.devices()[:1]), batch)
  eight = _moe_step(build_mesh(MeshConfig(data=2, expert=4)), batch)
  for k in ("loss", "dpo_loss", "rewards/margins", "logps/chosen", "grad_norm"):
    assert rel(eight[0][k], one[0][k]) < 1e-5, (k, eight[0][k], one[0][k])
  assert one[0]["rewards/margins"] != 0.0  # the second step's policy differs from the reference
  # after two AdamW steps of lr 1e-2, equal to 1% of one step (AdamW's m / sqrt(v) magnifies the rounding
  # differences of near-zero gradients; a wrong gradient moves a parameter by ~lr)
  for k, v in one[1].items():
    np.testing.assert_allclose(eight[1][k], v, rtol=0, atol=1e-4, err_msg=k)


def test_dpo_resume_is_exact_and_refuses_another_base(tmp_path, xla_cache):
  over = {**MICRO, "steps": 6, "optim.lr": 1e-3, "checkpoint.every_steps": 3, "dpo.reference": "precomputed"}
  train(_config(tmp_path / "whole", xla_cache, **over), PreferenceTuning())
  expected = {s: r["loss"] for s, r in _metrics(tmp_path / "whole").items()}
  run = tmp_path / "resumed"
  train(_config(run, xla_cache, **{**over, "steps": 3}), PreferenceTuning())
  summary = train(_config(run, xla_cache, **over), PreferenceTuning())
  assert summary["resumed_from"] == 3
  assert {s: r["loss"] for s, r in _metrics(run).items()} == expected  # bit-identical
  with pytest.raises(CheckpointError, match="another base") as e:
    train(_config(run, xla_cache, **{**over, "seed": 7, "steps": 9}), PreferenceTuning())
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, field", [
  ({"dpo.reference": "lora_base"}, "dpo.reference"),
  ({"dpo.loss_type": "simpo", "dpo.reference": "copy"}, "dpo.reference"),
  ({"dpo.beta": 0.0}, "dpo.beta"),
  ({"dpo.loss_type": "kto"}, "dpo.loss_type"),
  ({"finetune.method": "lora", "dpo.reference": "copy"}, "dpo.reference"),
])
def test_bad_dpo_config_is_named(tmp_path, xla_cache, override, field):
  with pytest.raises(TrainConfigError, match=field.replace(".", r"\.")):
    train(_config(tmp_path / "bad", xla_cache, **MICRO, steps=1, **override), PreferenceTuning())
  assert not (tmp_path / "bad").exists()


def test_bad_pair_row_is_named_before_compiling(tmp_path, xla_cache):
  rows = tmp_path / "pairs.jsonl"
  good = {"messages": [{"role": "user", "content": "Hi?"}], "chosen": "Hello.", "rejected": "Go away."}
  rows.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": 3}) + "\n")
  with pytest.raises(DataError, match=r"pairs\.jsonl:2"):
    train(_config(tmp_path / "bad", xla_cache, **MICRO, steps=1, **{"data.paths": str(rows),
                                                                    "data.eval_fraction": 0.0}), PreferenceTuning())
  assert not (tmp_path / "bad").exists()


def test_every_dpo_config_parses():
  """The shipped DPO configs are valid (the real-model ones with a base path filled in)."""
  from configs import dpo_ernie45_0p3b, dpo_ernie45_21b_a3b

  from ernie_jax.train.dpo_config import parse_dpo

  for module in (dpo_tiny, dpo_ernie45_0p3b, dpo_ernie45_21b_a3b):
    c = module.get_config()
    if module is not dpo_tiny:
      c.init_from = "/ckpt/base"
    cfg = parse_dpo(c)
    assert cfg.reference == ("copy" if module is dpo_tiny else "lora_base")
