"""Paddle / PaddleFormers `config.json` -> model configs (reading only; checkpoints are exported to
HF): `read_text` and `read_vl` (flat layout, per-modality lists, shares `hf_config.parse_vl`).
Paddle's defaults are not transformers' (spec §5.4), see each reader.
"""

from __future__ import annotations

import os
from typing import Any

from ernie_jax.config import ConfigError, ModelConfig, VLConfig
from ernie_jax.config.base import read_json, req, tok
from ernie_jax.interop.hf_config import parse_vl


def read_text(cfg: dict[str, Any] | str | os.PathLike, **overrides) -> ModelConfig:
  """From a Paddle / PaddleFormers `config.json`.

  Differences from HF: PaddleFormers defaults (rope_theta 10000, rms_norm_eps 1e-6) apply when a
  key is missing; MoE fields may be lists (per modality: text first), `moe_use_aux_free` names
  the correction bias and `num_nextn_predict_layers` the MTP depth.
  """
  d = read_json(cfg)
  if d.get("use_bias"):
    raise ConfigError("use_bias", "ERNIE 4.5 has no biases; use_bias=true is not supported")
  hidden, heads = req(d, "hidden_size"), req(d, "num_attention_heads")
  kw = dict(
    vocab_size=req(d, "vocab_size"), hidden_size=hidden,
    num_hidden_layers=req(d, "num_hidden_layers"), num_attention_heads=heads,
    num_key_value_heads=d.get("num_key_value_heads") or heads,
    intermediate_size=req(d, "intermediate_size"),
    head_dim=d.get("head_dim") or hidden // heads,
    rope_theta=float(d.get("rope_theta", 10000.0)),
    rope_compression_ratio=float(d.get("compression_ratio", 1.0)),
    rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
    tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
    max_position_embeddings=int(d.get("max_position_embeddings", d.get("max_sequence_length", 131072))),
    pad_token_id=tok(d.get("pad_token_id"), 0), bos_token_id=tok(d.get("bos_token_id"), 1),
    eos_token_id=tok(d.get("eos_token_id"), 2),
    num_mtp_layers=int(d.get("num_nextn_predict_layers", 0) or 0),
  )
  experts = _text(d.get("moe_num_experts", 0))
  if experts:
    kw.update(
      moe_num_experts=int(experts), moe_k=int(_text(d.get("moe_k", 2))),
      moe_intermediate_size=int(_text(d.get("moe_intermediate_size", 0)) or d["intermediate_size"]),
      moe_num_shared_experts=int(_text(d.get("moe_num_shared_experts", 0))),
      moe_layer_start_index=int(_text(d.get("moe_layer_start_index", 0))),
      moe_layer_end_index=int(_text(d.get("moe_layer_end_index", -1))),
      moe_layer_interval=int(_text(d.get("moe_layer_interval", 1))),
      moe_norm_min=float(d.get("moe_norm_min", 1e-12)),
      moe_use_correction_bias=bool(d.get("moe_use_aux_free", True)),
    )
  return ModelConfig(**{**kw, **overrides})


def read_vl(cfg, **overrides) -> VLConfig:
  """From the `config.json` of a Paddle `-Paddle` VL checkpoint (flat: per-modality lists
  `moe_num_experts: [text, vision]`, `moe_intermediate_size: [text, vision]`,
  `moe_layer_{start,end}_index`, `freq_allocation`, `im_patch_id`, nested `vision_config` with
  `embed_dim` / `mlp_ratio`, `pixel_hidden_size`, `spatial_conv_size`, `temporal_conv_size`,
  `moe_use_aux_free`). Paddle's defaults are not transformers' (spec §5.4: rope_theta, eps, tied
  head), so the fields whose default would silently change the numerics are required: a
  missing one raises ConfigError naming it. model_type is not required."""
  return VLConfig(**{**parse_vl(read_json(cfg), paddle=True), **overrides})


def _text(v):
  """Paddle VL configs give per-modality lists; the text model uses the first entry."""
  return v[0] if isinstance(v, (list, tuple)) else v
