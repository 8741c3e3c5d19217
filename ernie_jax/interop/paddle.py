"""Paddle ERNIE 4.5 checkpoint names <-> ernie_jax parameters, as a data table (spec §5.4).

Two on-disk layouts are understood:
  "native"        the `baidu/ERNIE-4.5-*-Paddle` files: prefix `ernie.`, fused `qkv_proj` with
                  columns [Q all heads | K | V], fused `up_gate_proj` [gate | up]
  "paddleformers" what PaddleFormers writes with `save_to_hf=False`: prefix `model.`, `qkv_proj`
                  grouped per KV head ([q heads of group g, k_g, v_g] for each g), `lm_head.weight`
                  present even when tied; otherwise as native

Both store Linear weights [in, out] (the parameter layout here, so no transpose is needed: a
Paddle tensor is our parameter reshaped), the router `gate.weight` [H, E] fp32, the correction
bias [1, E] fp32, an untied `lm_head.weight` [H, V], and bf16 either as BF16 or as the raw bit
patterns with dtype U16, which are bit-cast (never value-cast, `decode`).

Every Paddle tensor maps to a `transforms.Read`: its parameter slots (several for fused tensors,
in column order) with typed transforms (`Copy()`, `InOut(n)`, `Squeeze()`) and how they are fused
(`Fuse.NONE`, `Fuse.CONCAT` for up_gate and native qkv, `Fuse.GQA` for PaddleFormers' qkv).
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np

from ernie_jax.config import ModelConfig
from ernie_jax.interop.transforms import Copy, Fuse, InOut, Read, Slot, Squeeze
from ernie_jax.model.decoder import layer_locations

VARIANTS = ("native", "paddleformers")
PREFIX = {"native": "ernie.", "paddleformers": "model."}

# (Paddle name under `{prefix}layers.{l}.`, fuse, ((parameter path under the layer, transform), ...));
# fuse "qkv" is Fuse.CONCAT in the native layout, Fuse.GQA in PaddleFormers'.
LAYER_TABLE = (
  ("input_layernorm.weight", Fuse.NONE, (("input_norm/weight", Copy()),)),
  ("post_attention_layernorm.weight", Fuse.NONE, (("post_norm/weight", Copy()),)),
  ("self_attn.qkv_proj.weight", "qkv", (("attn/q", InOut(1)), ("attn/k", InOut(1)), ("attn/v", InOut(1)))),
  ("self_attn.o_proj.weight", Fuse.NONE, (("attn/o", InOut(2)),)),
)
DENSE_MLP_TABLE = (
  ("mlp.up_gate_proj.weight", Fuse.CONCAT, (("mlp/gate", InOut(1)), ("mlp/up", InOut(1)))),
  ("mlp.down_proj.weight", Fuse.NONE, (("mlp/down", InOut(1)),)),
)
MOE_TABLE = (
  ("mlp.gate.weight", Fuse.NONE, (("mlp/router/kernel", InOut(1)),)),
  ("mlp.experts.{e}.up_gate_proj.weight", Fuse.CONCAT,
   (("mlp/experts/gate", InOut(1)), ("mlp/experts/up", InOut(1)))),
  ("mlp.experts.{e}.down_proj.weight", Fuse.NONE, (("mlp/experts/down", InOut(1)),)),
)
MOE_BIAS_TABLE = (
  ("mlp.moe_statics.e_score_correction_bias", Fuse.NONE, (("mlp/router/correction_bias", Squeeze()),)),
)
SHARED_TABLE = (
  ("mlp.shared_experts.up_gate_proj.weight", Fuse.CONCAT, (("mlp/shared/gate", InOut(1)), ("mlp/shared/up", InOut(1)))),
  ("mlp.shared_experts.down_proj.weight", Fuse.NONE, (("mlp/shared/down", InOut(1)),)),
)
TOP_TABLE = (  # under the prefix
  ("embed_tokens.weight", Fuse.NONE, (("embed", Copy()),)),
  ("norm.weight", Fuse.NONE, (("norm/weight", Copy()),)),
)
UNTIED_HEAD_TABLE = (("lm_head.weight", Fuse.NONE, (("lm_head", InOut(1)),)),)  # top level, [H, V]
MTP_TABLE = (  # under the prefix; `{d}` = MTP depth
  ("mtp_emb_norm.{d}.weight", Fuse.NONE, (("mtp/{d}/emb_norm/weight", Copy()),)),
  ("mtp_hidden_norm.{d}.weight", Fuse.NONE, (("mtp/{d}/hidden_norm/weight", Copy()),)),
  ("mtp_linear_proj.{d}.weight", Fuse.NONE, (("mtp/{d}/proj", InOut(1)),)),  # [2H, H]
)
IGNORED_WHEN_TIED = ("lm_head.weight",)
# bf16 may be stored as its raw bit pattern (U16) next to real fp32/bf16/fp16 tensors.
ACCEPTED_DTYPES = ("F32", "BF16", "F16", "U16")


def _layer_rows(cfg: ModelConfig, kind: str):
  rows = list(LAYER_TABLE)
  if kind == "moe":
    rows += MOE_TABLE + (MOE_BIAS_TABLE if cfg.moe_use_correction_bias else ())
    rows += SHARED_TABLE if cfg.moe_num_shared_experts else ()
  else:
    rows += DENSE_MLP_TABLE
  return rows


def expand(cfg, variant: str, prefix: str, rows, base_path: str, base_index: tuple[int, ...]) -> dict[str, Read]:
  """The reads of table `rows` under name `prefix` and parameter `base_path` / `base_index`
  (`{e}` in a name runs over the experts, adding the expert to the index)."""
  out = {}
  for name, fuse, parts in rows:
    if fuse == "qkv":
      fuse = Fuse.GQA if variant == "paddleformers" else Fuse.CONCAT
    experts = range(cfg.moe_num_experts) if "{e}" in name else (None,)
    for e in experts:
      index = base_index + (() if e is None else (e,))
      slots = tuple(Slot(f"{base_path}/{path}" if base_path else path, index, t) for path, t in parts)
      full = prefix + name.format(e=e)
      out[full] = Read(full, slots, fuse)
  return out


def paddle_name_map(cfg: ModelConfig, variant: str = "native") -> dict[str, Read]:
  """Every Paddle tensor name the model expects, mapped to its read."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown Paddle layout variant {variant!r}; choose one of {VARIANTS}")
  prefix = PREFIX[variant]
  names: dict[str, Read] = {}
  kinds = cfg.layer_kinds
  for i, (g, r, j) in enumerate(layer_locations(kinds)):
    names.update(expand(cfg, variant, f"{prefix}layers.{i}.", _layer_rows(cfg, kinds[i]),
                         f"groups/{g}/blocks/layers/{j}", (r,)))
  names.update(expand(cfg, variant, prefix, TOP_TABLE, "", ()))
  if not cfg.tie_word_embeddings:
    names.update(expand(cfg, variant, "", UNTIED_HEAD_TABLE, "", ()))
  for d in range(cfg.num_mtp_layers):
    rows = [(n.format(d=d), f, tuple((p.format(d=d), t) for p, t in parts)) for n, f, parts in MTP_TABLE]
    names.update(expand(cfg, variant, prefix, rows, "", ()))
    block_kind = "moe" if cfg.is_moe_layer(d) else "dense"
    names.update(expand(cfg, variant, f"{prefix}mtp_block.{d}.", _layer_rows(cfg, block_kind),
                         f"mtp/{d}/block", ()))
  return names


