"""What the train step trains: a "task" names the model class, the objective of one micro-batch
and the buffer update after the optimizer step. `ernie_jax.train.step.make_train_step` does the
rest (accumulation, clipping, AdamW, the non-finite guard, sharding) the same way for every task.

A task has (the model class follows from the config: `model_class`)
  normalisers(rows, cfg)             constants over the WHOLE batch (all micro-batches), e.g. token
                                     counts, so that A micro-batches equal one A-times larger batch;
  loss_fn(gdef, rest, loss_cfg, A, norms) -> f(params, micro) -> (objective, metrics dict);
  update_bias(model, metrics, lr)    the aux-loss-free correction-bias update (spec §3.4) from the
                                     expert usage of the whole batch (metrics summed over micro-batches).

* `TextLM`: ERNIE 4.5 text models (dense / MoE / MTP) on packed text (`ernie_jax.data`):
  LM + mtp_weight * mean_d(MTP_d) + aux_coef * L_aux + z_coef * L_z + orth_coef * L_orth, the LM /
  MTP losses normalised by the token counts of the whole batch.
* `VisionLanguage`: ERNIE 4.5 VL on image-caption rows (`ernie_jax.data.vl`; every image has the
  static grid `image_grid`): the token-balanced LM loss over text-typed targets (gradient of
  sum(NLL * mask) / (rows x seq of the whole batch), value the masked mean over the whole batch;
  spec §4.1) + per-modality aux / z losses (text router over text tokens, vision router over vision
  tokens, padding excluded) + both routers' orthogonal losses, with the same `LossConfig`
  coefficients; after the step both correction-bias rows move by +-lr (sign rule) from the
  per-modality expert usage.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.train import moe_losses
from ernie_jax.train.losses import lm_loss_sum, mtp_loss_sums, mtp_targets


def _merge(gdef, params, rest):
  # fresh Variable objects for the buffers at this trace level (inside lax.scan / grad)
  return nnx.merge(gdef, params, jax.tree.map(lambda x: x, rest))


def _finish(total, aux, loss_cfg, grad_accum: int, orth_loss=None):
  """Add loss.moe_orth_coef x the router orthogonality loss (`orth_loss()`, a per-micro-batch
  mean; None without MoE layers) and record the objective as aux["loss"]."""
  if orth_loss is not None and loss_cfg.moe_orth_coef:
    orth = orth_loss() / grad_accum
    total = total + loss_cfg.moe_orth_coef * orth
    aux["moe_orth_loss"] = orth
  aux["loss"] = total
  return total, aux


class TextLM:
  def normalisers(self, rows, cfg):
    lm_count = jnp.maximum(jnp.sum(rows["loss_mask"]).astype(jnp.float32), 1.0)
    mtp_counts = jnp.stack([
      jnp.maximum(jnp.sum(mtp_targets(rows["targets"], rows["segment_ids"], rows["loss_mask"], d)[1]), 1)
      for d in range(cfg.num_mtp_layers)]).astype(jnp.float32) if cfg.num_mtp_layers else None
    return {"lm_count": lm_count, "mtp_counts": mtp_counts}

  def loss_fn(self, gdef, rest, loss_cfg, grad_accum: int, norms):
    lm_count, mtp_counts = norms["lm_count"], norms["mtp_counts"]

    def loss_fn(params, micro):
      model = _merge(gdef, params, rest)
      out = model(micro["inputs"], micro["positions"], micro["segment_ids"])
      lm_sum, _ = lm_loss_sum(out.logits, micro["targets"], micro["loss_mask"])
      lm = lm_sum / lm_count
      total, aux = lm, {"lm_loss": lm}
      if model.config.num_mtp_layers:
        mtp_logits = model.mtp_logits(micro["inputs"], out.hidden, micro["positions"], micro["segment_ids"])
        sums, _ = mtp_loss_sums(mtp_logits, micro["targets"], micro["segment_ids"], micro["loss_mask"])
        mtp = sums / mtp_counts
        total = total + loss_cfg.mtp_weight * jnp.mean(mtp)
        aux["mtp_loss"] = mtp
      if out.router is None:
        return _finish(total, aux, loss_cfg, grad_accum)
      tokens = (micro["segment_ids"] > 0).reshape(-1)
      lb = moe_losses.load_balance_loss(out.router, tokens) / grad_accum
      z = moe_losses.z_loss(out.router, tokens) / grad_accum
      total = total + loss_cfg.moe_aux_coef * lb + loss_cfg.moe_z_coef * z
      aux.update(moe_aux_loss=lb, moe_z_loss=z, expert_usage=moe_losses.expert_usage(out.router, tokens),
                 moe_dropped=jnp.sum(out.router.dropped).astype(jnp.float32))
      return _finish(total, aux, loss_cfg, grad_accum,
                     lambda: moe_losses.orthogonal_loss(moe_losses.router_kernels(model)))

    return loss_fn

  def update_bias(self, model, aux, lr: float) -> None:
    if "expert_usage" in aux:
      moe_losses.update_correction_bias(model, aux["expert_usage"], lr)


class VisionLanguage:
  """image_grid: the static (t, h, w) patch grid of every image (`ernie_jax.data.vl.image_grid`)."""

  def __init__(self, image_grid: Sequence[int]):
    self.image_grid = tuple(int(v) for v in image_grid)

  @staticmethod
  def lm_mask(batch, cfg):
    from ernie_jax.train.vl_losses import text_target_mask

    return batch["loss_mask"].astype(jnp.float32) * text_target_mask(batch["targets"], cfg)

  def normalisers(self, rows, cfg):
    return {"lm_count": jnp.maximum(jnp.sum(self.lm_mask(rows, cfg)), 1.0),
            "balance": float(rows["inputs"].size)}  # token_balance_seqlen: rows x seq of the batch

  def loss_fn(self, gdef, rest, loss_cfg, grad_accum: int, norms):
    from ernie_jax.train import vl_losses

    grid = self.image_grid
    patches = grid[0] * grid[1] * grid[2]

    def loss_fn(params, micro):
      model = _merge(gdef, params, rest)
      pixels = micro["pixel_values"]  # [rows, images_per_row * patches, C*p*p]
      pixels = pixels.reshape(-1, pixels.shape[-1])
      out = model(micro["inputs"], positions=micro["positions"], token_types=micro["token_types"],
                  segment_ids=micro["segment_ids"], pixel_values=pixels,
                  image_grid_thw=(grid,) * (pixels.shape[0] // patches))
      lm = vl_losses.token_balanced_lm_loss(out.logits, micro["targets"], self.lm_mask(micro, model.config),
                                            norms["balance"], count=norms["lm_count"])
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

  def update_bias(self, model, aux, lr: float) -> None:
    from ernie_jax.train import vl_losses

    if "expert_usage_text" in aux:
      usage = jnp.stack([aux["expert_usage_text"], aux["expert_usage_vision"]], axis=1)  # [L, 2, E]
      vl_losses.update_correction_bias(model, usage, lr)


TEXT = TextLM()


def is_vl(model_cfg) -> bool:
  from ernie_jax.model.vl import VLConfig

  return isinstance(model_cfg, VLConfig)


def task_for(model_cfg, data_cfg=None):
  """The task of a model config: `TEXT` for a ModelConfig; `VisionLanguage` with the static image
  grid of `data_cfg.image_size` for a VLConfig."""
  if not is_vl(model_cfg):
    return TEXT
  from ernie_jax.data.vl import image_grid

  return VisionLanguage(image_grid(model_cfg, data_cfg.image_size))
