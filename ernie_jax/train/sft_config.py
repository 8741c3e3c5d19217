"""The supervised fine-tuning config (`experiments/sft.py`): the pretraining config's sections
(`ernie_jax.train.config`: run, model, train, mesh, distributed, optim, loss, checkpoint, metrics) with
  data      ChatDataConfig   chat JSONL / the embedded stdlib Q&A (`ernie_jax.data.sft`); with
                             model_family="vl": VLChatDataConfig, chats with images / the embedded
                             shapes chats (`ernie_jax.data.vl_chat`)
  lora      LoraConfig       rank, alpha, rsLoRA, dropout, targets (`ernie_jax.config.lora`); used
                             when finetune.method="lora"
  groups    GroupsConfig     frozen or slower parameter groups (routers, VL vision tower), as in
                             pretraining (`ernie_jax.train.param_groups`)
  finetune  FinetuneConfig   full / LoRA, LoRA+, evaluation, a sample answer
`run.init_from` names the base model (HF / Paddle / Orbax directory); empty = a randomly initialised
`model` (the tiny demo). model_family="vl" (`default_sft_config(VLConfig)` sets it) fine-tunes ERNIE 4.5 VL. Defaults follow ERNIEKit's SFT recipes (spec §7): AdamW b2 0.95, cosine
decay, warmup 20, weight decay 0.1; lr 1e-5 for full fine-tuning, 1e-4 for LoRA (set by the configs).
`parse_sft(config)` builds and validates it; a problem raises `TrainConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from ernie_jax.config import LoraConfig, ModelConfig
from ernie_jax.data.sft import ChatDataConfig
from ernie_jax.data.vl_chat import VLChatDataConfig, vl_layout_problem
from ernie_jax.parallel import MeshConfig
from ernie_jax.parallel.distributed import DistributedConfig
from ernie_jax.train import config as config_lib
from ernie_jax.train.config import (CheckpointConfig, MetricsConfig, PrecisionConfig, RunConfig, TrainConfigError,
                                    _check, parse_sections, validate_common, validate_groups)
from ernie_jax.train.losses import LossConfig
from ernie_jax.train.optimizer import OptimConfig
from ernie_jax.train.param_groups import METHODS, FinetuneConfig, GroupsConfig


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  run: RunConfig
  model: Any  # ModelConfig | VLConfig
  mesh: MeshConfig
  data: ChatDataConfig
  optim: OptimConfig
  loss: LossConfig
  checkpoint: CheckpointConfig
  metrics: MetricsConfig
  lora: LoraConfig
  groups: GroupsConfig
  finetune: FinetuneConfig
  train: PrecisionConfig = PrecisionConfig()
  distributed: DistributedConfig = DistributedConfig()


_SECTIONS = {"train": PrecisionConfig, "mesh": MeshConfig, "data": ChatDataConfig, "optim": OptimConfig,
             "loss": LossConfig, "checkpoint": CheckpointConfig, "metrics": MetricsConfig, "lora": LoraConfig,
             "groups": GroupsConfig, "finetune": FinetuneConfig, "distributed": DistributedConfig}
_VL_SECTIONS = {**_SECTIONS, "data": VLChatDataConfig}


def sections_for(family: str) -> dict[str, type]:
  """The config sections of an SFT run of `family` ("text" / "vl": the VL data section)."""
  return _VL_SECTIONS if family == "vl" else _SECTIONS


def default_sft_config(model=None) -> ml_collections.ConfigDict:
  """Every field with its default (ERNIEKit's SFT defaults); experiment configs change a few. model: a
  ModelConfig, or a VLConfig (sets model_family="vl" and the VL data section)."""
  c = ml_collections.ConfigDict(dataclasses.asdict(RunConfig()))
  c.workdir = "/tmp/ernie_jax/sft"
  c.steps = 500
  if model is not None and model.is_vl:
    c.model_family = "vl"
    c.model = config_lib.vl_model_fields(model)
  else:
    c.model = config_lib.model_fields(model or ModelConfig.tiny_dense())
  for name, cls in sections_for(c.model_family).items():
    setattr(c, name, dataclasses.asdict(cls()))
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 20
  c.optim.min_lr_ratio = 0.01
  c.checkpoint.every_steps = 100
  c.loss.moe_aux_coef = 0.0  # ERNIEKit's SFT recipes fine-tune without the balance loss...
  c.loss.moe_z_coef = 0.0
  c.loss.moe_orth_coef = 0.0  # ... and the router orthogonal loss; the correction bias still updates
  return c


def erniekit_lora_8k(c: ml_collections.ConfigDict, weight_decay: float) -> ml_collections.ConfigDict:
  """ERNIEKit's `run_sft_lora_8k.yaml` settings (spec §7) on an SFT config, for a real base model: LoRA
  rank 32 (alpha 2 x rank), lr 1e-4 with 20 warmup steps and cosine decay to 1e-6, 8k-token rows, 64 rows per
  step, the base checkpoint's tokenizer (data.tokenizer ""), evaluation / checkpoints every 200 steps.
  `weight_decay`: 0.01 in ERNIEKit's 0.3B recipe, 0.1 in its 21B one."""
  c.init_from = ""  # required: the base model directory (HF -PT, -Paddle or Orbax)
  c.steps = 2000
  c.global_batch_size = 64
  c.data.paths = ""  # your chat JSONL ("" = the embedded stdlib Q&A)
  c.data.tokenizer = ""  # "" = the tokenizer (and chat template) of init_from
  c.data.seq_len = 8192
  c.finetune.method = "lora"
  c.lora.rank = 32
  c.optim.lr = 1e-4
  c.optim.weight_decay = weight_decay
  c.optim.warmup_steps = 20
  c.optim.min_lr_ratio = 0.01
  c.finetune.eval_every = 200
  c.checkpoint.every_steps = 200
  c.metrics.log_every = 10
  return c


def parse_finetune_sections(config: ml_collections.ConfigDict | dict, sections: dict[str, type]):
  """`config.parse_sections` with data.tokenizer "" resolved to run.init_from (the base model's tokenizer and
  chat template)."""
  run, model, parts = parse_sections(config, sections)
  if not parts["data"].tokenizer:
    _check(bool(run.init_from), "data.tokenizer", "set a tokenizer ('bytes', 'bpe' or a path), or run.init_from "
           "(its directory holds the base model's tokenizer)")
    parts["data"] = dataclasses.replace(parts["data"], tokenizer=run.init_from)
  return run, model, parts


def parse_sft(config: ml_collections.ConfigDict | dict) -> SFTConfig:
  """Typed, validated SFT config (raises TrainConfigError naming the field)."""
  run, model, parts = parse_finetune_sections(config, sections_for(config.get("model_family", "text")))
  cfg = SFTConfig(run=run, model=model, **parts)
  validate_sft(cfg)
  return cfg


def validate_sft(c: SFTConfig) -> None:
  validate_common(c)
  ft, lo, d, g = c.finetune, c.lora, c.data, c.groups
  _check(ft.method in METHODS, "finetune.method", f"must be one of {METHODS}, got {ft.method!r}")
  _check(math.isfinite(ft.lora_plus_ratio) and ft.lora_plus_ratio > 0, "finetune.lora_plus_ratio",
         f"must be > 0, got {ft.lora_plus_ratio}")
  validate_groups(g, c.model)
  _check(ft.eval_every >= 0, "finetune.eval_every", f"must be >= 0, got {ft.eval_every}")
  _check(ft.eval_batches >= 0, "finetune.eval_batches", f"must be >= 0, got {ft.eval_batches}")
  _check(ft.sample_tokens >= 0, "finetune.sample_tokens", f"must be >= 0, got {ft.sample_tokens}")
  if ft.method == "lora":  # (freeze_router / freeze_vision: no adapter in those groups trains)
    _check(lo.rank > 0, "lora.rank", f"must be > 0, got {lo.rank}")
    _check(getattr(c.model, "fp8_recipe", "none") == "none", "train.precision",
           "FP8 trains every Param; use 'bf16' or 'fp32' with LoRA")
  else:
    _check(ft.lora_plus_ratio == 1.0, "finetune.lora_plus_ratio", "applies to method='lora' only")
  _check(d.seq_len <= c.model.max_position_embeddings, "data.seq_len",
         f"{d.seq_len} exceeds model.max_position_embeddings={c.model.max_position_embeddings}")
  if c.model.is_vl:
    _check(isinstance(d, VLChatDataConfig), "model_family", "model_family='vl' fine-tunes on chats with images "
           "(experiments/sft.py); preference optimisation of VL models is not supported")
    validate_vl_data(d, c.model)


def validate_vl_data(d: VLChatDataConfig, m) -> None:
  """The VL chat data layout against the VLConfig (as `config.validate_vl` for image-caption data)."""
  problem = vl_layout_problem(d, m)
  if problem is not None:
    raise TrainConfigError(*problem)
  config_lib.check_vl_token_ids(m, d.tokenizer, d.bpe_vocab_size)