def ignorable(cfg: ModelConfig, name: str) -> bool:
  return cfg.tie_word_embeddings and name in IGNORED_WHEN_TIED


def detect_variant(names) -> str | None:
  """"native", "paddleformers", or None when the names are not a Paddle layout."""
  names = list(names)
  if any(n.startswith("ernie.") for n in names):
    return "native"
  if any(n.startswith("model.") and (".qkv_proj." in n or ".up_gate_proj." in n) for n in names):
    return "paddleformers"
  return None


def decode(x: np.ndarray, dtype_tag: str) -> np.ndarray:
  """U16 tensors hold bf16 bit patterns: reinterpret the bits (a value cast would be wrong)."""
  if dtype_tag == "U16":
    return x.view(ml_dtypes.bfloat16)
  return x


# ------------------------------------------------------------------------------------------------
_LAYER_RE = re.compile(r"^(?:ernie|model)\.layers\.(\d+)\.")


def describe_unexpected(cfg: ModelConfig, name: str) -> str:
  m = _LAYER_RE.match(name)
  if name.endswith(".weight_1") or "resampler_model" in name or "vision_model" in name:
    return ("a vision tensor of an ERNIE-4.5-VL checkpoint; only the text models (dense and MoE) "
            "are supported")
  if m and int(m.group(1)) >= cfg.num_hidden_layers:
    return f"layer {m.group(1)} but the config has num_hidden_layers={cfg.num_hidden_layers}"
  if "mtp" in name and cfg.num_mtp_layers == 0:
    return "an MTP tensor but the config has num_nextn_predict_layers=0"
  if m and ".experts." in name and not cfg.is_moe_layer(int(m.group(1))):
    return f"an expert tensor but layer {m.group(1)} is dense under the config's MoE layer rule"
  if ".q_proj." in name or ".k_proj." in name or ".gate_proj." in name:
    return "an unfused (HF-style) projection in a Paddle checkpoint, which fuses qkv and up_gate"
  return "not part of the model described by the config"
