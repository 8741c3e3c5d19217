"""VL supervised fine-tuning (experiments/sft.py with model_family="vl", `ernie_jax.train.sft_vl`): unused image
slots change nothing (logits, per-row loss sums, the task objective; also when the slots hold noise); a tiny run
through the recipe lowers the held-out assistant loss, answers a held-out image question and keeps a frozen vision
tower bit-identical; LoRA trains only the adapters (base bit-identical, no optimizer state for it), a LoRA checkpoint
resumes exactly, refuses another base and loads for export; the shipped VL configs parse."""

import dataclasses
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax.cli import export as export_cli
from ernie_jax.data import ByteTokenizer
from ernie_jax.data.vl_chat import VLChatDataConfig, make_vl_chat_eval_batches
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.loading import from_pretrained
from ernie_jax.model import model_class
from ernie_jax.model.vl import VLConfig
from ernie_jax.train.config import TrainConfigError
from ernie_jax.train.losses import lm_loss_sum
from ernie_jax.train.metrics import read_jsonl
from ernie_jax.train.sft import FineTuning
from ernie_jax.train.sft_config import parse_sft
from ernie_jax.train.step import (abstract_train_state, batch_sharding, build_mesh, create_train_state,
                                  make_train_step, put_batch)
from ernie_jax.train.tasks import VisionLanguage
from ernie_jax.train.trainer import train
from tests.helpers import REPO_ROOT, flat_arrays, run_config

sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))
from configs import sft_tiny_vl  # noqa: E402

pytest.importorskip("PIL")

SPECIAL = dict(image_token_id=259, image_start_token_id=260, image_end_token_id=261, video_start_token_id=262,
               video_end_token_id=263, video_token_id=264)
# a smaller model than sft_tiny_vl.py's, for the end-to-end tests
MICRO = {"model.hidden_size": 64, "model.num_hidden_layers": 2, "model.num_attention_heads": 2,
         "model.num_key_value_heads": 2, "model.intermediate_size": 128, "model.moe_num_experts": 4,
         "model.moe_intermediate_size": (64, 32), "model.vision.depth": 1, "model.vision.hidden_size": 32,
         "model.vision.intermediate_size": 64, "global_batch_size": 8, "data.seq_len": 96, "data.images_per_row": 2,
         "finetune.eval_batches": 2, "metrics.log_every": 10, "metrics.progress_bar": False,
         "metrics.tensorboard": False}


def _config(workdir, xla_cache, **overrides):
  return run_config(sft_tiny_vl.get_config(), workdir, xla_cache, **{**MICRO, **overrides})


def test_unused_image_slots_change_nothing():
  cfg = VLConfig.tiny(vocab_size=272, **SPECIAL)
  model = model_class(cfg)(cfg, rngs=nnx.Rngs(0))
  data = VLChatDataConfig(tokenizer="bytes", image_size=56, seq_len=256, packing=False)
  tok = ByteTokenizer()
  two, four = (make_vl_chat_eval_batches(dataclasses.replace(data, images_per_row=k), tok, cfg, batch_size=8)[0]
               for k in (2, 4))  # the same held-out conversations, with 2 or 4 image slots per row
  for k in ("inputs", "targets", "loss_mask", "positions", "token_types", "segment_ids"):
    np.testing.assert_array_equal(two[k], four[k], err_msg=k)
  images = np.count_nonzero(two["inputs"] == 259, axis=1) // 4
  assert set(images) == {1, 2}  # rows with one and with two images in one batch
  np.testing.assert_array_equal(four["pixel_values"][:, 2 * 16:], 0)
  noisy = dict(four, pixel_values=four["pixel_values"].copy())
  for r, n in enumerate(images):  # unused slots holding noise instead of zeros
    noisy["pixel_values"][r, n * 16:] = np.random.default_rng(r).normal(size=noisy["pixel_values"][r, n * 16:].shape)
  task = VisionLanguage((1, 4, 4))
  gdef, params, rest = nnx.split(model, nnx.Param, ...)
  norms = task.normalisers({k: jnp.asarray(v) for k, v in two.items()}, cfg)  # (the same for both layouts)

  @jax.jit
  def run(params, rest, batch):
    out = task.forward(nnx.merge(gdef, params, rest), batch)
    nll = jax.vmap(lambda lg, t, m: lm_loss_sum(lg[None], t[None], m[None])[0])(
      out.logits, batch["targets"], task.lm_mask(batch, cfg))
    objective = task.loss_fn(gdef, rest, 1, norms)(params, batch)[0]  # token-balanced LM loss + router losses
    return out.logits, nll, objective

  logits, nll, objective = run(params, rest, two)
  for other in (four, noisy):
    got = run(params, rest, other)
    np.testing.assert_allclose(got[0], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], nll, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2], objective, rtol=1e-5)
  # (a merge over the whole batch would give row r + 1 row r's unused slots: the rows above would differ)
  assert not np.allclose(run(params, rest, dict(two, pixel_values=np.roll(two["pixel_values"], 1, axis=0)))[0], logits)


