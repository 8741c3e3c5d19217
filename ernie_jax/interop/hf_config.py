"""HF (transformers) `config.json` <-> model configs, both directions and both families, so a round
trip reads in one file: `read_text` / `write_text` (model_type `ernie4_5`, `ernie4_5_moe`),
`read_vl` / `write_vl` (`ernie4_5_vl_moe`, nested `text_config` / `vision_config`; also the original
flat `ernie4_5_moe_vl` layout), `write` for either. `parse_vl` is shared with the Paddle reader
(`paddle_config`). Every unsupported or missing value raises `ConfigError` naming the field.
"""

from __future__ import annotations

import os
from typing import Any

from ernie_jax.config import VL_MODEL_TYPES, ConfigError, ModelConfig, VisionConfig, VLConfig
from ernie_jax.config.base import read_json, req, tok


def _opt(d: dict, key: str, default):
  """d[key], or `default` when the key is missing or null (transformers >= 5.25 writes unset fields as null)."""
  v = d.get(key)
  return default if v is None else v


def read_text(cfg: dict[str, Any] | str | os.PathLike, **overrides) -> ModelConfig:
  """From a transformers `config.json` (model_type `ernie4_5` or `ernie4_5_moe`), dict or path."""
  d = read_json(cfg)
  model_type = d.get("model_type", "")
  if model_type not in ("ernie4_5", "ernie4_5_moe"):
    raise ConfigError("model_type", f"expected 'ernie4_5' or 'ernie4_5_moe', got {model_type!r}")
  if d.get("use_bias"):
    raise ConfigError("use_bias", "ERNIE 4.5 has no biases; use_bias=true is not supported")
  rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
  rope_type = _opt(rope, "rope_type", _opt(rope, "type", "default"))
  if rope_type != "default":
    raise ConfigError("rope_parameters.rope_type", f"only 'default' RoPE is supported, got {rope_type!r}")
  theta = _opt(rope, "rope_theta", _opt(d, "rope_theta", 500000.0))
  hidden, heads = req(d, "hidden_size"), req(d, "num_attention_heads")
  # Dense HF config defaults head_dim to 128; the MoE config has no such field and attention
  # falls back to hidden // heads.
  default_head_dim = 128 if model_type == "ernie4_5" else hidden // heads
  kw = dict(
    vocab_size=req(d, "vocab_size"), hidden_size=hidden,
    num_hidden_layers=req(d, "num_hidden_layers"), num_attention_heads=heads,
    num_key_value_heads=d.get("num_key_value_heads") or heads,
    intermediate_size=req(d, "intermediate_size"),
    head_dim=d.get("head_dim") or default_head_dim, rope_theta=float(theta),
    rms_norm_eps=float(_opt(d, "rms_norm_eps", 1e-5)),
    tie_word_embeddings=bool(_opt(d, "tie_word_embeddings", True)),
    max_position_embeddings=int(_opt(d, "max_position_embeddings", 131072)),
    pad_token_id=tok(d.get("pad_token_id"), 0), bos_token_id=tok(d.get("bos_token_id"), 1),
    eos_token_id=tok(d.get("eos_token_id"), 2),
  )
  if model_type == "ernie4_5_moe":
    kw.update(
      moe_num_experts=int(_opt(d, "moe_num_experts", 64)), moe_k=int(_opt(d, "moe_k", 6)),
      moe_intermediate_size=int(_opt(d, "moe_intermediate_size", 1536)),
      moe_num_shared_experts=int(_opt(d, "moe_num_shared_experts", 2)),
      moe_layer_start_index=int(_opt(d, "moe_layer_start_index", 1)),
      moe_layer_end_index=int(_opt(d, "moe_layer_end_index", -1)),
      moe_layer_interval=int(_opt(d, "moe_layer_interval", 1)),
      moe_norm_min=float(_opt(d, "moe_norm_min", 1e-12)),
      num_mtp_layers=int(_opt(d, "num_nextn_predict_layers", 0)),
    )
  return ModelConfig(**{**kw, **overrides})


