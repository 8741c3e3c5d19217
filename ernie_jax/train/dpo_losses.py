"""The loss side of DPO: sequence log-probabilities of packed preference pairs and the preference losses.

Row layout (the contract with the DPO data side): a row of S positions holds up to P pairs; pair k = 1..P has
its chosen sequence (prompt + chosen answer) in segment 2k-1 and its rejected sequence in segment 2k
(`segment_ids`, 0 = padding; positions restart in every segment, attention never crosses segments);
`loss_mask` marks the answer tokens' targets. A sequence's log-probability is the fp32 sum of
log_softmax(logits)[target] over its loss-mask positions (`pair_logps` -> [R, P] sums and token counts).

`preference_loss(cfg, policy, reference, valid)` follows ERNIEKit's `ErnieDPOCriterion`
(PaddlePaddle/ERNIE `ernie/loss/dpo.py` @ 384025410e764866eb3a08bc3db3a36c200dee58) with x the log-ratio
difference (pc - pr) - (rc - rr) of policy (p) and reference (r) chosen (c) / rejected (r) log-probs:

* length handling, applied alike to policy and reference log-probs: for ipo and simpo (ERNIEKit's
  `average_log_prob` types) each log-prob is divided by its own token count (per-token average); otherwise,
  with `normalize_logps`, each is multiplied by avg / own count with avg = (n_chosen + n_rejected) / 2
  (both rescaled to the pair's average length); else raw sums;
* sigmoid: -(1 - ls) logsigmoid(beta x) - ls logsigmoid(-beta x) (ls = label_smoothing, conservative DPO);
* hinge: relu(1 - beta x);  ipo: (x - 1 / (2 beta))^2 (on per-token averages, as TRL's IPO);
* simpo: reference-free (rc = rr = 0; ERNIEKit refuses a reference model for it,
  PaddlePaddle/PaddleFormers `paddleformers/trl/dpo_trainer.py` @ f08e21767d1365d0afcfdca87d45911bc3ed592f),
  x' = x - simpo_gamma / beta, then the sigmoid form with label smoothing: -logsigmoid(beta x - gamma) at
  ls = 0, i.e. `simpo_gamma` is the SimPO paper's gamma (TRL's `gamma_beta_ratio` is gamma / beta);
* total = pref_loss_ratio * preference term + sft_loss_ratio * SFT term.

Reductions: everything is returned as SUMS over the valid pairs (the caller divides by the global number
of pairs, so micro-batches and data shards add up exactly). ERNIEKit instead takes the mean over the pairs
of one micro-batch, and its SFT term is sum(-chosen log-probs) / (chosen tokens) of the micro-batch
(before any length normalisation); here the SFT term of a pair is the mean NLL of its chosen answer,
-pc_raw / n_chosen, so its global mean is the pairs' mean of per-answer token means (equal to ERNIEKit's
when chosen answers have equal lengths).

Metrics (sums over valid pairs; divide by "pairs"), with TRL's / ERNIEKit's names and definitions
(PaddleFormers `DPOTrainer.log_metric`; huggingface/trl `trl/trainer/dpo_trainer.py` @ 9d58faa7):
rewards/chosen = beta (pc - rc), rewards/rejected = beta (pr - rr) on the length-handled log-probs the loss
uses (detached), rewards/margins = chosen - rejected, rewards/accuracies = [margin > 0] with a tie
(margin 0 up to fp32 rounding of the log-probs, TIE_RTOL; e.g. before the first update when policy ==
reference) counted 1/2 (TRL and ERNIEKit count a tie 0); logps/chosen, logps/rejected = the policy's RAW
sequence log-prob sums (ERNIEKit logs the normalised ones); plus "pairs", "dpo_loss" (preference term) and "sft_loss" (SFT term), unweighted.

`DPOConfig` is the `dpo` section of a DPO experiment config; `validate_dpo` raises `TrainConfigError`
(a ValueError) naming `dpo.<field>`. The reference choice (`reference`) is interpreted by the train side:
"auto", "lora_base" (the LoRA model with `ernie_jax.model.lora_ops.adapters_off()`), "copy" (a frozen copy)
or "precomputed" (log-probs stored with the data).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ernie_jax.train.config import _check

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")
AVERAGED = ("ipo", "simpo")  # per-token average log-probs (ERNIEKit's average_log_prob)
SMOOTHED = ("sigmoid", "simpo")  # the loss types that use label_smoothing
REFERENCES = ("auto", "lora_base", "copy", "precomputed")
TIE_RTOL = 1e-6  # rewards/accuracies: a margin within this fraction of the summed |log-probs| is a tie

METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected", "pairs", "dpo_loss", "sft_loss")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """The `dpo` section (defaults: ERNIEKit's DPO arguments)."""

  loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | simpo
  beta: float = 0.1
  label_smoothing: float = 0.0  # sigmoid / simpo only; in [0, 0.5)
  simpo_gamma: float = 0.5  # SimPO's target margin gamma (the loss uses beta x - gamma)
  normalize_logps: bool = True  # rescale both log-probs to the pair's average length (not ipo / simpo)
  sft_loss_ratio: float = 0.0  # weight of the chosen answers' NLL
  pref_loss_ratio: float = 1.0  # weight of the preference loss
  reference: str = "auto"  # auto | lora_base | copy | precomputed (interpreted by the train side)


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_dpo(cfg: DPOConfig) -> None:
  """Raise TrainConfigError naming `dpo.<field>` for a bad value."""
  _check(cfg.loss_type in LOSS_TYPES, "dpo.loss_type", f"must be one of {LOSS_TYPES}, got {cfg.loss_type!r}")
  _check(_number(cfg.beta) and cfg.beta > 0, "dpo.beta", f"must be a number > 0, got {cfg.beta!r}")
  ls = cfg.label_smoothing
  _check(_number(ls) and 0 <= ls < 0.5, "dpo.label_smoothing", f"must be in [0, 0.5), got {ls!r}")
  _check(ls == 0 or cfg.loss_type in SMOOTHED, "dpo.label_smoothing",
         f"is used by loss_type {SMOOTHED} only; set it to 0 for {cfg.loss_type!r}")
  _check(_number(cfg.simpo_gamma), "dpo.simpo_gamma", f"must be a finite number, got {cfg.simpo_gamma!r}")
  _check(isinstance(cfg.normalize_logps, bool), "dpo.normalize_logps",
         f"must be true or false, got {cfg.normalize_logps!r}")
  for name in ("sft_loss_ratio", "pref_loss_ratio"):
    v = getattr(cfg, name)
    _check(_number(v) and v >= 0, f"dpo.{name}", f"must be a number >= 0, got {v!r}")
  _check(cfg.sft_loss_ratio > 0 or cfg.pref_loss_ratio > 0, "dpo.pref_loss_ratio",
         "pref_loss_ratio and sft_loss_ratio are both 0: nothing to train")
  _check(cfg.reference in REFERENCES, "dpo.reference", f"must be one of {REFERENCES}, got {cfg.reference!r}")
  _check(cfg.loss_type != "simpo" or cfg.reference == "auto", "dpo.reference",
         f"simpo is reference-free; leave it 'auto' (got {cfg.reference!r})")


# ------------------------------------------------------------------------------------------------
def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log_softmax(logits)[target] in fp32: logits [..., V] (any float dtype), targets [...] -> [...].

  Computed as the target's logit minus logsumexp, both reductions over the vocabulary in fp32 (the
  target is picked with a compare against the vocabulary index, which stays a local reduction when the
  vocabulary axis is sharded); no fp32 log_softmax array is formed."""
  x = logits.astype(jnp.float32)
  vocab = jax.lax.broadcasted_iota(jnp.int32, (1,) * targets.ndim + (x.shape[-1],), targets.ndim)
  picked = jnp.sum(jnp.where(vocab == targets[..., None].astype(jnp.int32), x, 0.0), axis=-1)
  return picked - jax.nn.logsumexp(x, axis=-1)


def segment_sums(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """[R, S] values -> [R, num_segments] fp32: column j sums the positions with segment_id == j + 1
  (segment 0, padding, and ids above num_segments are ignored). Row-wise, so shardable over R."""
  ids = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
  hit = segment_ids[..., None] == ids
  return jnp.sum(jnp.where(hit, values.astype(jnp.float32)[..., None], 0.0), axis=1)


def pair_logps(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array,
               pairs_per_row: int) -> dict[str, jax.Array]:
  """Per-pair sequence log-probs of packed rows (layout: the module docstring).

  logits [R, S, V], targets / loss_mask / segment_ids [R, S] -> {"chosen_logps", "rejected_logps" (fp32 sums
  over loss-mask tokens), "chosen_tokens", "rejected_tokens" (fp32 counts): [R, P]; "valid" [R, P] bool
  (the pair is present: both answers have loss tokens); "unassigned_tokens": scalar count of loss-mask
  tokens outside segments 1..2P (0 for well-formed rows: the caller may check it)}."""
  return pair_sums(token_logps(logits, targets), loss_mask, segment_ids, pairs_per_row)


def pair_sums(token_lp: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array,
              pairs_per_row: int) -> dict[str, jax.Array]:
  """`pair_logps` from the per-position log-probs of the targets [R, S] (e.g. `losses.head_token_nll`, negated)."""
  if not isinstance(pairs_per_row, int) or pairs_per_row < 1:
    raise ValueError(f"pair_logps: pairs_per_row must be an int >= 1, got {pairs_per_row!r}")
  n = 2 * pairs_per_row
  mask = loss_mask > 0
  lp = jnp.where(mask, token_lp, 0.0)
  sums = segment_sums(lp, segment_ids, n)
  counts = segment_sums(mask.astype(jnp.float32), segment_ids, n)
  out = {"chosen_logps": sums[:, 0::2], "rejected_logps": sums[:, 1::2],
         "chosen_tokens": counts[:, 0::2], "rejected_tokens": counts[:, 1::2]}
  out["valid"] = (out["chosen_tokens"] > 0) & (out["rejected_tokens"] > 0)
  in_pair = (segment_ids >= 1) & (segment_ids <= n)
  out["unassigned_tokens"] = jnp.sum((mask & ~in_pair).astype(jnp.int32))
  return out


# ------------------------------------------------------------------------------------------------
def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _length_scales(cfg: DPOConfig, n_chosen, n_rejected):
  """Factors applied to the chosen / rejected log-prob sums (policy and reference alike)."""
  if cfg.loss_type in AVERAGED:
    return 1.0 / n_chosen, 1.0 / n_rejected
  if cfg.normalize_logps:
    avg = (n_chosen + n_rejected) / 2.0
    return avg / n_chosen, avg / n_rejected
  return jnp.ones_like(n_chosen), jnp.ones_like(n_rejected)


def _smoothed_sigmoid(z, ls: float):
  """-(1 - ls) logsigmoid(z) - ls logsigmoid(-z)."""
  return -(1.0 - ls) * jax.nn.log_sigmoid(z) - ls * jax.nn.log_sigmoid(-z)


def preference_loss(cfg: DPOConfig, policy: dict, reference: dict | None, valid) -> tuple[jax.Array, dict]:
  """(loss sum, metric sums) over the valid pairs (formulas: the module docstring).

  policy: {"chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens"} ([R, P] or any common shape;
  jax or numpy arrays); reference: {"chosen_logps", "rejected_logps"} of the same pairs (token counts are the
  policy's), gradient-stopped; ignored (may be None) for simpo. valid: bool, same shape; invalid entries
  (padding pairs) contribute nothing. All math in fp32."""
  validate_dpo(cfg)
  valid = jnp.asarray(valid, bool)
  pc, pr = _f32(policy["chosen_logps"]), _f32(policy["rejected_logps"])
  n_c = jnp.where(valid, _f32(policy["chosen_tokens"]), 1.0)  # padding pairs: no 0 / 0 (nor NaN gradients)
  n_r = jnp.where(valid, _f32(policy["rejected_tokens"]), 1.0)
  if cfg.loss_type == "simpo":
    rc = rr = jnp.zeros_like(pc)
  else:
    if reference is None:
      raise ValueError(f"preference_loss: loss_type {cfg.loss_type!r} needs the reference log-probs "
                       "(reference=None is for the reference-free simpo)")
    rc = jax.lax.stop_gradient(_f32(reference["chosen_logps"]))
    rr = jax.lax.stop_gradient(_f32(reference["rejected_logps"]))
  s_c, s_r = _length_scales(cfg, n_c, n_r)
  # (pc s_c - pr s_r) - (rc s_c - rr s_r) grouped per answer: policy == reference gives exactly 0 (a tie)
  lr_c, lr_r = (pc - rc) * s_c, (pr - rr) * s_r
  x = lr_c - lr_r
  beta = cfg.beta
  if cfg.loss_type == "sigmoid":
    pref = _smoothed_sigmoid(beta * x, cfg.label_smoothing)
  elif cfg.loss_type == "simpo":
    pref = _smoothed_sigmoid(beta * x - cfg.simpo_gamma, cfg.label_smoothing)
  elif cfg.loss_type == "hinge":
    pref = jax.nn.relu(1.0 - beta * x)
  else:  # ipo
    pref = (x - 1.0 / (2.0 * beta)) ** 2
  sft = -pc / n_c  # mean NLL of the chosen answer (raw log-probs)
  total = lambda v: jnp.sum(jnp.where(valid, v, 0.0))  # noqa: E731
  loss_sum = total(cfg.pref_loss_ratio * pref + cfg.sft_loss_ratio * sft)

  sg = jax.lax.stop_gradient
  r_c, r_r = sg(beta * lr_c), sg(beta * lr_r)
  margin = r_c - r_r
  # a tie: |x| within fp32 rounding of the log-probs it is made of. Policy == reference (before the first update)
  # gives x = 0 in exact arithmetic, but the policy's pass (under autodiff) and the reference's (another pass, or
  # another program) are compiled separately and may round differently in the last bits (seen on an AMD EPYC).
  tie = jnp.abs(x) <= TIE_RTOL * ((jnp.abs(pc) + jnp.abs(rc)) * s_c + (jnp.abs(pr) + jnp.abs(rr)) * s_r)
  acc = jnp.where(tie, 0.5, jnp.where(margin > 0, 1.0, 0.0))
  metrics = {"rewards/chosen": total(r_c), "rewards/rejected": total(r_r), "rewards/margins": total(margin),
             "rewards/accuracies": total(acc), "logps/chosen": total(sg(pc)), "logps/rejected": total(sg(pr)),
             "pairs": jnp.sum(valid.astype(jnp.float32)), "dpo_loss": total(sg(pref)), "sft_loss": total(sg(sft))}
  return loss_sum, metrics
