"""The preference-optimisation config (`experiments/dpo.py`): the SFT config's sections
(`ernie_jax.train.sft_config`: run, model, mesh, optim, loss, checkpoint, metrics, lora, groups, finetune,
train) with
  data   PreferenceDataConfig   preference JSONL / the embedded stdlib pairs (`ernie_jax.data.preference`)
  dpo    DPOConfig              loss type, beta, label smoothing, SimPO gamma, normalize_logps, the SFT and
                                preference ratios, and the reference model (`ernie_jax.train.dpo_losses`)
The reference ("dpo.reference"): "auto" picks "lora_base" with LoRA (the base with its adapters switched
off: no second copy of the weights), "none" for SimPO (reference-free), else "copy" (a frozen copy of the
initial model on the devices); "precomputed" computes the reference log-probs of every pair once before
training and keeps them beside the data (`<workdir>/reference_logps.npz`). Defaults follow ERNIEKit's DPO
recipes (spec §7): sigmoid loss, beta 0.1, normalize_logps, lr 5e-7 with 50 warmup steps and no decay, AdamW
b2 0.95, weight decay 0.1. `parse_dpo(config)` builds and validates it; a problem raises `TrainConfigError`
naming the field.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from ernie_jax.config import ModelConfig
from ernie_jax.data.preference import PreferenceDataConfig
from ernie_jax.train.config import _check
from ernie_jax.train.dpo_losses import DPOConfig, validate_dpo
from ernie_jax.train.sft_config import _SECTIONS as SFT_SECTIONS
from ernie_jax.train.sft_config import SFTConfig, default_sft_config, parse_finetune_sections, validate_sft


@dataclasses.dataclass(frozen=True)
class DPOExperimentConfig(SFTConfig):
  dpo: DPOConfig = DPOConfig()

  @property
  def reference(self) -> str:
    """The resolved reference mode (one of `dpo_task.REFERENCES`: "auto" resolved, "none" for SimPO)."""
    return resolve_reference(self.dpo, self.finetune.method)


_SECTIONS = {**SFT_SECTIONS, "data": PreferenceDataConfig, "dpo": DPOConfig}


def resolve_reference(dpo: DPOConfig, method: str) -> str:
  if dpo.reference != "auto":
    return dpo.reference
  if dpo.loss_type == "simpo":
    return "none"
  return "lora_base" if method == "lora" else "copy"


def default_dpo_config(model=None) -> ml_collections.ConfigDict:
  """Every field with its default (ERNIEKit's DPO defaults); experiment configs change a few."""
  c = default_sft_config(model or ModelConfig.tiny_dense())
  c.workdir = "/tmp/ernie_jax/dpo"
  c.steps = 800
  c.data = dataclasses.asdict(PreferenceDataConfig())
  c.dpo = dataclasses.asdict(DPOConfig())
  c.finetune.method = "full"
  c.optim.lr = 5e-7
  c.optim.warmup_steps = 50
  c.optim.min_lr_ratio = 1.0  # ERNIEKit: min_lr = lr (no decay after the warmup)
  return c


def erniekit_dpo_lora_8k(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """ERNIEKit's `run_dpo_lora_8k.yaml` settings (spec §7) on a DPO config, for a real base model: LoRA rank 32,
  alpha 128, rsLoRA, LoRA+ ratio 12, lr 5e-7 (constant after 50 warmup steps), beta 0.1, 8k-token rows, the base
  checkpoint's tokenizer, evaluation / checkpoints every 100 steps."""
  c.init_from = ""  # required: the base model directory (HF -PT, -Paddle or Orbax), usually after SFT
  c.global_batch_size = 32
  c.data.paths = ""  # your preference JSONL ("" = the embedded stdlib pairs)
  c.data.tokenizer = ""  # "" = the tokenizer (and chat template) of init_from
  c.data.seq_len = 8192
  c.finetune.method = "lora"
  c.lora.rank = 32
  c.lora.alpha = 128.0
  c.lora.rslora = True
  c.finetune.lora_plus_ratio = 12.0
  c.finetune.eval_every = 100
  c.checkpoint.every_steps = 100
  c.metrics.log_every = 10
  return c


def parse_dpo(config: ml_collections.ConfigDict | dict) -> DPOExperimentConfig:
  """Typed, validated DPO config (raises TrainConfigError naming the field)."""
  run, model, parts = parse_finetune_sections(config, _SECTIONS)
  cfg = DPOExperimentConfig(run=run, model=model, **parts)
  validate_sft(cfg)
  validate_dpo(cfg.dpo)  # (loss type, beta, ratios, the reference choice)
  ref, method = cfg.dpo.reference, cfg.finetune.method
  if ref == "lora_base":
    _check(method == "lora", "dpo.reference", "'lora_base' (the base with adapters off) needs finetune.method='lora'")
  if ref == "copy":
    _check(method != "lora", "dpo.reference", "with LoRA the reference is the base with its adapters off: use "
           "'lora_base' (or 'auto'), which needs no second copy of the weights")
  return cfg
