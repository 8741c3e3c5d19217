"""DPO losses (ernie_jax.train.dpo_losses): every loss type, length handling, SFT / preference ratios and the
TRL metrics against direct numpy formulas; padding pairs contribute nothing (and no NaN gradients);
policy == reference gives log 2 per pair; `token_logps` / `segment_sums` / `pair_logps` against numpy
log_softmax on a packed row; the packed sequence log-probs of a real model equal transformers' per-token
log-probs summed over the answers of each sequence run alone; `validate_dpo` names the field."""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ernie_jax
from ernie_jax.train.dpo_losses import (METRIC_KEYS, TIE_RTOL, DPOConfig, pair_logps, preference_loss, segment_sums,
                                        token_logps, validate_dpo)
from tests import hf_reference as ref


def _logsig(z):
  return -np.logaddexp(0.0, -z)


def _np_loss(cfg: DPOConfig, pol: dict, refr: dict | None, valid):
  """The formulas of the module docstring, written directly in float64 numpy."""
  d = lambda x: np.asarray(x, np.float64)  # noqa: E731
  pc, pr, nc, nr = d(pol["chosen_logps"]), d(pol["rejected_logps"]), d(pol["chosen_tokens"]), d(pol["rejected_tokens"])
  v = np.asarray(valid, bool)
  pc, pr, nc, nr = pc[v], pr[v], nc[v], nr[v]
  rc, rr = (np.zeros_like(pc), np.zeros_like(pr)) if cfg.loss_type == "simpo" else \
    (d(refr["chosen_logps"])[v], d(refr["rejected_logps"])[v])
  if cfg.loss_type in ("ipo", "simpo"):
    norm = lambda lp, n: lp / n  # noqa: E731
  elif cfg.normalize_logps:
    norm = lambda lp, n: lp * ((nc + nr) / 2) / n  # noqa: E731
  else:
    norm = lambda lp, n: lp  # noqa: E731
  pcn, prn, rcn, rrn = norm(pc, nc), norm(pr, nr), norm(rc, nc), norm(rr, nr)
  x, b, ls = (pcn - prn) - (rcn - rrn), cfg.beta, cfg.label_smoothing
  if cfg.loss_type == "sigmoid":
    pref = -(1 - ls) * _logsig(b * x) - ls * _logsig(-b * x)
  elif cfg.loss_type == "simpo":
    z = b * x - cfg.simpo_gamma
    pref = -(1 - ls) * _logsig(z) - ls * _logsig(-z)
  elif cfg.loss_type == "hinge":
    pref = np.maximum(0.0, 1 - b * x)
  else:
    pref = (x - 1 / (2 * b)) ** 2
  sft = -pc / nc
  loss = np.sum(cfg.pref_loss_ratio * pref + cfg.sft_loss_ratio * sft)
  r_c, r_r = b * (pcn - rcn), b * (prn - rrn)
  m = r_c - r_r
  tie = np.abs(x) <= TIE_RTOL * (np.abs(pcn) + np.abs(prn) + np.abs(rcn) + np.abs(rrn))  # fp32 rounding of the log-probs
  metrics = {"rewards/chosen": r_c.sum(), "rewards/rejected": r_r.sum(), "rewards/margins": m.sum(),
             "rewards/accuracies": np.where(tie, 0.5, m > 0).sum(), "logps/chosen": pc.sum(),
             "logps/rejected": pr.sum(), "pairs": v.sum(), "dpo_loss": pref.sum(), "sft_loss": sft.sum()}
  return loss, metrics