def write_text(cfg: ModelConfig, dtype: str = "bfloat16") -> dict:
  """`config.json` contents that transformers' Ernie4_5 / Ernie4_5_Moe classes load as `cfg`."""
  if cfg.rope_compression_ratio != 1.0:
    raise ConfigError("rope_compression_ratio", f"{cfg.rope_compression_ratio} cannot be expressed in "
                      "a transformers ERNIE 4.5 config (positions are never compressed there)")
  d = {
    "architectures": ["Ernie4_5_MoeForCausalLM" if cfg.is_moe else "Ernie4_5ForCausalLM"],
    "model_type": "ernie4_5_moe" if cfg.is_moe else "ernie4_5",
    "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
    "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
    "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
    "head_dim": cfg.head_dim, "hidden_act": "silu",
    "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
    "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
    "tie_word_embeddings": cfg.tie_word_embeddings, "use_bias": False, "use_cache": True,
    "initializer_range": cfg.initializer_range, "pad_token_id": cfg.pad_token_id,
    "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "dtype": dtype,
  }
  if cfg.is_moe:
    d.update(moe_num_experts=cfg.moe_num_experts, moe_k=cfg.moe_k,
             moe_intermediate_size=cfg.moe_intermediate_size,
             moe_num_shared_experts=cfg.moe_num_shared_experts,
             moe_layer_start_index=cfg.moe_layer_start_index,
             moe_layer_end_index=cfg.moe_layer_end_index,
             moe_layer_interval=cfg.moe_layer_interval, moe_norm_min=cfg.moe_norm_min,
             output_router_logits=False)
  if cfg.num_mtp_layers:
    d["num_nextn_predict_layers"] = cfg.num_mtp_layers
  return d


# --------------------------------------------------------------------------------------------------
def read_vl(cfg, **overrides) -> VLConfig:
  """From a transformers VL `config.json` (nested `text_config` / `vision_config`), or the
  original flat VL config (`ernie4_5_moe_vl`: per-modality MoE lists), as dict or path.
  Missing fields take the transformers defaults (= ERNIE-4.5-VL-28B-A3B)."""
  d = read_json(cfg)
  model_type = d.get("model_type", "")
  if model_type not in VL_MODEL_TYPES:
    raise ConfigError("model_type", f"expected one of {VL_MODEL_TYPES}, got {model_type!r}")
  return VLConfig(**{**parse_vl(d, paddle=False), **overrides})


def write_vl(cfg: VLConfig, dtype: str = "bfloat16") -> dict:
  """`config.json` contents that transformers' `Ernie4_5_VLMoeForConditionalGeneration` loads as `cfg`."""
  v = cfg.vision
  text = {
    "model_type": "ernie4_5_vl_moe_text", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
    "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
    "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
    "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
    "rms_norm_eps": cfg.rms_norm_eps, "initializer_range": cfg.initializer_range, "use_bias": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                        "mrope_section": list(cfg.mrope_section)},
    "mlp_layer_types": list(cfg.mlp_layer_types), "moe_num_experts": cfg.moe_num_experts,
    "moe_k": cfg.moe_k, "moe_intermediate_size": list(cfg.moe_intermediate_size),
    "moe_num_shared_experts": cfg.moe_num_shared_experts, "moe_norm_min": cfg.moe_norm_min,
    "output_router_logits": False, "tie_word_embeddings": cfg.tie_word_embeddings, "use_cache": True,
    "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
  }
  vision = {
    "model_type": "ernie4_5_vl_moe_vision", "depth": v.depth, "hidden_size": v.hidden_size,
    "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_channels": v.in_channels,
    "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
    "temporal_merge_size": v.temporal_merge_size, "hidden_act": v.hidden_act,
    "rms_norm_eps": v.layer_norm_eps, "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
  }
  return {"architectures": ["Ernie4_5_VLMoeForConditionalGeneration"], "model_type": "ernie4_5_vl_moe",
          "dtype": dtype, "tie_word_embeddings": cfg.tie_word_embeddings,
          "image_token_id": cfg.image_token_id, "image_start_token_id": cfg.image_start_token_id,
          "image_end_token_id": cfg.image_end_token_id, "video_token_id": cfg.video_token_id,
          "video_start_token_id": cfg.video_start_token_id, "video_end_token_id": cfg.video_end_token_id,
          "text_config": text, "vision_config": vision}


