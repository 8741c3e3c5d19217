"""What the train step trains: a task is the objective of one micro-batch plus what happens to the
model's buffers after the optimizer step. `ernie_jax.train.step.make_train_step` does the rest
(accumulation, clipping, AdamW, the non-finite guard, sharding) the same way for every task; the model
class follows from the model config (`ernie_jax.model.model_class`).

The contract (`Task`, a Protocol; SFT / DPO tasks implement the same three methods; the built-in LM tasks also
have `forward(model, batch)` -> the model output on a batch and `lm_mask(batch, model_cfg)` -> the mask of the
LM-loss targets, which held-out evaluation uses):
  normalisers(rows, cfg) -> dict     constants over the WHOLE batch (all micro-batches, `rows`: every
                                     batch key flattened to [A * b, S, ...]), e.g. token counts, so that
                                     A micro-batches equal one A-times larger batch;
  loss_fn(gdef, rest, A, norms)      -> f(params, micro) -> (objective, metrics dict): the objective of
                                     one micro-batch (already divided so that the A micro-batches sum to
                                     the batch objective); metrics["loss"] must hold the objective's
                                     value; metrics are summed over the micro-batches;
  after_update(model, metrics)       in-place changes to non-trained state after the optimizer step,
                                     from the summed metrics of the whole batch (here: the aux-loss-free
                                     MoE correction-bias update, spec §3.4).
When the train state holds a frozen `reference` model (`step.TrainState`), `norms["reference"]` is its
(graphdef, state), traced like the parameters but never differentiated.
A task owns its coefficients: the built-in tasks are frozen dataclasses with a `loss: LossConfig`
field (`ernie_jax.train.losses.LossConfig`, the `loss` section of the training config);
`with_loss(task, loss_cfg)` gives a copy with other coefficients.

* `TextLM`: ERNIE 4.5 text models (dense / MoE / MTP) on packed text (`ernie_jax.data`):
  LM + mtp_weight * mean_d(MTP_d) + aux_coef * L_aux + z_coef * L_z + orth_coef * L_orth, the LM /
  MTP losses normalised by the token counts of the whole batch; after the step the correction bias
  moves by +-bias_update_lr (sign rule) from the expert usage of the whole batch.
* `VisionLanguage`: ERNIE 4.5 VL on image-caption rows (`ernie_jax.data.vl`; every image has the
  static grid `image_grid`): the token-balanced LM loss over text-typed targets (gradient of
  sum(NLL * mask) / (rows x seq of the whole batch), value the masked mean over the whole batch;
  spec §4.1) + per-modality aux / z losses (text router over text tokens, vision router over vision
  tokens, padding excluded) + both routers' orthogonal losses, with the same `LossConfig`
  coefficients; after the step both correction-bias rows move by +-lr (sign rule) from the
  per-modality expert usage.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.data.vl import image_grid
from ernie_jax.train import moe_losses, vl_losses
from ernie_jax.train.losses import LossConfig, head_loss_sum, head_nll_sum, mtp_loss_sums, mtp_targets

#: f(params, micro-batch dict) -> (objective scalar, metrics dict of arrays)
LossFn = Callable[[nnx.State, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


class Task(Protocol):
  """The objective the generic train step optimises (see the module docstring)."""

  def normalisers(self, rows: Mapping[str, jax.Array], cfg: Any) -> dict[str, Any]:
    """Constants over the whole batch, passed to `loss_fn` as `norms`."""
    ...

  def loss_fn(self, gdef: nnx.GraphDef, rest: nnx.State, grad_accum: int, norms: dict[str, Any]) -> LossFn:
    """The micro-batch objective as a function of the trained state `params`; the model is
    `nnx.merge(gdef, params, rest)`."""
    ...

  def after_update(self, model: nnx.Module, aux: dict[str, jax.Array]) -> None:
    """Update non-trained state of `model` in place after the optimizer step (may do nothing)."""
    ...


def with_loss(task: Task, loss_cfg: LossConfig) -> Task:
  """A copy of a built-in task (a dataclass with a `loss` field) with the coefficients `loss_cfg`."""
  if not (dataclasses.is_dataclass(task) and any(f.name == "loss" for f in dataclasses.fields(task))):
    raise TypeError(f"{type(task).__name__} has no LossConfig coefficients to replace")
  return dataclasses.replace(task, loss=loss_cfg)


def merge_here(gdef, *states):
  """`nnx.merge` with fresh Variable objects for `states` at this trace level (inside lax.scan / grad: the
  step's Variables belong to the outer trace)."""
  return nnx.merge(gdef, *(jax.tree.map(lambda x: x, s) for s in states))


def _finish(total, aux, loss_cfg, grad_accum: int, orth_loss=None):
  """Add loss.moe_orth_coef x the router orthogonality loss (`orth_loss()`, a per-micro-batch
  mean; None without MoE layers) and record the objective as aux["loss"]."""
  if orth_loss is not None and loss_cfg.moe_orth_coef:
    orth = orth_loss() / grad_accum
    total = total + loss_cfg.moe_orth_coef * orth
    aux["moe_orth_loss"] = orth
  aux["loss"] = total
  return total, aux


def _updates_bias(loss_cfg: LossConfig, model) -> bool:
  return bool(loss_cfg.bias_update_lr and model.config.moe_use_correction_bias)


@dataclasses.dataclass(frozen=True)
class TextLM:
  """ERNIE 4.5 text models (dense / MoE / MTP) on packed text rows (`ernie_jax.data.pipeline`)."""

  loss: LossConfig = LossConfig()

  def normalisers(self, rows, cfg):
    lm_count = jnp.maximum(jnp.sum(rows["loss_mask"]).astype(jnp.float32), 1.0)
    mtp_counts = jnp.stack([
      jnp.maximum(jnp.sum(mtp_targets(rows["targets"], rows["segment_ids"], rows["loss_mask"], d)[1]), 1)
      for d in range(cfg.num_mtp_layers)]).astype(jnp.float32) if cfg.num_mtp_layers else None
    return {"lm_count": lm_count, "mtp_counts": mtp_counts}

  @staticmethod
  def forward(model, batch):
    return model(batch["inputs"], batch["positions"], batch["segment_ids"])

  @staticmethod
  def lm_mask(batch, cfg):
    return batch["loss_mask"]

  def loss_fn(self, gdef, rest, grad_accum: int, norms):
    loss_cfg = self.loss
    lm_count, mtp_counts = norms["lm_count"], norms["mtp_counts"]

    def loss_fn(params, micro):
      model = merge_here(gdef, params, rest)
      out = self.forward(model, micro)
      lm_sum, _ = head_loss_sum(model, out.hidden, micro["targets"], micro["loss_mask"], loss_cfg.lm_chunk)
      lm = lm_sum / lm_count
      total, aux = lm, {"lm_loss": lm}
      if model.config.num_mtp_layers:
        mtp_hidden = model.mtp_hidden(micro["inputs"], out.hidden, micro["positions"], micro["segment_ids"])
        sums, _ = mtp_loss_sums(model, mtp_hidden, micro["targets"], micro["segment_ids"], micro["loss_mask"],
                                loss_cfg.lm_chunk)
        mtp = sums / mtp_counts
        total = total + loss_cfg.mtp_weight * jnp.mean(mtp)
        aux["mtp_loss"] = mtp
      return text_moe_terms(total, aux, out.router, micro["segment_ids"], model, loss_cfg, grad_accum)

    return loss_fn

  def after_update(self, model, aux) -> None:
    text_bias_update(model, aux, self.loss)


def text_moe_terms(total, aux, router, segment_ids, model, loss_cfg: LossConfig, grad_accum: int):
  """(objective, aux) of a text model's micro-batch with its MoE terms added (`router`: the forward's
  router output, None without MoE layers; tokens with segment id 0 are padding): aux_coef x L_aux +
  z_coef x L_z + orth_coef x L_orth, the expert usage and dropped-token count; aux["loss"] = objective."""
  if router is None:
    return _finish(total, aux, loss_cfg, grad_accum)
  tokens = (segment_ids > 0).reshape(-1)
  lb = moe_losses.load_balance_loss(router, tokens) / grad_accum
  z = moe_losses.z_loss(router, tokens) / grad_accum
  total = total + loss_cfg.moe_aux_coef * lb + loss_cfg.moe_z_coef * z
  aux.update(moe_aux_loss=lb, moe_z_loss=z, expert_usage=moe_losses.expert_usage(router, tokens),
             moe_dropped=jnp.sum(router.dropped).astype(jnp.float32))
  return _finish(total, aux, loss_cfg, grad_accum, lambda: moe_losses.orthogonal_loss(moe_losses.router_kernels(model)))


def text_bias_update(model, aux, loss_cfg: LossConfig) -> None:
  """The aux-loss-free correction-bias update of a text MoE model from the batch's summed expert usage."""
  if _updates_bias(loss_cfg, model) and "expert_usage" in aux:
    moe_losses.update_correction_bias(model, aux["expert_usage"], loss_cfg.bias_update_lr)


@dataclasses.dataclass(frozen=True)
class VisionLanguage:
  """image_grid: the static (t, h, w) patch grid of every image (`ernie_jax.data.vl.image_grid`)."""

  image_grid: Sequence[int]
  loss: LossConfig = LossConfig()

  def __post_init__(self):
    object.__setattr__(self, "image_grid", tuple(int(v) for v in self.image_grid))

  @staticmethod
  def lm_mask(batch, cfg):
    return batch["loss_mask"].astype(jnp.float32) * vl_losses.text_target_mask(batch["targets"], cfg)

  def normalisers(self, rows, cfg):
    return {"lm_count": jnp.maximum(jnp.sum(self.lm_mask(rows, cfg)), 1.0),
            "balance": float(rows["inputs"].size)}  # token_balance_seqlen: rows x seq of the batch

  def forward(self, model, batch):
    """The model on a batch of rows: pixel_values [rows, slots * patches, C*p*p], each row's image slots merged
    into that row's placeholders (an unused slot -- zeros -- changes nothing, see `lm_vl.merge_embeddings`)."""
    grid = self.image_grid
    pixels = batch["pixel_values"]
    images = pixels.shape[0] * pixels.shape[1] // (grid[0] * grid[1] * grid[2])  # every slot of every row
    return model(batch["inputs"], positions=batch["positions"], token_types=batch["token_types"],
                 segment_ids=batch["segment_ids"], pixel_values=pixels, image_grid_thw=(grid,) * images)

  def loss_fn(self, gdef, rest, grad_accum: int, norms):
    loss_cfg = self.loss

    def loss_fn(params, micro):
      model = merge_here(gdef, params, rest)
      out = self.forward(model, micro)
      mask = self.lm_mask(micro, model.config)
      lm = vl_losses.token_balanced(head_nll_sum(model, out.hidden, micro["targets"], mask, loss_cfg.lm_chunk),
                                    mask, norms["balance"], count=norms["lm_count"])
      total, aux = lm, {"lm_loss": lm}
      if out.router is None:
        return _finish(total, aux, loss_cfg, grad_accum)
      terms = vl_losses.by_modality(out.router, out.vision_mask, micro["segment_ids"] > 0)  # no padding
      for key, coef, fn in (("moe_aux_loss", loss_cfg.moe_aux_coef, moe_losses.load_balance_loss),
                            ("moe_z_loss", loss_cfg.moe_z_coef, moe_losses.z_loss)):
        for name, router, mask in terms:
          aux[f"{key}_{name}"] = fn(router, mask) / grad_accum
        aux[key] = sum(aux[f"{key}_{name}"] for name, _, _ in terms)
        total = total + coef * aux[key]
      dropped = 0.0
      for name, router, mask in terms:
        aux[f"expert_usage_{name}"] = moe_losses.expert_usage(router, mask)
        dropped = dropped + jnp.sum(router.dropped).astype(jnp.float32)
      aux["moe_dropped"] = dropped
      return _finish(total, aux, loss_cfg, grad_accum, lambda: vl_losses.orthogonal_loss(model))

    return loss_fn

  def after_update(self, model, aux) -> None:
    if _updates_bias(self.loss, model) and "expert_usage_text" in aux:
      usage = jnp.stack([aux["expert_usage_text"], aux["expert_usage_vision"]], axis=1)  # [L, 2, E]
      vl_losses.update_correction_bias(model, usage, self.loss.bias_update_lr)


TEXT = TextLM()


def task_for(model_cfg, data_cfg=None, loss_cfg: LossConfig = LossConfig()) -> Task:
  """The task of a model config with the coefficients `loss_cfg`: `TextLM` for a ModelConfig;
  `VisionLanguage` with the static image grid of `data_cfg.image_size` for a VLConfig."""
  if not model_cfg.is_vl:
    return TextLM(loss_cfg)
  return VisionLanguage(image_grid(model_cfg, data_cfg.image_size), loss_cfg)
