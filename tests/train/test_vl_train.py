"""ERNIE 4.5 VL in the real train step (`make_train_step` with the `VisionLanguage` task) and in
experiments/pretrain.py: the image-caption data pipeline (shapes, loss mask, resume, JSONL), the
loss falling on the built-in data and depending on the images, gradient accumulation, the two
correction-bias rows, expert parallelism on 8 devices, pretrain.py resume and init_from."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from tests.helpers import REPO_ROOT, flat_arrays
from ernie_jax.data import ByteTokenizer
from ernie_jax.data.pipeline import DataConfig
from ernie_jax.data.vl import ROW_KEYS, ShapeCaptions, VLDataPipeline, image_grid, text_only_bound
from ernie_jax.model.vl import VLConfig, prepare_inputs
from ernie_jax.parallel import MeshConfig, make_mesh
from ernie_jax.train.optimizer import OptimConfig, make_optimizer
from ernie_jax.train.losses import LossConfig
from ernie_jax.train.step import (abstract_train_state, batch_sharding, create_train_state,
                                  make_train_step, put_batch)
from ernie_jax.train.tasks import VisionLanguage

ROOT = REPO_ROOT
sys.path.insert(0, os.path.join(ROOT, "experiments"))

# VLConfig.tiny with the special tokens after the 259 byte-level ids (init std 0.1: with 0.02 the
# tiny model first sits on the text-only solution for ~200 steps before it starts to use the images)
SPECIAL = dict(image_token_id=259, image_start_token_id=260, image_end_token_id=261,
               video_start_token_id=262, video_end_token_id=263, video_token_id=264)
CFG = VLConfig.tiny(vocab_size=272, initializer_range=0.1, **SPECIAL)
DATA = DataConfig(source="shapes", tokenizer="bytes", seq_len=40, image_size=56, images_per_row=1)
TOK = ByteTokenizer()
GRID = image_grid(CFG, DATA.image_size)
TASK = VisionLanguage(GRID)
ROWS = 8
LOSS = LossConfig(bias_update_lr=0.05)
# router losses off for the accumulation check: like the text step (and the reference), aux / z
# losses are per-micro-batch means (load balance is a product of batch means: not additive)
EXACT = LossConfig(moe_aux_coef=0.0, moe_z_coef=0.0, bias_update_lr=0.05)


def _pipeline(cfg=DATA, rows=ROWS):
  return VLDataPipeline(cfg, TOK, CFG, batch_size=rows, eos_id=TOK.eos_id)


def _flat(state, part="model"):
  return flat_arrays(state[part])


@pytest.fixture(scope="module")
def batches():
  data = _pipeline(rows=2 * ROWS)
  return [next(data) for _ in range(2)]


# --------------------------------------------------------------------------------------------------
# Data
def test_pipeline_shapes_loss_mask_and_resume(batches):
  b = batches[0]
  patches = GRID[0] * GRID[1] * GRID[2]
  assert GRID == (1, 4, 4) and set(b) == set(ROW_KEYS)
  for k in ("inputs", "targets", "segment_ids", "loss_mask", "token_types"):
    assert b[k].shape == (2 * ROWS, DATA.seq_len) and b[k].dtype == np.int32, k
  assert b["positions"].shape == (2 * ROWS, DATA.seq_len, 3)
  assert b["pixel_values"].shape == (2 * ROWS, patches, 588) and b["pixel_values"].dtype == np.float32
  vision_ids = list(CFG.vision_token_ids)
  for r in range(2 * ROWS):
    real = b["segment_ids"][r] > 0
    inputs, targets, mask = b["inputs"][r][real], b["targets"][r][real], b["loss_mask"][r][real]
    # the prompt layout of vl_preprocess.build_prompt: start, 4 placeholders, end, caption, </s>
    np.testing.assert_array_equal(inputs[:6], [260, 259, 259, 259, 259, 261])
    assert targets[-1] == TOK.eos_id and (b["loss_mask"][r][~real] == 0).all()
    # loss exactly on the caption and its </s>: never on (predicting) an image token
    np.testing.assert_array_equal(mask, ~np.isin(targets, vision_ids))
    assert mask.sum() == len(targets) - 5
    caption = TOK.decode(targets[mask > 0])
    assert caption in ShapeCaptions.captions()
    # (t, h, w) positions and token types are those of prepare_inputs
    prep = prepare_inputs(CFG, inputs[None], image_grid_thw=[GRID])
    np.testing.assert_array_equal(b["positions"][r][real], prep["positions"][0])
    np.testing.assert_array_equal(b["token_types"][r][real], np.isin(inputs, vision_ids).astype(np.int32))
  # different images per row, normalised with the CLIP statistics (black background -> -mean/std)
  assert not np.array_equal(b["pixel_values"][0], b["pixel_values"][1])
  np.testing.assert_allclose(b["pixel_values"].min(), -0.48145466 / 0.26862954, rtol=1e-5)

  # resume: a new pipeline set to a saved position continues with the same batches
  data = _pipeline()
  next(data)
  state = json.loads(json.dumps(data.get_state()))
  want = [next(data) for _ in range(2)]
  again = _pipeline()
  again.set_state(state)
  for w in want:
    got = next(again)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k], err_msg=k)
  # two examples per row: one segment each, positions restart, both images' patches in the row
  two = next(_pipeline(dataclasses.replace(DATA, seq_len=80, images_per_row=2), rows=2))
  assert two["pixel_values"].shape == (2, 2 * patches, 588)
  seg = two["segment_ids"][0]
  assert set(seg[seg > 0]) == {1, 2} and two["positions"][0][np.argmax(seg == 2)].tolist() == [0, 0, 0]


def test_image_jsonl_source(tmp_path):
  from PIL import Image

  from ernie_jax.data.vl_preprocess import preprocess_image

  os.makedirs(tmp_path / "img")
  rs = np.random.RandomState(0)
  lines = []
  for i, (h, w) in enumerate([(30, 50), (80, 64), (56, 56)]):
    Image.fromarray(rs.randint(0, 255, (h, w, 3)).astype(np.uint8)).save(tmp_path / "img" / f"{i}.png")
    lines.append(json.dumps({"image": f"img/{i}.png", "text": f"picture number {i}"}))
  (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
  cfg = DataConfig(source="image_jsonl", paths=str(tmp_path / "data.jsonl"), tokenizer="bytes", seq_len=40,
                   image_size=56, shuffle=False)
  b = next(_pipeline(cfg, rows=3))
  for i in range(3):
    assert TOK.decode(b["targets"][i][b["loss_mask"][i] > 0]) == f"picture number {i}"
    img = Image.open(tmp_path / "img" / f"{i}.png").convert("RGB").resize((56, 56), Image.Resampling.BICUBIC)
    np.testing.assert_allclose(b["pixel_values"][i], preprocess_image(img)[0], rtol=1e-6)
  from ernie_jax.data.sources import DataError

  (tmp_path / "bad.jsonl").write_text(json.dumps({"picture": "img/0.png", "text": "x"}) + "\n")
  with pytest.raises(DataError, match="no field 'image'"):
    _pipeline(DataConfig(source="image_jsonl", paths=str(tmp_path / "bad.jsonl"), seq_len=40))


def test_text_only_bound_is_the_caption_entropy():
  caps = ShapeCaptions.captions()
  assert len(caps) == len(set(caps)) == 6 * 4 * 4
  # uniform, independent attributes: every caption equally likely
  src = ShapeCaptions(56, size=4000)
  counts = {}
  for i in range(len(src)):
    counts[src.caption(i)] = counts.get(src.caption(i), 0) + 1
  assert set(counts) == set(caps) and max(counts.values()) < 2.0 * min(counts.values())
  mean_tokens = np.mean([len(c) + 1 for c in caps])
  np.testing.assert_allclose(text_only_bound(TOK), np.log(96) / mean_tokens)


# --------------------------------------------------------------------------------------------------
# The train step
def _step_runs(mesh, tx, batch, accums, cfg=CFG, loss_cfg=EXACT):
  """{accum: (state before, state after, metrics)} for one step on `batch`."""
  graphdef, state = create_train_state(cfg, tx, seed=0, mesh=mesh)
  _, shardings, _ = abstract_train_state(cfg, tx, 0, mesh)
  out = {}
  with jax.set_mesh(mesh):
    for a in accums:
      step = make_train_step(graphdef, shardings, loss_cfg, lambda s: 0.0, grad_accum=a, donate=False, task=TASK)
      new, metrics = step(state, put_batch(batch, a, batch_sharding(mesh)))
      out[a] = (state, new, jax.device_get(metrics))
  return out


@pytest.fixture(scope="module")
def sgd_runs(mesh, batches):
  """One SGD step on 16 rows: one batch vs 2 accumulated micro-batches of 8 (SGD: the parameter
  update is the gradient)."""
  return _step_runs(mesh, optax.sgd(0.5), batches[0], (1, 2))


def test_grad_accumulation_equals_one_big_batch(sgd_runs):
  before, one, m1 = sgd_runs[1]
  _, two, m2 = sgd_runs[2]
  for k in ("loss", "lm_loss", "grad_norm"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
  for k in ("expert_usage_text", "expert_usage_vision"):
    np.testing.assert_array_equal(m2[k], m1[k])
  p0, p1, p2 = _flat(before), _flat(one), _flat(two)
  moved = 0
  for name in p1:
    np.testing.assert_allclose(p2[name], p1[name], rtol=0, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(p2[name] - p0[name], p1[name] - p0[name], rtol=1e-4, atol=1e-7, err_msg=name)
    moved += not np.array_equal(p1[name], p0[name])
  assert moved > 0.8 * len(p1)  # ViT, resampler, both expert sets and routers all get gradients
  assert 4.0 < m1["lm_loss"] < 7.0  # ~ln(272) at initialisation


def test_token_balance_constant_is_rows_times_seq():
  rows = {"inputs": np.zeros((16, 40), np.int32), "targets": np.full((16, 40), 70, np.int32),
          "loss_mask": np.ones((16, 40), np.int32)}
  rows["targets"][:, :5] = CFG.image_token_id  # vision-typed targets are never trained
  norms = TASK.normalisers(rows, CFG)
  assert norms["balance"] == 16 * 40 and float(norms["lm_count"]) == 16 * 35


def test_both_correction_bias_rows_follow_the_sign_rule(sgd_runs, batches):
  before, after, m = sgd_runs[1]
  b = batches[0]
  real = b["segment_ids"] > 0
  vision = np.isin(b["inputs"], CFG.vision_token_ids) & real
  usage = {"text": m["expert_usage_text"], "vision": m["expert_usage_vision"]}
  assert usage["text"].shape == usage["vision"].shape == (2, CFG.moe_num_experts)  # 2 MoE layers
  np.testing.assert_allclose(usage["text"].sum(-1), (real & ~vision).sum() * CFG.moe_k)  # padding excluded
  np.testing.assert_allclose(usage["vision"].sum(-1), vision.sum() * CFG.moe_k)
  p0, p1 = _flat(before), _flat(after)
  for name, u in usage.items():
    key = f"groups/1/blocks/layers/0/mlp/{name}_router/correction_bias"
    delta = p1[key] - p0[key]  # [repeats = 2 MoE layers, E]
    want = LOSS.bias_update_lr * np.sign(u.mean(-1, keepdims=True) - u)
    np.testing.assert_allclose(delta, want, atol=1e-7, err_msg=name)
    assert np.abs(delta).max() > 0, name


@pytest.fixture(scope="module")
def trained(mesh):
  """AdamW on the built-in shapes data: (metrics per step, final state, step fn, held-out batch)."""
  tx, schedule = make_optimizer(OptimConfig(lr=3e-3, warmup_steps=10, weight_decay=0.0), STEPS)
  graphdef, state = create_train_state(CFG, tx, seed=0, mesh=mesh)
  _, shardings, _ = abstract_train_state(CFG, tx, 0, mesh)
  step = make_train_step(graphdef, shardings, LOSS, schedule, task=TASK, donate=False)
  data = _pipeline(rows=16)
  held = put_batch(next(data), 1, batch_sharding(mesh))
  history = []
  with jax.set_mesh(mesh):
    for _ in range(STEPS):
      state, metrics = step(state, put_batch(next(data), 1, batch_sharding(mesh)))
      history.append(jax.device_get(metrics))
  return history, state, step, held


STEPS = 200


def test_vl_train_step_learns_and_looks_at_the_images(trained, mesh):
  history, state, step, held = trained
  lm = [float(h["lm_loss"]) for h in history]
  assert all(h["finite"] for h in history)
  assert lm[0] > 4.5 and np.mean(lm[-10:]) < 0.3 * lm[0], lm[::10]
  # the VL objective: token-balanced LM + coefficients x per-modality router losses
  for h in history[:3]:
    np.testing.assert_allclose(h["loss"], h["lm_loss"] + LOSS.moe_aux_coef * h["moe_aux_loss"]
                               + LOSS.moe_z_coef * h["moe_z_loss"], rtol=1e-6)
    np.testing.assert_allclose(h["moe_aux_loss"], h["moe_aux_loss_text"] + h["moe_aux_loss_vision"], rtol=1e-6)
    assert h["moe_aux_loss_vision"] > 0 and h["moe_z_loss_vision"] > 0 and h["moe_z_loss_text"] > 0
  # the trained model on held-out rows, with their own images vs the images of other rows
  # (captions no longer match): the caption loss depends on what the images show
  with jax.set_mesh(mesh):
    _, real = step(state, held)
    shuffled = dict(held, pixel_values=held["pixel_values"][:, np.roll(np.arange(16), 1)])
    _, wrong = step(state, shuffled)
  real, wrong = float(real["lm_loss"]), float(wrong["lm_loss"])
  # below what any model that ignores the images can reach, and worse with mismatched images
  bound = text_only_bound(TOK)
  assert real < 0.75 * bound and wrong > bound, (real, bound, wrong)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_expert_parallel_step_on_8_devices_matches_one_device(sgd_runs, batches):
  """data=2 x expert=4, all_to_all transport (no token can drop) vs the plain one-device step."""
  _, _, want = sgd_runs[2]  # 16 rows as 2 micro-batches of 8 (one row per device)
  cfg = CFG.replace(moe_transport="all_to_all", moe_capacity_factor=0.0)
  mesh8 = make_mesh(MeshConfig(data=2, expert=4))
  got = _step_runs(mesh8, optax.sgd(0.5), batches[0], (2,), cfg=cfg)[2][2]
  for k in ("loss", "lm_loss", "moe_aux_loss", "moe_z_loss", "grad_norm"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, err_msg=k)
  assert got["moe_dropped"] == 0
  np.testing.assert_allclose(got["expert_usage_vision"], want["expert_usage_vision"])


# --------------------------------------------------------------------------------------------------
# experiments/pretrain.py with configs/tiny_vl.py (shrunk so it compiles fast)
MICRO_VL = {
  "model.hidden_size": 32, "model.num_hidden_layers": 2, "model.num_attention_heads": 2,
  "model.num_key_value_heads": 1, "model.head_dim": 16, "model.intermediate_size": 64,
  "model.mrope_section": (3, 3, 2), "model.moe_num_experts": 4, "model.moe_intermediate_size": (32, 16),
  "model.vision.depth": 1, "model.vision.hidden_size": 32, "model.vision.intermediate_size": 64,
  "global_batch_size": 8, "data.seq_len": 80, "metrics.log_every": 1, "metrics.progress_bar": False,
  "metrics.tensorboard": False, "optim.warmup_steps": 1, "steps": 4, "checkpoint.every_steps": 2,
  "checkpoint.keep": 5,
}


def _vl_config(workdir, xla_cache, **overrides):
  from configs import tiny_vl

  c = tiny_vl.get_config()
  c.workdir = str(workdir)
  c.compilation_cache_dir = xla_cache
  for key, value in {**MICRO_VL, **overrides}.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_vl_config_errors_name_the_field(tmp_path):
  from ernie_jax.train import config as config_lib
  from ernie_jax.train.config import TrainConfigError

  from configs import tiny, tiny_vl

  parsed = config_lib.parse(tiny_vl.get_config())
  assert isinstance(parsed.model, VLConfig) and parsed.model.vision.depth == 2
  assert parsed.model.mlp_layer_types == ("dense", "sparse", "sparse", "sparse")
  bad = {"model_family": ("'model_family': must be one of", "pictures"),
         "data.source": ("'data.source': model_family='vl' trains on image-caption data", "stdlib"),
         "data.image_size": ("'data.image_size': must be a positive multiple of 28", 60),
         "data.seq_len": ("'data.seq_len': 12 cannot hold 2 image", 12),
         "model.image_token_id": ("'model.image_token_id': 100 is a text token", 100),
         "model.vision.num_heads": ("'model.vision.num_heads'", 3),
         "model.moe_k": ("'model.moe_k'", 9),
         "train.precision": ("'train.precision': must be '', 'fp32' or 'bf16' for model_family='vl'", "fp8")}
  for key, (message, value) in bad.items():
    c = tiny_vl.get_config()
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
    with pytest.raises(TrainConfigError, match=message.replace("(", r"\(")):
      config_lib.parse(c)
  c = tiny_vl.get_config()
  c.model.vision.pixels = 1
  with pytest.raises(TrainConfigError, match="'model.vision.pixels'"):
    config_lib.parse(c)
  c = tiny.get_config()
  c.data.source = "shapes"
  with pytest.raises(TrainConfigError, match="'data.source': 'shapes' is an image-caption source"):
    config_lib.parse(c)
  c = tiny_vl.get_config()
  c.train.precision = "bf16"
  assert config_lib.parse(c).model.dtype == "bfloat16"


def _losses(workdir):
  from ernie_jax.train.metrics import read_jsonl

  return {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def test_pretrain_tiny_vl_checkpoint_resume(tmp_path, xla_cache):
  import pretrain

  ref = tmp_path / "ref"
  summary = pretrain.train(_vl_config(ref, xla_cache))
  assert summary["step"] == 4 and summary["last_checkpoint"] == 4
  expected = _losses(ref)
  assert sorted(expected) == [1, 2, 3, 4]
  last = expected[4]
  for k in ("loss", "lm_loss", "moe_aux_loss_text", "moe_aux_loss_vision", "moe_z_loss_text",
            "moe_z_loss_vision", "moe_usage_max_over_mean_text", "moe_usage_max_over_mean_vision",
            "tokens_per_sec", "mfu"):
    assert np.isfinite(last[k]), k
  assert np.array(last["expert_usage_text"]).shape == np.array(last["expert_usage_vision"]).shape == (1, 4)
  info = json.load(open(ref / "run_info.json"))
  assert info["model_family"] == "vl" and info["text_only_bound"] > 0.1 and info["model_params"] > 0

  # resume from step 2 (the step-4 checkpoint removed): the same losses as the uninterrupted run
  moved = tmp_path / "moved"
  shutil.copytree(ref, moved)
  shutil.rmtree(moved / "checkpoints" / "4")
  summary = pretrain.train(_vl_config(moved, xla_cache))
  assert summary["resumed_from"] == 2
  got = _losses(moved)
  assert [got[s]["loss"] for s in (1, 2, 3, 4)] == [expected[s]["loss"] for s in (1, 2, 3, 4)]
  assert [got[s]["lm_loss"] for s in (3, 4)] == [expected[s]["lm_loss"] for s in (3, 4)]

  # a text config cannot resume a VL workdir
  from ernie_jax.interop.safetensors_io import CheckpointError
  from configs import tiny

  c = tiny.get_config()
  c.workdir, c.compilation_cache_dir = str(moved), xla_cache
  with pytest.raises(CheckpointError, match="holds a 'vl' model but the config has model_family='text'"):
    pretrain.train(c)


def _hf_config(c: VLConfig) -> dict:
  """A transformers-style VL config.json for `c` (what hf_config.read_vl reads)."""
  v = c.vision
  return {
    "model_type": "ernie4_5_vl_moe", "tie_word_embeddings": c.tie_word_embeddings,
    "text_config": {
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
      "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
      "head_dim": c.head_dim, "intermediate_size": c.intermediate_size, "rms_norm_eps": c.rms_norm_eps,
      "max_position_embeddings": c.max_position_embeddings, "mlp_layer_types": list(c.mlp_layer_types),
      "moe_num_experts": c.moe_num_experts, "moe_k": c.moe_k,
      "moe_intermediate_size": list(c.moe_intermediate_size), "moe_num_shared_experts": c.moe_num_shared_experts,
      "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta, "mrope_section": list(c.mrope_section)}},
    "vision_config": {"depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                      "num_heads": v.num_heads, "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
                      "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}},
    **{k: getattr(c, k) for k in SPECIAL},
  }


def test_pretrain_init_from_hf_and_orbax_vl_checkpoints(tmp_path, xla_cache):
  import pretrain
  import safetensors.numpy

  from ernie_jax.interop import hf_vl
  from ernie_jax.model.vl import Ernie45VLForConditionalGeneration
  from ernie_jax.train import config as config_lib

  # MICRO_VL's run (the train step test_pretrain_tiny_vl_checkpoint_resume compiled: a hit in the XLA cache),
  # with a checkpoint every step: step 1 runs at lr 0 (linear warmup from 0), so its Params are the loaded ones
  over = {"checkpoint.every_steps": 1}
  cfg = config_lib.parse(_vl_config(tmp_path, xla_cache, **over)).model
  source = Ernie45VLForConditionalGeneration(cfg, rngs=nnx.Rngs(123))
  os.makedirs(tmp_path / "hf")
  safetensors.numpy.save_file(hf_vl.state_to_hf(source), str(tmp_path / "hf" / "model.safetensors"))
  (tmp_path / "hf" / "config.json").write_text(json.dumps(_hf_config(cfg)))
  summary = pretrain.train(_vl_config(tmp_path / "run", xla_cache, **over, init_from=str(tmp_path / "hf")))
  assert summary["step"] == 4 and json.load(open(tmp_path / "run" / "run_info.json"))["init_from"]
  assert _losses(tmp_path / "run")[1]["lr"] == 0.0

  from ernie_jax.train.checkpoint import Checkpointer

  ck = Checkpointer(str(tmp_path / "run"), every_steps=0, keep=1)
  saved = ck.read_json(1, "model_config")["model_config"]
  ck.close()
  loaded = config_lib.model_from_dict(saved, "vl")
  assert loaded.replace(initializer_range=cfg.initializer_range) == cfg  # (an HF config has no init std)
  import orbax.checkpoint as ocp

  def saved_params(run, step=1):
    restored = ocp.StandardCheckpointer().restore(tmp_path / run / "checkpoints" / str(step) / "state")
    out = {}
    for key, _ in nnx.to_flat_state(nnx.state(source, nnx.Param)):
      node = restored
      for k in key:
        node = node[str(k)]
      out[key] = np.asarray(node)
    return out

  def check(saved, want):
    for key, value in want.items():
      np.testing.assert_allclose(saved[key], value, atol=1e-6, err_msg=str(key))

  check(saved_params("run"), {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(source, nnx.Param))})
  # and from that run's own (Orbax) training checkpoints: the latest (step 4, trained away from the source)
  trained = saved_params("run", 4)
  assert any(not np.allclose(trained[k], v, atol=1e-6) for k, v in saved_params("run").items())
  pretrain.train(_vl_config(tmp_path / "run2", xla_cache, **over, init_from=str(tmp_path / "run" / "checkpoints")))
  assert _losses(tmp_path / "run2")[1]["lr"] == 0.0
  check(saved_params("run2"), trained)
