"""The preference-optimisation task (DPO and its variants) for the generic train step
(`ernie_jax.train.step`, the `Task` contract of `ernie_jax.train.tasks`).

Batches are preference rows (`ernie_jax.data.preference`): pair k of a row has its chosen answer in
segment 2k-1 and its rejected answer in segment 2k, the loss mask on the answer tokens. One
micro-batch:
  1. the policy's forward -> per-pair sequence log-probs (fp32, answer tokens only;
     `dpo_losses.pair_logps`);
  2. the reference's log-probs, by `reference` mode (`REFERENCES`):
       "lora_base"    the same model with its LoRA adapters switched off (`lora_ops.adapters_off`): the
                      frozen base, no second copy of the weights;
       "copy"         the frozen copy of the initial model in the train state (`TrainState.reference`);
       "precomputed"  the batch's `ref_logps` (placed at each sequence's first token by the data
                      pipeline, summed per segment), computed once before training;
       "none"         reference-free losses (SimPO);
     always under `stop_gradient`; the reference's router outputs are discarded (no aux losses, no
     expert-usage / bias-update side effects; routing is deterministic: no dropout, same capacity);
  3. the loss of `dpo_losses.preference_loss` summed over the micro-batch's pairs and divided by the
     number of pairs of the WHOLE batch (so A micro-batches equal one A-times larger batch), plus the
     policy's MoE terms (`tasks.text_moe_terms`); every pair metric is likewise a batch mean.
After the step the aux-loss-free correction bias moves from the policy's expert usage, as in
pretraining.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ernie_jax.model import lora_ops
from ernie_jax.train import dpo_losses
from ernie_jax.train.dpo_losses import DPOConfig
from ernie_jax.train.losses import LossConfig, head_token_nll
from ernie_jax.train.tasks import merge_here, text_bias_update, text_moe_terms

REFERENCES = ("lora_base", "copy", "precomputed", "none")


def pairs_present(loss_mask, segment_ids, pairs_per_row: int):
  """[R, P] bool: pair k of row r is present: both its answers have supervised tokens (the `valid` of
  `dpo_losses.pair_logps`, over which the loss sums)."""
  counts = dpo_losses.segment_sums(loss_mask.astype(jnp.float32), segment_ids, 2 * pairs_per_row)
  return (counts[:, 0::2] > 0) & (counts[:, 1::2] > 0)


def precomputed_logps(ref_logps, segment_ids, pairs_per_row: int) -> dict[str, jax.Array]:
  """The reference log-probs of the data pipeline's `ref_logps` rows: {"chosen_logps", "rejected_logps"} [R, P]."""
  sums = dpo_losses.segment_sums(ref_logps.astype(jnp.float32), segment_ids, 2 * pairs_per_row)
  return {"chosen_logps": sums[:, 0::2], "rejected_logps": sums[:, 1::2]}


@dataclasses.dataclass(frozen=True)
class Preference:
  """dpo: the loss and its coefficients; reference: one of `REFERENCES`; pairs_per_row: the data's P;
  loss: the MoE coefficients (LossConfig) of the policy's router terms."""

  dpo: DPOConfig
  reference: str
  pairs_per_row: int
  loss: LossConfig = LossConfig()

  def __post_init__(self):
    if self.reference not in REFERENCES:
      raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")

  def logps(self, model, micro) -> tuple[dict[str, jax.Array], object]:
    """(pair log-probs of `model` on the micro-batch, its forward output)."""
    out = model(micro["inputs"], micro["positions"], micro["segment_ids"])
    if self.loss.lm_chunk:  # the head a chunk at a time, no [R, S, V] logits
      token_lp = -head_token_nll(model, out.hidden, micro["targets"], self.loss.lm_chunk)
    else:
      token_lp = dpo_losses.token_logps(out.logits, micro["targets"])
    return dpo_losses.pair_sums(token_lp, micro["loss_mask"], micro["segment_ids"], self.pairs_per_row), out

  def reference_logps(self, model, micro, norms) -> dict[str, jax.Array] | None:
    """The reference's pair log-probs (no gradient), or None for reference-free losses."""
    if self.reference == "none":
      return None
    if self.reference == "precomputed":
      ref = precomputed_logps(micro["ref_logps"], micro["segment_ids"], self.pairs_per_row)
    elif self.reference == "lora_base":
      with lora_ops.adapters_off():
        ref, _ = self.logps(model, micro)
    else:
      gdef, state = norms["reference"]
      ref, _ = self.logps(merge_here(gdef, state), micro)
    return jax.tree.map(jax.lax.stop_gradient, ref)

  def normalisers(self, rows, cfg):
    present = pairs_present(rows["loss_mask"], rows["segment_ids"], self.pairs_per_row)
    return {"pairs": jnp.maximum(jnp.sum(present).astype(jnp.float32), 1.0)}

  def loss_fn(self, gdef, rest, grad_accum: int, norms):
    pairs = norms["pairs"]

    def loss_fn(params, micro):
      model = merge_here(gdef, params, rest)
      policy, out = self.logps(model, micro)
      ref = self.reference_logps(model, micro, norms)
      loss_sum, sums = dpo_losses.preference_loss(self.dpo, policy, ref, policy["valid"])
      aux = {k: v / pairs for k, v in sums.items() if k != "pairs"}
      aux["pairs"] = sums["pairs"]
      return text_moe_terms(loss_sum / pairs, aux, out.router, micro["segment_ids"], model, self.loss, grad_accum)

    return loss_fn

  def after_update(self, model, aux) -> None:
    text_bias_update(model, aux, self.loss)
