"""The jitted train step: gradient accumulation, MTP loss, MoE losses and bias update, the
non-finite guard, the optimizer's weight-decay mask and schedule, FLOPs accounting."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers import flat_arrays
from ernie_jax import ModelConfig
from ernie_jax.parallel import MeshConfig, make_mesh
from ernie_jax.train import flops, linear_ce
from ernie_jax.train.optimizer import OptimConfig, decays, lr_schedule, make_optimizer
from ernie_jax.train.losses import LossConfig, mtp_targets
from ernie_jax.train.step import (abstract_train_state, batch_sharding, create_train_state,
                                  make_train_step, put_batch)

MOE_MTP = ModelConfig.tiny_moe(vocab_size=64, num_mtp_layers=1)


def _batch(rows, seq, vocab, seed=0, docs_per_row=2):
  """Packed rows of random documents (segment ids, restarting positions, per-document targets)."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(3, vocab, (rows, seq)).astype(np.int32)
  targets = rng.integers(3, vocab, (rows, seq)).astype(np.int32)
  seg = np.ones((rows, seq), np.int32)
  pos = np.tile(np.arange(seq, dtype=np.int32), (rows, 1))
  for r in range(rows):
    cut = rng.integers(2, seq - 2)
    seg[r, cut:] = 2
    pos[r, cut:] = np.arange(seq - cut)
    targets[r, :-1] = np.where(seg[r, 1:] == seg[r, :-1], inputs[r, 1:], targets[r, :-1])
  mask = np.ones((rows, seq), np.int32)
  mask[:, -1] = 0
  return dict(inputs=inputs, targets=targets, segment_ids=seg, positions=pos, loss_mask=mask)


def _run(cfg, tx, mesh, batch, *, accum=1, loss_cfg=LossConfig(), steps=1, schedule=None):
  graphdef, state = create_train_state(cfg, tx, seed=0, mesh=mesh)
  _, shardings, _ = abstract_train_state(cfg, tx, 0, mesh)
  step = make_train_step(graphdef, shardings, loss_cfg, schedule or (lambda s: 0.0), grad_accum=accum,
                         donate=False)
  with jax.set_mesh(mesh):
    b = put_batch(batch, accum, batch_sharding(mesh))
    history, states = [], [state]
    for _ in range(steps):
      new, metrics = step(states[-1], b)
      states.append(new)
      history.append(jax.device_get(metrics))
  _run.states = states  # every intermediate state, for tests that need them
  return graphdef, state, states[-1], history


def _flat(state, part="model"):
  return flat_arrays(state[part])


def test_grad_accumulation_and_mtp(mesh):
  """MoE + MTP model, SGD (so updates are the gradients), MoE auxiliary losses off:
  * 4 micro-batches give exactly the step of one 4x batch (losses, gradients, expert usage);
  * the MTP loss is part of the objective and the MTP layer learns."""
  batch = _batch(8, 16, MOE_MTP.vocab_size)
  loss_cfg = LossConfig(moe_aux_coef=0.0, moe_z_coef=0.0, bias_update_lr=0.0)
  tx = optax.sgd(0.5)
  _, before, one, m1 = _run(MOE_MTP, tx, mesh, batch, accum=1, loss_cfg=loss_cfg, steps=8)
  one_step = _run.states[1]
  _, _, four, m4 = _run(MOE_MTP, tx, mesh, batch, accum=4, loss_cfg=loss_cfg, steps=1)
  for k in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
    np.testing.assert_allclose(m4[0][k], m1[0][k], rtol=2e-5, err_msg=k)
  np.testing.assert_allclose(m4[0]["expert_usage"], m1[0]["expert_usage"])
  p0, p1, p4 = _flat(before), _flat(one_step), _flat(four)
  for name in p1:
    np.testing.assert_allclose(p4[name] - p0[name], p1[name] - p0[name], rtol=1e-4, atol=1e-6, err_msg=name)

  # MTP: total = LM + 0.1 * MTP; the MTP loss falls and the MTP parameters are trained
  np.testing.assert_allclose(m1[0]["loss"], m1[0]["lm_loss"] + 0.1 * m1[0]["mtp_loss"].mean(), rtol=1e-6)
  mtp = [float(h["mtp_loss"][0]) for h in m1]
  assert mtp[0] > 3.0 and mtp[-1] < mtp[0] - 0.3, mtp
  after = _flat(one)
  moved = {k for k in p0 if k.startswith("mtp/") and not np.array_equal(p0[k], after[k])}
  assert {"mtp/0/proj", "mtp/0/block/attn/q", "mtp/0/emb_norm/weight", "mtp/0/hidden_norm/weight"} <= moved