def test_tiny_vl_sft_lowers_heldout_loss_and_answers(tmp_path, xla_cache, capsys):
  run = tmp_path / "run"
  over = {"steps": 40, "finetune.eval_every": 20, "checkpoint.every_steps": 20, "optim.warmup_steps": 5,
          "finetune.sample_tokens": 12, "groups.freeze_vision": True, "groups.router_lr_ratio": 0.01}
  summary = train(_config(run, xla_cache, **over), FineTuning())
  start, end = summary["eval_loss_at_start"], summary["eval_loss"]
  assert start > 5.0 and end < 0.3 * start, summary  # random base ~6.3 nats; the answers' wording is learned
  assert 0 < summary["text_only_bound"] < 1.0
  assert summary["sample_question"].startswith("<image 1>") and summary["sample_expected"], summary
  assert "sample: User: <image 1>" in capsys.readouterr().out
  records = read_jsonl(run / "metrics.jsonl")
  assert [r["step"] for r in records if "eval_loss" in r] == [0, 20, 40]
  first, last = (flat_arrays(nnx.state(from_pretrained(str(run / "checkpoints" / str(s))), nnx.Param))
                 for s in (20, 40))
  vision = [k for k in first if k.startswith("vision_model/")]
  assert vision and all(np.array_equal(first[k], last[k]) for k in vision)  # groups.freeze_vision
  assert not all(np.array_equal(first[k], last[k]) for k in first if k not in vision)


def _lora_config(workdir, xla_cache, **overrides):
  return _config(workdir, xla_cache, **{"finetune.method": "lora", "lora.rank": 4, "optim.lr": 1e-2,
                                        "optim.warmup_steps": 0,
                                        "lora.targets": ("attn", "experts", "resampler"), "lora.dropout": 0.1,
                                        **overrides})