def _pairs(seed: int, shape=(3, 4), p_valid=0.7):
  """Random policy / reference log-prob sums and token counts; invalid (padding) pairs have 0 counts."""
  rs = np.random.RandomState(seed)
  valid = rs.rand(*shape) < p_valid
  valid.flat[0] = True
  nc, nr = (np.where(valid, rs.randint(1, 30, shape), 0).astype(np.float32) for _ in range(2))
  lp = lambda n: (-n * rs.uniform(0.3, 3.0, shape)).astype(np.float32)  # noqa: E731
  pol = {"chosen_logps": lp(nc), "rejected_logps": lp(nr), "chosen_tokens": nc, "rejected_tokens": nr}
  refr = {"chosen_logps": pol["chosen_logps"] + rs.normal(0, 2, shape).astype(np.float32) * valid,
          "rejected_logps": pol["rejected_logps"] + rs.normal(0, 2, shape).astype(np.float32) * valid}
  return pol, refr, valid


CASES = {
  "sigmoid": DPOConfig(),
  "sigmoid_raw": DPOConfig(normalize_logps=False),
  "sigmoid_smoothed": DPOConfig(label_smoothing=0.2, beta=0.3),
  "sigmoid_sft_ratios": DPOConfig(sft_loss_ratio=0.7, pref_loss_ratio=0.5),
  "sft_only": DPOConfig(sft_loss_ratio=1.0, pref_loss_ratio=0.0),
  "hinge": DPOConfig(loss_type="hinge", beta=0.05),
  "hinge_raw": DPOConfig(loss_type="hinge", normalize_logps=False),
  "ipo": DPOConfig(loss_type="ipo", beta=0.5),
  "simpo": DPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.5),
  "simpo_smoothed": DPOConfig(loss_type="simpo", beta=2.5, simpo_gamma=1.3, label_smoothing=0.1,
                              sft_loss_ratio=0.2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_metrics_match_numpy(name):
  cfg = CASES[name]
  pol, refr, valid = _pairs(seed=len(name))
  loss, metrics = preference_loss(cfg, pol, None if cfg.loss_type == "simpo" else refr, valid)
  want_loss, want = _np_loss(cfg, pol, refr, valid)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(float(loss), want_loss, rtol=2e-6, atol=1e-6)
  assert set(metrics) == set(METRIC_KEYS)
  for k in METRIC_KEYS:
    assert metrics[k].dtype == jnp.float32, k
    np.testing.assert_allclose(float(metrics[k]), want[k], rtol=2e-6, atol=1e-5, err_msg=k)
  # the accuracy is not trivially 0 / 1 / 1/2 per pair here, and the length handling matters
  assert 0 < float(metrics["rewards/accuracies"]) < float(metrics["pairs"]) or cfg.loss_type == "simpo"
  if cfg.loss_type != "simpo":  # simpo ignores the reference entirely
    _, other = preference_loss(cfg, pol, {k: v + 1.0 for k, v in refr.items()}, valid)
    assert float(other["rewards/chosen"]) != float(metrics["rewards/chosen"])
  else:
    again, _ = preference_loss(cfg, pol, refr, valid)
    assert float(again) == float(loss)


def test_length_handling_changes_the_loss():
  pol, refr, valid = _pairs(seed=1)
  losses = [float(preference_loss(c, pol, refr, valid)[0])
            for c in (DPOConfig(), DPOConfig(normalize_logps=False), DPOConfig(loss_type="ipo"))]
  assert len({round(x, 6) for x in losses}) == 3


@pytest.mark.parametrize("name", ["sigmoid", "hinge", "ipo", "simpo_smoothed", "sigmoid_sft_ratios"])
def test_padding_pairs_contribute_nothing(name):
  cfg = CASES[name]
  pol, refr, valid = _pairs(seed=7)
  rs = np.random.RandomState(0)
  # garbage in the padding entries (counts 0 there): must neither count nor turn into NaN gradients
  junk = lambda x: np.where(valid, x, rs.normal(0, 50, x.shape)).astype(np.float32)  # noqa: E731
  pol_j = {k: (junk(v) if "logps" in k else v) for k, v in pol.items()}
  ref_j = {k: junk(v) for k, v in refr.items()}
  loss, metrics = preference_loss(cfg, pol_j, ref_j, valid)
  flat = lambda d: {k: v[valid] for k, v in d.items()}  # noqa: E731
  want, want_m = preference_loss(cfg, flat(pol), flat(refr), np.ones(valid.sum(), bool))
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
  for k in METRIC_KEYS:
    np.testing.assert_allclose(float(metrics[k]), float(want_m[k]), rtol=1e-6, atol=1e-6, err_msg=k)
  assert float(metrics["pairs"]) == valid.sum() < valid.size

  def f(c, r):
    return preference_loss(cfg, {**pol_j, "chosen_logps": c, "rejected_logps": r}, ref_j, valid)[0]

  gc, gr = jax.grad(f, argnums=(0, 1))(jnp.asarray(pol_j["chosen_logps"]), jnp.asarray(pol_j["rejected_logps"]))
  for g in (np.asarray(gc), np.asarray(gr)):
    assert np.isfinite(g).all() and not np.any(g[~valid]) and np.any(g[valid])


def test_policy_equal_to_reference():
  pol, _, valid = _pairs(seed=3)
  n = valid.sum()
  same = {"chosen_logps": pol["chosen_logps"], "rejected_logps": pol["rejected_logps"]}
  loss, m = jax.jit(lambda p, r, v: preference_loss(DPOConfig(), p, r, v))(pol, same, valid)
  np.testing.assert_allclose(float(loss), n * math.log(2), rtol=1e-6)  # log 2 per pair
  np.testing.assert_allclose(float(m["dpo_loss"]) / n, math.log(2), rtol=1e-6)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
    assert float(m[k]) == 0.0, k
  assert float(m["rewards/accuracies"]) / float(m["pairs"]) == 0.5  # ties count 1/2
  # a reference pass that rounds differently in the last bits (another compiled program) is still a tie
  ulp = {k: np.nextafter(np.asarray(v, np.float32), np.float32(0)) for k, v in same.items()}
  m = jax.jit(lambda p, r, v: preference_loss(DPOConfig(), p, r, v)[1])(pol, ulp, valid)
  assert float(m["rewards/margins"]) != 0.0 and float(m["rewards/accuracies"]) / float(m["pairs"]) == 0.5
  # label smoothing leaves log 2 at x = 0
  np.testing.assert_allclose(float(preference_loss(DPOConfig(label_smoothing=0.3), pol, same, valid)[0]),
                             n * math.log(2), rtol=1e-6)


def test_reference_needed_except_for_simpo():
  pol, _, valid = _pairs(seed=4)
  with pytest.raises(ValueError, match="needs the reference"):
    preference_loss(DPOConfig(), pol, None, valid)
  preference_loss(DPOConfig(loss_type="simpo"), pol, None, valid)


# ------------------------------------------------------------------------------------------------
def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_token_logps_fp32_from_bf16():
  rs = np.random.RandomState(0)
  logits = jnp.asarray(rs.normal(0, 4, (2, 5, 37)), jnp.bfloat16)
  targets = jnp.asarray(rs.randint(0, 37, (2, 5)), jnp.int32)
  got = token_logps(logits, targets)
  assert got.dtype == jnp.float32 and got.shape == (2, 5)
  want = np.take_along_axis(_np_log_softmax(np.asarray(logits.astype(jnp.float32))), np.asarray(targets)[..., None],
                            -1)[..., 0]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-5)
  # computing in bf16 would be visibly worse: the fp32 path is really taken
  bf16 = jax.nn.log_softmax(logits, -1)
  bf16 = np.take_along_axis(np.asarray(bf16.astype(jnp.float32)), np.asarray(targets)[..., None], -1)[..., 0]
  assert np.abs(bf16 - want).max() > 10 * np.abs(np.asarray(got) - want).max()