def test_fused_lm_head_loss_gives_the_step_of_the_whole_logits(mesh, monkeypatch):
  """loss.lm_chunk (the LM head fused with the cross-entropy, 5 of 16 positions at a time, the MTP heads too)
  gives the step computed from the whole logits: MoE + MTP with the tied head on one device, and dense + MTP
  with an untied head on a data x tensor mesh (the vocabulary split over tensor)."""
  dense = ModelConfig.tiny_dense(vocab_size=64, num_mtp_layers=1, tie_word_embeddings=False, num_key_value_heads=2)
  split = make_mesh(MeshConfig(data=2, tensor=2), devices=jax.devices()[:4])
  loss_cfg = LossConfig(moe_aux_coef=0.0, moe_z_coef=0.0, bias_update_lr=0.0)
  chunks = []
  fused_loss = linear_ce.nll_sum
  monkeypatch.setattr(linear_ce, "nll_sum", lambda *a, **kw: chunks.append(kw["chunk"]) or fused_loss(*a, **kw))
  for cfg, m in ((MOE_MTP, mesh), (dense, split)):
    batch = _batch(4, 16, cfg.vocab_size, seed=3)
    _, before, full, h_full = _run(cfg, optax.sgd(0.5), m, batch, loss_cfg=loss_cfg)
    assert chunks == []
    _, _, fused, h_fused = _run(cfg, optax.sgd(0.5), m, batch, loss_cfg=dataclasses.replace(loss_cfg, lm_chunk=5))
    assert chunks == [5, 5]  # traced once: the LM head and the MTP head
    chunks.clear()
    for k in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
      np.testing.assert_allclose(h_fused[0][k], h_full[0][k], rtol=2e-5, err_msg=k)
    p0, pf, pc = _flat(before), _flat(full), _flat(fused)
    for name in pf:
      np.testing.assert_allclose(pc[name] - p0[name], pf[name] - p0[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_mtp_targets_stay_inside_documents():
  targets = jnp.array([[10, 11, 12, 20, 21, 22]])
  seg = jnp.array([[1, 1, 1, 2, 2, 2]])
  mask = jnp.array([[1, 1, 1, 1, 1, 0]])
  tgt, m = mtp_targets(targets, seg, mask, depth=0)  # position t predicts targets[t + 1]
  np.testing.assert_array_equal(tgt[0, :5], [11, 12, 20, 21, 22])
  np.testing.assert_array_equal(m[0], [True, True, False, True, False, False])
  _, m1 = mtp_targets(targets, seg, mask, depth=1)  # targets[t + 2]
  np.testing.assert_array_equal(m1[0], [True, False, False, False, False, False])


def test_moe_losses_and_correction_bias_update(mesh):
  cfg = ModelConfig.tiny_moe(vocab_size=64)
  batch = _batch(4, 16, cfg.vocab_size, seed=2)
  _, before, after, hist = _run(cfg, optax.sgd(0.0), mesh, batch, loss_cfg=LossConfig(bias_update_lr=0.25))
  m = hist[0]
  assert m["moe_aux_loss"] > 0 and m["moe_z_loss"] > 0
  usage = m["expert_usage"]
  assert usage.shape == (2, 8) and np.allclose(usage.sum(-1), 4 * 16 * cfg.moe_k)
  b0 = _flat(before)["groups/1/blocks/layers/0/mlp/router/correction_bias"]
  b1 = _flat(after)["groups/1/blocks/layers/0/mlp/router/correction_bias"]
  np.testing.assert_allclose(b1 - b0, 0.25 * np.sign(usage.mean(-1, keepdims=True) - usage))


def test_non_finite_step_leaves_state_unchanged(mesh):
  cfg = ModelConfig.tiny_dense(vocab_size=64, num_mtp_layers=1)
  batch = _batch(2, 16, cfg.vocab_size)
  tx, schedule = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), 10)
  _, before, after, hist = _run(cfg, tx, mesh, batch, loss_cfg=LossConfig(mtp_weight=float("nan")),
                                schedule=schedule)
  assert not hist[0]["finite"] and math.isnan(hist[0]["loss"])
  for part in ("model", "opt"):
    b, a = _flat(before, part), _flat(after, part)
    assert all(np.array_equal(b[k], a[k]) for k in b), part