def write(cfg: ModelConfig | VLConfig, dtype: str = "bfloat16") -> dict:
  """`config.json` contents for either family."""
  return write_vl(cfg, dtype) if cfg.is_vl else write_text(cfg, dtype)


# --------------------------------------------------------------------------------------------------
# Fields whose default would silently change the numerics if a Paddle config.json left them out
# (PaddleFormers' defaults differ from transformers': rope_theta 10000, rms_norm_eps 1e-6, untied).
_PADDLE_REQUIRED = ("rope_theta", "rms_norm_eps", "tie_word_embeddings", "freq_allocation", "moe_k",
                    "moe_num_experts", "moe_intermediate_size")


def parse_vl(d: dict[str, Any], *, paddle: bool) -> dict[str, Any]:
  """VLConfig keyword arguments from a transformers (nested or flat) or Paddle (flat) config."""
  t = d if paddle else (d.get("text_config") or d)  # the flat layout keeps the text fields at top level
  pre = "" if paddle or t is d else "text_config."
  if paddle:
    for key in _PADDLE_REQUIRED:
      _req(d, key, "")
    v = _req(d, "vision_config", "")
    if not isinstance(v, dict):
      raise ConfigError("vision_config", f"must be an object, got {type(v).__name__}")
    for key in ("depth", "num_heads"):
      _req(v, key, "vision_config.")
    if v.get("hidden_size") is None and v.get("embed_dim") is None:
      raise ConfigError("vision_config.embed_dim", "missing from config.json (nor vision_config.hidden_size)")
    if float(_opt(d, "compression_ratio", 1.0)) != 1.0:
      raise ConfigError("compression_ratio", f"{d['compression_ratio']}: the VL model has no position compression")
    if d.get("rope_3d") is False:
      raise ConfigError("rope_3d", "false (1-D RoPE in a VL model) is not supported")
  else:
    v = d.get("vision_config") or {}
  if t.get("use_bias"):
    raise ConfigError(pre + "use_bias", "ERNIE 4.5 VL has no LM biases; use_bias=true is not supported")
  rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
  rope_type = _opt(rope, "rope_type", _opt(rope, "type", "default"))
  if rope_type != "default":
    raise ConfigError(pre + "rope_parameters.rope_type", f"only 'default' is supported, got {rope_type!r}")
  hidden, heads = _req(t, "hidden_size", pre), _req(t, "num_attention_heads", pre)
  head_dim = t.get("head_dim") or hidden // heads
  if rope.get("mrope_section") is not None:
    mrope = tuple(rope["mrope_section"])
  elif t.get("freq_allocation") is not None:  # flat layout: t gets the last `freq_allocation` slots
    hw = head_dim // 2 - int(t["freq_allocation"])
    mrope = (hw // 2, hw // 2, int(t["freq_allocation"]))
  else:
    mrope = (22, 22, 20)
  layers = _req(t, "num_hidden_layers", pre)
  kinds = t.get("mlp_layer_types")
  if kinds is None and t.get("moe_layer_start_index") is not None:
    start = min(_as_list(t["moe_layer_start_index"]))
    end = max(layers - 1 if e == -1 else e for e in _as_list(_opt(t, "moe_layer_end_index", -1)))
    interval = _as_list(_opt(t, "moe_layer_interval", 1))[0]
    kinds = ["sparse" if (i + 1) % interval == 0 and start <= i <= end else "dense" for i in range(layers)]
  experts = _as_list(_opt(t, "moe_num_experts", 64))
  if len(set(experts)) != 1:
    raise ConfigError(pre + "moe_num_experts",
                      f"text and vision expert counts must be equal (reference layout), got {experts}")
  ks = _as_list(_opt(t, "moe_k", 6))
  inter = _as_list(t.get("moe_intermediate_size") or [1536, 512])
  if len(inter) == 1:
    inter = inter * 2
  shared = _as_list(_opt(t, "moe_num_shared_experts", 0 if paddle else 2))[0]

  def token_id(key, default, alt=None):  # top level first, then the text part (flat / nested layouts)
    for src in (d, t):
      for k in (key, alt):
        if k and src.get(k) is not None:
          return tok(src[k], default)
    return default

  vision_hidden = int(v.get("hidden_size") or v.get("embed_dim") or 1280)
  if paddle and d.get("pixel_hidden_size") not in (None, vision_hidden):
    raise ConfigError("pixel_hidden_size", f"{d['pixel_hidden_size']} != vision hidden size {vision_hidden}")
  merge = int(_opt(v, "spatial_merge_size", _opt(d, "spatial_conv_size", 2)))
  if paddle and d.get("spatial_conv_size") not in (None, merge):
    raise ConfigError("spatial_conv_size", f"{d['spatial_conv_size']} != vision_config.spatial_merge_size {merge}")
  vision = VisionConfig(
    depth=int(_opt(v, "depth", 32)), hidden_size=vision_hidden,
    intermediate_size=int(v.get("intermediate_size") or int(vision_hidden * _opt(v, "mlp_ratio", 4))),
    num_heads=int(_opt(v, "num_heads", 16)), in_channels=int(_opt(v, "in_channels", _opt(v, "in_chans", 3))),
    patch_size=int(_opt(v, "patch_size", 14)), spatial_merge_size=merge,
    temporal_merge_size=int(_opt(v, "temporal_merge_size", _opt(d, "temporal_conv_size", 2))),
    rope_theta=float(_opt(v.get("rope_parameters") or {}, "rope_theta", 10000.0)),
    layer_norm_eps=float(_opt(v, "rms_norm_eps", 1e-6)), hidden_act=_opt(v, "hidden_act", "quick_gelu"))
  kw = dict(
    vocab_size=_req(t, "vocab_size", pre), hidden_size=hidden, num_hidden_layers=layers,
    num_attention_heads=heads, num_key_value_heads=t.get("num_key_value_heads") or heads,
    head_dim=head_dim, intermediate_size=_req(t, "intermediate_size", pre),
    rope_theta=float(_opt(rope, "rope_theta", _opt(t, "rope_theta", 500000.0))), mrope_section=mrope,
    rms_norm_eps=float(_opt(t, "rms_norm_eps", 1e-5)),
    tie_word_embeddings=bool(_opt(d, "tie_word_embeddings", _opt(t, "tie_word_embeddings", True))),
    max_position_embeddings=int(_opt(t, "max_position_embeddings", _opt(t, "max_sequence_length", 131072))),
    mlp_layer_types=tuple(kinds or ()), moe_num_experts=int(experts[0]), moe_k=int(ks[0]),
    moe_intermediate_size=(int(inter[0]), int(inter[1])), moe_num_shared_experts=int(shared),
    moe_norm_min=float(_opt(t, "moe_norm_min", 1e-12)),
    image_token_id=token_id("image_token_id", 100295, alt="im_patch_id"),
    image_start_token_id=token_id("image_start_token_id", 101304),
    image_end_token_id=token_id("image_end_token_id", 101305),
    video_token_id=token_id("video_token_id", 103367),
    video_start_token_id=token_id("video_start_token_id", 101306),
    video_end_token_id=token_id("video_end_token_id", 101307),
    pad_token_id=token_id("pad_token_id", 0), bos_token_id=token_id("bos_token_id", 1),
    eos_token_id=token_id("eos_token_id", 2), vision=vision)
  if paddle:
    kw["moe_use_correction_bias"] = bool(_opt(d, "moe_use_aux_free", True))
  return kw


# --------------------------------------------------------------------------------------------------
def _as_list(v):
  return list(v) if isinstance(v, (list, tuple)) else [v]


def _req(d, key, prefix="text_config."):
  return req(d, key, prefix)