def test_segment_sums_ignores_padding_and_extra_segments():
  vals = np.arange(1, 9, dtype=np.float32).reshape(1, 8)
  seg = np.array([[1, 1, 2, 0, 3, 3, 5, 0]], np.int32)
  got = np.asarray(segment_sums(jnp.asarray(vals), jnp.asarray(seg), 4))
  np.testing.assert_array_equal(got, [[1 + 2, 3, 5 + 6, 0]])


def _packed_example(pairs_per_row: int):
  """Two rows of 16 positions: row 0 holds 2 pairs (segments 1..4), row 1 one pair; random loss masks."""
  rs = np.random.RandomState(1)
  seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4, 0],
                  [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0]], np.int32)
  mask = (rs.rand(2, 16) < 0.6) & (seg > 0)
  for r in range(2):  # every present segment has at least one answer token (its last position)
    for s in set(seg[r]) - {0}:
      mask[r, np.nonzero(seg[r] == s)[0][-1]] = True
  logits = rs.normal(0, 2, (2, 16, 23)).astype(np.float32)
  targets = rs.randint(0, 23, (2, 16)).astype(np.int32)
  return logits, targets, mask.astype(np.int32), seg


def test_pair_logps_on_a_packed_row():
  logits, targets, mask, seg = _packed_example(2)
  out = pair_logps(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), jnp.asarray(seg), 3)
  lp = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
  want = np.zeros((2, 6))
  cnt = np.zeros((2, 6))
  for r in range(2):
    for j in range(6):
      sel = (seg[r] == j + 1) & (mask[r] > 0)
      want[r, j], cnt[r, j] = lp[r][sel].sum(), sel.sum()
  np.testing.assert_allclose(np.asarray(out["chosen_logps"]), want[:, 0::2], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["rejected_logps"]), want[:, 1::2], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out["chosen_tokens"]), cnt[:, 0::2])
  np.testing.assert_array_equal(np.asarray(out["rejected_tokens"]), cnt[:, 1::2])
  np.testing.assert_array_equal(np.asarray(out["valid"]), [[True, True, False], [True, False, False]])
  assert int(out["unassigned_tokens"]) == 0
  assert all(out[k].dtype == jnp.float32 for k in ("chosen_logps", "rejected_logps", "chosen_tokens"))
  # with room for one pair per row, row 0's second pair is outside the layout: counted as unassigned
  one = pair_logps(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), jnp.asarray(seg), 1)
  assert int(one["unassigned_tokens"]) == int(mask[0][seg[0] > 2].sum()) > 0
  with pytest.raises(ValueError, match="pairs_per_row"):
    pair_logps(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), jnp.asarray(seg), 0)


