"""Test fixtures: ERNIE 4.5 VL checkpoints in the native `-Paddle` layout, written from a transformers
model's HF files by the documented Paddle <-> HF rules (spec §5.4; ERNIE
`tools/paddle2torch/tran_4_5t_vl.py` read backwards), independently of `ernie_jax.interop`:

  * prefix `ernie.` for the LM and the resampler; the vision tower under `vision_model.` (or
    `ernie.vision_model.`);
  * LM: q/k/v fused into `qkv_proj` [H, (nH + 2 nKV) d] = [Q | K | V]; gate/up fused into
    `up_gate_proj` [H, 2I] = [gate | up] for the dense MLP, every text and vision expert and the
    shared experts; `o_proj` / `down_proj` transposed to [in, out];
  * every other 2-D weight (vision tower incl. `attn.qkv` and `patch_embed.proj`, resampler)
    transposed to [in, out]; routers `mlp.gate.weight` / `weight_1` stay [H, E] (they already are
    on HF disk) and fp32, as does `moe_statics.e_score_correction_bias` [2, E];
  * an untied `lm_head.weight` [H, V]; a tied head is not written;
  * bf16 everywhere else, as BF16 or as raw U16 bit patterns;
  * a flat Paddle config.json (per-modality lists, freq_allocation, im_patch_id, vision_config
    with embed_dim / mlp_ratio).
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import torch

FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.weight_1", "e_score_correction_bias")


def round_to_bf16(model: torch.nn.Module) -> torch.nn.Module:
  """Round every weight but the routers / correction biases to bf16 values (kept in fp32), so the
  bf16 Paddle files hold exactly the reference's weights."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not (name.endswith("gate.weight") or name.endswith("e_score_correction_bias")):
        p.copy_(p.to(torch.bfloat16).float())
  return model


def paddle_config(hf_cfg: dict) -> dict:
  t, v = hf_cfg["text_config"], hf_cfg["vision_config"]
  kinds = t["mlp_layer_types"]
  sparse = [i for i, k in enumerate(kinds) if k == "sparse"]
  assert sparse == list(range(sparse[0], len(kinds))), kinds  # expressible as one MoE layer range
  rope = t["rope_parameters"]
  e, (it, iv) = t["moe_num_experts"], t["moe_intermediate_size"]
  return {
    "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"], "model_type": "ernie4_5_moe_vl",
    "vocab_size": t["vocab_size"], "hidden_size": t["hidden_size"], "intermediate_size": t["intermediate_size"],
    "num_hidden_layers": t["num_hidden_layers"], "num_attention_heads": t["num_attention_heads"],
    "num_key_value_heads": t["num_key_value_heads"], "rms_norm_eps": t["rms_norm_eps"],
    "rope_theta": rope["rope_theta"], "freq_allocation": rope["mrope_section"][2], "rope_3d": True,
    "max_position_embeddings": t["max_position_embeddings"], "tie_word_embeddings": hf_cfg["tie_word_embeddings"],
    "use_bias": False, "moe_num_experts": [e, e], "moe_k": t["moe_k"], "moe_intermediate_size": [it, iv],
    "moe_num_shared_experts": t["moe_num_shared_experts"], "moe_layer_start_index": [sparse[0]] * 2,
    "moe_layer_end_index": [len(kinds) - 1] * 2, "moe_layer_interval": 1, "moe_use_aux_free": True,
    "moe_gate": "topk", "moe_use_hard_gate": True, "moe_capacity": [e, e, e],
    "im_patch_id": hf_cfg["image_token_id"],
    **{k: hf_cfg[k] for k in ("image_start_token_id", "image_end_token_id", "video_start_token_id",
                              "video_end_token_id", "video_token_id")},
    "pixel_hidden_size": v["hidden_size"], "spatial_conv_size": v["spatial_merge_size"],
    "temporal_conv_size": v["temporal_merge_size"], "dtype": "bfloat16",
    "vision_config": {"depth": v["depth"], "embed_dim": v["hidden_size"], "hidden_size": v["hidden_size"],
                      "num_heads": v["num_heads"], "mlp_ratio": v["intermediate_size"] / v["hidden_size"],
                      "patch_size": v["patch_size"], "in_channels": v["in_channels"],
                      "spatial_merge_size": v["spatial_merge_size"], "hidden_act": v["hidden_act"]},
  }


def hf_to_paddle_tensors(hf: dict[str, np.ndarray], hf_cfg: dict, *, u16: bool,
                         vision_prefix: str = "vision_model.") -> dict[str, np.ndarray]:
  tied = hf_cfg["tie_word_embeddings"]
  out: dict[str, np.ndarray] = {}
  for name, x in hf.items():
    if name.startswith("model.vision_model."):
      out[vision_prefix + name[len("model.vision_model."):]] = x.T if x.ndim == 2 else x
      continue
    if name == "lm_head.weight":
      if not tied:
        out[name] = x.T
      continue
    assert name.startswith("model."), name
    base = "ernie." + name[len("model."):]
    if name.startswith("model.resampler_model."):
      out[base] = x.T if x.ndim == 2 and name.endswith(".weight") else x
    elif name.endswith("self_attn.q_proj.weight"):
      p = name[: -len("q_proj.weight")]
      out[base.replace("q_proj", "qkv_proj")] = np.concatenate([hf[p + f"{t}_proj.weight"].T for t in "qkv"], -1)
    elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "up_proj.weight")):
      continue  # fused with q_proj / gate_proj
    elif name.endswith("gate_proj.weight"):
      up = hf[name[: -len("gate_proj.weight")] + "up_proj.weight"]
      out[base.replace("gate_proj", "up_gate_proj")] = np.concatenate([x.T, up.T], -1)
    elif name.endswith(("down_proj.weight", "o_proj.weight")):
      out[base] = x.T
    else:  # norms, embedding, routers [H, E], correction bias [2, E]
      out[base] = x
  for name in list(out):
    x = np.ascontiguousarray(out[name])
    if not name.endswith(FP32_SUFFIXES):
      x = x.astype(ml_dtypes.bfloat16)
      x = x.view(np.uint16) if u16 else x
    out[name] = x
  return out


def write(dst, hf_dir, *, u16: bool, vision_prefix: str = "vision_model.") -> str:
  """Render the HF checkpoint `hf_dir` as a `-Paddle` directory `dst`."""
  from safetensors.numpy import load_file, save_file

  hf = load_file(os.path.join(hf_dir, "model.safetensors"))
  with open(os.path.join(hf_dir, "config.json")) as f:
    hf_cfg = json.load(f)
  os.makedirs(dst, exist_ok=True)
  tensors = hf_to_paddle_tensors(hf, hf_cfg, u16=u16, vision_prefix=vision_prefix)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "paddle"})
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(paddle_config(hf_cfg), f, indent=2)
  return str(dst)