def test_an_update_that_overflows_the_parameters_is_reported(mesh):
  """Loss and gradients finite, the update applied: `params_finite` says whether every parameter still is (huge
  but finite parameters, whose norm overflows, count as finite)."""
  cfg = ModelConfig.tiny_dense(vocab_size=64)
  batch = _batch(2, 16, cfg.vocab_size)
  for lr, expected in ((float("inf"), False), (1e30, True)):
    _, _, after, hist = _run(cfg, optax.sgd(lr), mesh, batch)
    params = list(_flat(after).values())
    assert hist[0]["finite"] == hist[0]["params_finite"] == expected, (lr, hist[0])
    assert all(np.all(np.isfinite(p)) for p in params) == expected
    if expected:
      assert max(float(np.abs(p).max()) for p in params) > 1e20 and not np.isfinite(hist[0]["param_norm"])


def test_weight_decay_mask():
  key = lambda *names: tuple(jax.tree_util.DictKey(n) for n in names)
  assert decays(key("groups", 0, "blocks", "layers", 0, "attn", "q"))
  assert decays(key("groups", 1, "blocks", "layers", 0, "mlp", "experts", "gate"))
  assert not decays(key("groups", 0, "blocks", "layers", 0, "input_norm", "weight"))
  assert not decays(key("norm", "weight"))
  assert not decays(key("mtp", 0, "emb_norm", "weight"))
  assert decays(key("embed")) and not decays(key("embed"), decay_embeddings=False)


def test_lr_schedule():
  cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
  s = lr_schedule(cfg, 110)
  assert float(s(0)) == 0.0 and abs(float(s(5)) - 0.5) < 1e-6 and abs(float(s(10)) - 1.0) < 1e-6
  assert abs(float(s(60)) - 0.55) < 1e-6 and abs(float(s(110)) - 0.1) < 1e-6
  lin = lr_schedule(OptimConfig(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0), 100)
  assert abs(float(lin(50)) - 0.5) < 1e-6


def test_flops_formula():
  cfg = ModelConfig.tiny_dense(vocab_size=100)  # H 64, 2 layers, 4 heads x 24, 1 kv head, I 128
  per_layer = 64 * 24 * (2 * 4 + 2 * 1) + 3 * 64 * 128
  assert flops.active_matmul_params(cfg) == 2 * per_layer + 64 * 100
  attn = 2 * 2 * 2 * 4 * 24 * 32 / 2
  assert flops.train_flops_per_token(cfg, 32) == 3 * (2 * (2 * per_layer + 64 * 100) + attn)
  moe = ModelConfig.ernie45_21b_a3b()
  assert 2.5e9 < flops.active_matmul_params(moe) < 3.5e9  # "A3B"
  assert 20e9 < flops.total_params(moe) < 23e9  # "21B"


@pytest.mark.slow
def test_fp8_train_step(mesh):
  cfg = ModelConfig.tiny_dense(vocab_size=64, fp8_recipe="delayed")
  tx, schedule = make_optimizer(OptimConfig(lr=3e-3, warmup_steps=0), 10)
  _, _, after, hist = _run(cfg, tx, mesh, _batch(4, 16, 64), steps=4, accum=2, schedule=schedule)
  assert all(h["finite"] for h in hist) and hist[-1]["lm_loss"] < hist[0]["lm_loss"]
  scales = [v for k, v in _flat(after).items() if k.endswith("scale")]
  assert scales and all(np.all(s > 0) and np.all(s != 1.0) for s in scales)