def test_loss_gradient_reaches_only_answer_logits():
  logits, targets, mask, seg = _packed_example(2)

  def loss(lg):
    pol = pair_logps(lg, targets, mask, seg, 2)
    refr = {k: jax.lax.stop_gradient(v) - 0.3 for k, v in pol.items() if k.endswith("logps")}
    return preference_loss(DPOConfig(sft_loss_ratio=0.1), pol, refr, pol["valid"])[0]

  g = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(logits)))
  assert np.isfinite(g).all()
  assert not np.any(g[mask == 0]) and np.all(np.abs(g[mask > 0]).sum(-1) > 0)


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  torch_model = ref.build("dense", seed=11)
  return torch_model, ernie_jax.from_pretrained(ref.save(torch_model, tmp_path_factory.mktemp("dpo_hf")))


def test_packed_sequence_logps_match_transformers(hf_model):
  """Two pairs rendered into one row (four segments, positions restarting) through our model equal the
  sums of transformers' log_softmax over the answer tokens of each sequence run alone."""
  torch_model, model = hf_model
  vocab, rs = torch_model.config.vocab_size, np.random.RandomState(2)
  tok = lambda n: rs.randint(3, vocab, n)  # noqa: E731
  sequences = []  # (prompt + answer, prompt length), in segment order: chosen 1, rejected 1, chosen 2, ...
  for n_prompt, n_chosen, n_rejected in ((5, 7, 4), (3, 2, 9)):
    prompt = tok(n_prompt)
    sequences += [(np.concatenate([prompt, tok(n_chosen)]), n_prompt),
                  (np.concatenate([prompt, tok(n_rejected)]), n_prompt)]
  s = 48
  inputs, targets, mask, seg, pos = (np.zeros((1, s), np.int32) for _ in range(5))
  off = 0
  for j, (seq, n_prompt) in enumerate(sequences):
    n = len(seq) - 1
    inputs[0, off:off + n], targets[0, off:off + n] = seq[:-1], seq[1:]
    mask[0, off + n_prompt - 1:off + n] = 1  # targets that are answer tokens
    seg[0, off:off + n], pos[0, off:off + n] = j + 1, np.arange(n)
    off += n
  assert off < s  # a padded tail
  logits = nnx.jit(lambda m, *a: m(*a).logits)(model, jnp.asarray(inputs), jnp.asarray(pos), jnp.asarray(seg))
  got = pair_logps(logits, jnp.asarray(targets), jnp.asarray(mask), jnp.asarray(seg), 3)
  want = []
  for seq, n_prompt in sequences:
    with torch.no_grad():
      lg = torch_model(torch.as_tensor(seq[None], dtype=torch.long)).logits[0].float()
    lp = torch.log_softmax(lg, -1)[:-1].gather(-1, torch.as_tensor(seq[1:], dtype=torch.long)[:, None])[:, 0]
    want.append(float(lp[n_prompt - 1:].sum()))
  np.testing.assert_allclose(np.asarray(got["chosen_logps"])[0, :2], want[0::2], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got["rejected_logps"])[0, :2], want[1::2], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(got["chosen_tokens"])[0], [7, 2, 0])
  np.testing.assert_array_equal(np.asarray(got["rejected_tokens"])[0], [4, 9, 0])
  np.testing.assert_array_equal(np.asarray(got["valid"])[0], [True, True, False])