def test_vl_lora_trains_only_adapters_resumes_and_refuses_another_base(tmp_path, xla_cache):
  """LoRA VL SFT. Through the recipe's own pieces (base + LoRA, data, optimizer groups, trained filter, task, the
  run's mesh): three steps on VL chat batches move every adapter (attention, text and vision experts, resampler)
  and nothing of the base, whose parameters hold no optimizer state. Then the same run through `train` (its step
  comes from the compilation cache): resumed from a checkpoint it repeats the losses, against another base it is
  refused, and its peft export is refused (the correction bias moved, an adapter cannot carry it)."""
  from ernie_jax.train.trained import load_trained

  run = tmp_path / "lora"
  # 3 layers: the vision experts of the last layer get no gradient (image tokens are prompt tokens: no loss at
  # them, and no later layer reads them), those of the layer before do
  over = {"model.num_hidden_layers": 3, "steps": 4, "checkpoint.every_steps": 2, "finetune.sample_tokens": 0,
          "metrics.log_every": 1, "finetune.eval_batches": 1}
  recipe = FineTuning()
  cfg = parse_sft(_lora_config(run, xla_cache, **over))
  mesh = build_mesh(cfg.mesh)
  model_cfg, model = recipe.model_config(cfg, None, None, mesh)
  setup = recipe.setup(cfg, recipe.tokenizer(cfg, str(tmp_path)), model_cfg)
  tx, schedule = recipe.optimizer(cfg, model_cfg)
  wrt, adapt = recipe.wrt(cfg, model_cfg), recipe.adapt(cfg, model_cfg)
  graphdef, state = create_train_state(model_cfg, tx, seed=0, mesh=mesh, pretrained=model, wrt=wrt, adapt=adapt)
  _, shardings, _ = abstract_train_state(model_cfg, tx, 0, mesh, wrt=wrt, adapt=adapt)
  step = make_train_step(graphdef, shardings, None, schedule, task=recipe.task(cfg, model_cfg), wrt=wrt)
  before = flat_arrays(state["model"])
  kinds = {"/".join(map(str, p)): isinstance(v, nnx.LoRAParam) for p, v in nnx.to_flat_state(state["model"])
           if isinstance(v, nnx.Param)}
  lora = {k for k, is_lora in kinds.items() if is_lora}
  assert any("vision_experts" in k for k in lora) and any("resampler" in k for k in lora)
  with jax.set_mesh(mesh):
    for _ in range(3):  # (B starts at 0, so A first moves in the second step)
      state, metrics = step(state, put_batch(next(setup.data), 1, batch_sharding(mesh)))
      assert bool(metrics["finite"])
  after = flat_arrays(state["model"])
  for k in set(kinds) - lora:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)  # incl. the vision tower, routers, resampler
  assert {k for k in lora if not np.array_equal(after[k], before[k])} == lora
  opt = [x for x in jax.tree.leaves(nnx.to_pure_dict(state["opt"])) if hasattr(x, "size")]
  size = sum(before[k].size for k in lora)
  assert 2 * size <= sum(x.size for x in opt) < 2 * size + 64  # moments of the adapters only

  train(_lora_config(run, xla_cache, **over), FineTuning())
  losses = {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}
  assert sorted(losses) == [1, 2, 3, 4]
  shutil.rmtree(run / "checkpoints" / "4")
  assert train(_lora_config(run, xla_cache, **over), FineTuning())["resumed_from"] == 2
  assert {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r} == losses
  with pytest.raises(CheckpointError, match="trained on another base model") as e:
    train(_lora_config(run, xla_cache, **{**over, "seed": 7, "steps": 6}), FineTuning())
  assert "\n" not in str(e.value)
  trained = load_trained(str(run))
  assert trained.kind == "lora" and trained.step == 4 and trained.model.config.is_vl
  # the run moved the MoE correction bias (aux-loss-free balancing), which a peft adapter cannot carry
  with pytest.raises(CheckpointError, match=r"changed groups/1/.*correction_bias.*cannot carry.*--format hf"):
    export_cli.export(str(run), str(tmp_path / "adapter"), format="peft")
  assert not (tmp_path / "adapter").exists()


def test_shipped_vl_configs_parse_and_bad_vl_fields_are_named():
  from configs import sft_ernie45_vl_28b_a3b

  c = sft_ernie45_vl_28b_a3b.get_config()
  c.init_from = "/path/to/base"
  cfg = parse_sft(c)
  assert cfg.model.is_vl and isinstance(cfg.data, VLChatDataConfig) and cfg.data.tokenizer == "/path/to/base"
  assert (cfg.finetune.method, cfg.groups.freeze_vision, cfg.groups.router_lr_ratio, cfg.optim.lr,
          cfg.optim.warmup_steps) == ("full", True, 0.01, 1e-5, 100)
  c.finetune.method = "lora"
  assert parse_sft(c).lora.rank == 32  # LoRA with the vision tower frozen is allowed (no adapter in it trains)
  tiny = parse_sft(sft_tiny_vl.get_config())
  assert tiny.data.tokenizer == "bpe" and tiny.data.image_size == 56
  for field, value, match in (("data.image_size", 50, "data.image_size"), ("data.image_prefix", "{j}", "image_prefix"),
                              ("model.image_token_id", 300, "model.image_token_id")):
    bad = run_config(sft_tiny_vl.get_config(), "/tmp/x", "", **{field: value})
    with pytest.raises(TrainConfigError, match=match):
      parse_sft(bad)
