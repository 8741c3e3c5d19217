"""Supervised fine-tuning end to end (experiments/sft.py, `ernie_jax.train.sft`): a tiny run lowers the
held-out assistant loss well below the base's and answers a held-out phrasing of a trained question with
the trained answer;
LoRA trains only the adapters (base bit-identical, no optimizer state for it); a LoRA run resumed after
SIGKILL reproduces every step's loss; a LoRA checkpoint refuses another base; bad LoRA targets are
named before anything compiles."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax.config import LoraConfig, ModelConfig
from ernie_jax.data import DataError
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.train.config import TrainConfigError
from ernie_jax.train.metrics import read_jsonl
from ernie_jax.train.optimizer import OptimConfig
from ernie_jax.train.param_groups import GroupsConfig, make_grouped_optimizer, optimizer_state_bytes, trained_filter
from ernie_jax.train.sft import AddLora, FineTuning
from ernie_jax.train.step import (abstract_train_state, batch_sharding, build_mesh, create_train_state,
                                  make_train_step, put_batch)
from ernie_jax.train.trainer import train
from tests.helpers import REPO_ROOT, run_config
from tests.train.test_pretrain import _env, _last_step, _start_and_wait

SFT = os.path.join(REPO_ROOT, "experiments", "sft.py")
TINY = os.path.join(REPO_ROOT, "experiments", "configs", "sft_tiny.py")
sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))
from configs import sft_tiny  # noqa: E402

FACTS = [("len", "The number of items."), ("abs", "The absolute value."), ("sorted", "A new sorted list."),
         ("repr", "A printable string."), ("hash", "An integer hash."), ("id", "The identity of an object.")]
# eight phrasings per fact to train on, a ninth held out: the model has to key its answer on the name
TRAIN_QUESTIONS = ("What is returned by `{}`?", "What does one get from `{}`?", "Result of `{}`?",
                   "Tell me the return value of `{}`?", "What comes out of `{}`?", "Output of `{}`?",
                   "Which value is returned by `{}`?", "Say what you get from `{}`?")
HELDOUT_QUESTION = "What do I receive from `{}`?"
QA = [(q.format(name), a) for name, a in FACTS for q in TRAIN_QUESTIONS]
HELDOUT = [(HELDOUT_QUESTION.format(name), a) for name, a in FACTS]
SHORT_QA = [(f"What does `{name}` return?", a) for name, a in FACTS]  # (fit MICRO's 64 bytes)

MICRO = {"model.hidden_size": 64, "model.num_hidden_layers": 2, "model.num_attention_heads": 2,
         "model.num_key_value_heads": 2, "model.head_dim": 32, "model.intermediate_size": 128,
         "data.seq_len": 64, "global_batch_size": 8, "metrics.log_every": 1, "metrics.progress_bar": False,
         "metrics.tensorboard": False, "optim.warmup_steps": 2, "finetune.sample_tokens": 0}


def _jsonl(path, pairs):
  with open(path, "w") as f:
    for q, a in pairs:
      f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
  return str(path)


def _config(workdir, xla_cache, **overrides):
  return run_config(sft_tiny.get_config(), workdir, xla_cache, **overrides)


def test_tiny_sft_lowers_heldout_loss_and_answers_a_heldout_prompt(tmp_path, xla_cache, capsys):
  data, heldout = _jsonl(tmp_path / "train.jsonl", QA), _jsonl(tmp_path / "heldout.jsonl", HELDOUT)
  summary = train(_config(tmp_path / "run", xla_cache, **{
    **MICRO, "steps": 300, "data.seq_len": 96, "metrics.log_every": 100, "finetune.eval_every": 100,
    "data.paths": data, "data.eval_paths": heldout, "optim.lr": 3e-3, "optim.warmup_steps": 10,
    "finetune.sample_prompt": HELDOUT[2][0], "finetune.sample_tokens": 40}), FineTuning())
  start, end = summary["eval_loss_at_start"], summary["eval_loss"]
  assert start > 4.5  # a random base: ~ln(259) nats per assistant byte
  assert end < 0.1 * start, summary  # the held-out assistant loss falls well below the base's
  assert summary["sample_answer"] == FACTS[2][1], summary  # a held-out phrasing gets the trained answer
  assert summary["eval_data"] == {"rows": 6, "truncated": 0, "dropped": 0, "skipped": 0}, summary
  assert summary["train_data"]["rows"] == len(QA) and summary["train_data"]["dropped"] == 0, summary
  records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r]
  assert [r["step"] for r in records] == [0, 100, 200, 300]
  # chat with the trained workdir from the command line (chat template, stop at <|end_of_sentence|>)
  from ernie_jax.cli import generate as generate_cli

  capsys.readouterr()
  assert generate_cli.main(["--checkpoint", str(tmp_path / "run"), "--chat", HELDOUT[4][0], "--json",
                            "--max-new-tokens", "40"]) == 0
  answer = json.loads(capsys.readouterr().out.splitlines()[0])
  assert answer["text"] == FACTS[4][1] and answer["output_ids"][-1] == 2, answer  # then <|end_of_sentence|> (eos)


def test_a_heldout_split_that_nothing_fits_is_an_error(tmp_path, xla_cache):
  data, heldout = _jsonl(tmp_path / "train.jsonl", [("`id`?", "Id.")]), _jsonl(tmp_path / "heldout.jsonl", HELDOUT)
  with pytest.raises(DataError, match=r"data.eval_paths.*none of its 6 conversations.*6 dropped.*data.seq_len=32"):
    train(_config(tmp_path / "run", xla_cache, **{**MICRO, "steps": 1, "data.seq_len": 32, "data.paths": data,
                                                   "data.eval_paths": heldout}), FineTuning())
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "0")


def _lora_state(cfg, lora, mesh):
  tx, schedule = make_grouped_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), GroupsConfig(), 10)
  wrt = trained_filter("lora")
  adapt = AddLora(lora, 0)
  graphdef, state = create_train_state(cfg, tx, seed=0, mesh=mesh, wrt=wrt, adapt=adapt)
  _, shardings, _ = abstract_train_state(cfg, tx, 0, mesh, wrt=wrt, adapt=adapt)
  return graphdef, state, make_train_step(graphdef, shardings, None, schedule, wrt=wrt)


def test_lora_steps_change_only_the_adapters_and_hold_no_base_optimizer_state():
  cfg = ModelConfig.tiny_moe()
  mesh = build_mesh(None, jax.devices()[:1])
  graphdef, state, step = _lora_state(cfg, LoraConfig(rank=4, dropout=0.1), mesh)
  base_before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state["model"])
                 if isinstance(v, nnx.Param) and not isinstance(v, nnx.LoRAParam)}  # (the bias Buffer moves)
  lora_before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state["model"])
                 if isinstance(v, nnx.LoRAParam)}
  assert lora_before and any("experts" in "/".join(map(str, p)) for p in lora_before)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, cfg.vocab_size, (4, 16)).astype(np.int32)
  batch = {"inputs": ids, "targets": np.roll(ids, -1, 1), "segment_ids": np.ones_like(ids),
           "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1)), "loss_mask": np.ones_like(ids)}
  with jax.set_mesh(mesh):
    placed = put_batch(batch, 1, batch_sharding(mesh))
    for _ in range(3):
      state, metrics = step(state, placed)
      assert bool(metrics["finite"])
  after = dict(nnx.to_flat_state(state["model"]))
  for p, v in base_before.items():  # the base Params (incl. experts, routers) are bit-identical
    np.testing.assert_array_equal(np.asarray(after[p].get_value()), v, err_msg=str(p))
  changed = [p for p, v in lora_before.items() if not np.array_equal(np.asarray(after[p].get_value()), v)]
  assert len(changed) == len(lora_before)  # every adapter (A and B) moved
  # the optimizer holds moments for the adapters only
  lora_bytes = sum(v.nbytes for v in lora_before.values())
  full_bytes = sum(v.nbytes for v in base_before.values() if v.dtype == np.float32) + lora_bytes
  opt = optimizer_state_bytes(nnx.to_pure_dict(state))
  assert 2 * lora_bytes <= opt < 2 * lora_bytes + 1024, (opt, lora_bytes)
  assert opt < 0.5 * 2 * full_bytes


def test_bad_lora_target_is_named_before_compiling(tmp_path, xla_cache):
  with pytest.raises((TrainConfigError, ValueError), match="attn.qq"):
    train(_config(tmp_path / "bad", xla_cache, **MICRO, steps=1, **{"finetune.method": "lora",
                                                                    "lora.targets": ("attn.qq",)}), FineTuning())
  assert not (tmp_path / "bad").exists()
  with pytest.raises(TrainConfigError, match="lora.rank"):
    train(_config(tmp_path / "bad", xla_cache, **MICRO, steps=1, **{"finetune.method": "lora", "lora.rank": 0}),
          FineTuning())


def _cli(workdir, xla_cache, overrides):
  args = [sys.executable, SFT, f"--config={TINY}", f"--config.workdir={workdir}",
          f"--config.compilation_cache_dir={xla_cache}"]
  return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r}


def test_lora_sft_resume_after_sigkill_is_exact_and_refuses_another_base(tmp_path, xla_cache):
  steps = 16
  over = {**MICRO, "steps": steps, "data.paths": _jsonl(tmp_path / "train.jsonl", SHORT_QA),
          "checkpoint.every_steps": 4, "finetune.method": "lora", "lora.dropout": 0.1,
          "model.moe_num_experts": 4, "model.moe_k": 2, "model.moe_intermediate_size": 32,
          "model.moe_layer_start_index": 1, "model.moe_num_shared_experts": 1}
  ref = tmp_path / "ref"
  subprocess.run(_cli(ref, xla_cache, over), env=_env(), check=True, capture_output=True)
  expected = _losses(ref)
  assert sorted(expected) == list(range(1, steps + 1))

  run = tmp_path / "killed"
  proc = _start_and_wait(_cli(run, xla_cache, over), run, until_step=9)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _last_step(run) < steps, "the run finished before it could be killed"
  out = subprocess.run(_cli(run, xla_cache, over), env=_env(), check=True, capture_output=True, text=True)
  info = json.load(open(run / "run_info.json"))
  assert info["resumed_from"] is not None and 4 <= info["resumed_from"] < steps, out.stdout
  assert _losses(run) == expected  # bit-identical, every step (adapters, optimizer, dropout keys, data)
  state_dir = run / "checkpoints" / str(steps) / "state"
  assert state_dir.is_dir()  # the checkpoint holds the adapters and buffers only: far smaller than the base
  # another base (a different seed of the random base) is refused, in one line, before anything compiles
  with pytest.raises(CheckpointError, match="trained on another base model") as e:
    train(_config(run, xla_cache, **{**over, "seed": 7, "steps": steps + 4}), FineTuning())
  assert "\n" not in str(e.value)
  # out: the LoRA workdir exports merged to HF (transformers gives the LoRA model's logits, the
  # generation config comes along); its MoE adapter includes shared-expert / dense-MLP targets, which
  # peft cannot represent on transformers' ERNIE MoE, so the peft export is refused in one line
  import torch
  import transformers

  from ernie_jax.cli import export as export_cli
  from ernie_jax.train.trained import load_trained

  assert export_cli.main(["--workdir", str(run), "--output", str(tmp_path / "hf")]) == 0
  assert (tmp_path / "hf" / "generation_config.json").exists()
  trained = load_trained(str(run))
  assert trained.kind == "lora" and trained.step == steps
  ids = np.random.default_rng(1).integers(3, 200, (2, 12))
  ours = np.asarray(trained.model(jnp.asarray(ids, jnp.int32)).logits)
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(torch.as_tensor(ids)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
  assert export_cli.main(["--workdir", str(run), "--output", str(tmp_path / "adapter"), "--format", "peft"]) == 1
  assert not (tmp_path / "adapter").exists()


def test_every_sft_config_parses():
  """The shipped SFT configs are valid (the real-model ones with a base path filled in)."""
  from configs import sft_ernie45_0p3b, sft_ernie45_21b_a3b

  from ernie_jax.train.sft_config import parse_sft

  for module in (sft_tiny, sft_ernie45_0p3b, sft_ernie45_21b_a3b):
    c = module.get_config()
    if not c.init_from and module is not sft_tiny:
      c.init_from = "/path/to/base"
    cfg = parse_sft(c)
    assert cfg.data.tokenizer in ("bytes", "/path/to/base"), module.__name__
  with pytest.raises(TrainConfigError, match="data.tokenizer"):
    parse_sft(sft_ernie45_0p3b.get_config())  # no base and no tokenizer