# ------------------------------------------------------------------------------------------------
BAD = [
  ("loss_type", dict(loss_type="kto_pair")),
  ("beta", dict(beta=0.0)),
  ("beta", dict(beta=-0.1)),
  ("beta", dict(beta=float("nan"))),
  ("label_smoothing", dict(label_smoothing=0.5)),
  ("label_smoothing", dict(label_smoothing=-0.1)),
  ("label_smoothing", dict(loss_type="hinge", label_smoothing=0.1)),
  ("simpo_gamma", dict(loss_type="simpo", simpo_gamma=float("inf"))),
  ("normalize_logps", dict(normalize_logps="yes")),
  ("sft_loss_ratio", dict(sft_loss_ratio=-1.0)),
  ("pref_loss_ratio", dict(pref_loss_ratio=-0.5)),
  ("pref_loss_ratio", dict(pref_loss_ratio=0.0, sft_loss_ratio=0.0)),
  ("reference", dict(reference="ema")),
  ("reference", dict(loss_type="simpo", reference="copy")),
]


@pytest.mark.parametrize("field,kw", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_validate_dpo_names_the_field(field, kw):
  with pytest.raises(ValueError, match=re.escape(f"'dpo.{field}'")) as e:
    validate_dpo(DPOConfig(**kw))
  assert e.value.field == f"dpo.{field}"
  with pytest.raises(ValueError, match=re.escape(f"dpo.{field}")):  # the loss refuses it too
    preference_loss(DPOConfig(**kw), *_pairs(seed=0))


def test_default_config_is_erniekit_and_valid():
  cfg = DPOConfig()
  validate_dpo(cfg)
  assert dataclasses.asdict(cfg) == dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5,
                                         normalize_logps=True, sft_loss_ratio=0.0, pref_loss_ratio=1.0,
                                         reference="auto")
  for lt in ("sigmoid", "ipo", "hinge", "simpo"):
    validate_dpo(DPOConfig(loss_type=lt))
