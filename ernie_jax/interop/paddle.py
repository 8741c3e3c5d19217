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
patterns with dtype U16, which are bit-cast (never value-cast).

Every Paddle tensor maps to a `PaddleTensor`: its parameter slots (several for fused tensors, in
column order) and how they are fused:
  "none"    one slot; kinds "copy" (same shape), "inout:n" (2-D [prod(target[:n]), prod(target[n:])]),
            "squeeze" ([1, E] -> [E])
  "concat"  the slots' 2-D [in, out_i] forms concatenated along the last axis (qkv, up_gate)
  "gqa"     q, k, v grouped per KV head: [H, nKV * (G + 2) * d], G = query heads per KV head
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ernie_jax.config import ModelConfig
from ernie_jax.interop.hf import Slot
from ernie_jax.model.decoder import layer_locations

VARIANTS = ("native", "paddleformers")
PREFIX = {"native": "ernie.", "paddleformers": "model."}

# (Paddle name under `{prefix}layers.{l}.`, fuse, ((parameter path under the layer, kind), ...))
LAYER_TABLE: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
  ("input_layernorm.weight", "none", (("input_norm/weight", "copy"),)),
  ("post_attention_layernorm.weight", "none", (("post_norm/weight", "copy"),)),
  ("self_attn.qkv_proj.weight", "qkv", (("attn/q", "inout:1"), ("attn/k", "inout:1"), ("attn/v", "inout:1"))),
  ("self_attn.o_proj.weight", "none", (("attn/o", "inout:2"),)),
)
DENSE_MLP_TABLE = (
  ("mlp.up_gate_proj.weight", "concat", (("mlp/gate", "inout:1"), ("mlp/up", "inout:1"))),
  ("mlp.down_proj.weight", "none", (("mlp/down", "inout:1"),)),
)
MOE_TABLE = (
  ("mlp.gate.weight", "none", (("mlp/router/kernel", "inout:1"),)),
  ("mlp.experts.{e}.up_gate_proj.weight", "concat",
   (("mlp/experts/gate", "inout:1"), ("mlp/experts/up", "inout:1"))),
  ("mlp.experts.{e}.down_proj.weight", "none", (("mlp/experts/down", "inout:1"),)),
)
MOE_BIAS_TABLE = (
  ("mlp.moe_statics.e_score_correction_bias", "none", (("mlp/router/correction_bias", "squeeze"),)),
)
SHARED_TABLE = (
  ("mlp.shared_experts.up_gate_proj.weight", "concat", (("mlp/shared/gate", "inout:1"), ("mlp/shared/up", "inout:1"))),
  ("mlp.shared_experts.down_proj.weight", "none", (("mlp/shared/down", "inout:1"),)),
)
TOP_TABLE = (  # under the prefix
  ("embed_tokens.weight", "none", (("embed", "copy"),)),
  ("norm.weight", "none", (("norm/weight", "copy"),)),
)
UNTIED_HEAD_TABLE = (("lm_head.weight", "none", (("lm_head", "inout:1"),)),)  # top level, [H, V]
MTP_TABLE = (  # under the prefix; `{d}` = MTP depth
  ("mtp_emb_norm.{d}.weight", "none", (("mtp/{d}/emb_norm/weight", "copy"),)),
  ("mtp_hidden_norm.{d}.weight", "none", (("mtp/{d}/hidden_norm/weight", "copy"),)),
  ("mtp_linear_proj.{d}.weight", "none", (("mtp/{d}/proj", "inout:1"),)),  # [2H, H]
)
IGNORED_WHEN_TIED = ("lm_head.weight",)
# bf16 may be stored as its raw bit pattern (U16) next to real fp32/bf16/fp16 tensors.
ACCEPTED_DTYPES = ("F32", "BF16", "F16", "U16")


@dataclass(frozen=True)
class PaddleTensor:
  slots: tuple[Slot, ...]  # in column order for fused tensors
  fuse: str  # "none" | "concat" | "gqa"


def _layer_rows(cfg: ModelConfig, kind: str):
  rows = list(LAYER_TABLE)
  if kind == "moe":
    rows += MOE_TABLE + (MOE_BIAS_TABLE if cfg.moe_use_correction_bias else ())
    rows += SHARED_TABLE if cfg.moe_num_shared_experts else ()
  else:
    rows += DENSE_MLP_TABLE
  return rows


def _entry(fuse: str, variant: str, slots: tuple[Slot, ...]) -> PaddleTensor:
  if fuse == "qkv":
    fuse = "gqa" if variant == "paddleformers" else "concat"
  return PaddleTensor(slots, fuse)


def _expand(cfg, variant, prefix, rows, base_path, base_index):
  out = {}
  for name, fuse, parts in rows:
    experts = range(cfg.moe_num_experts) if "{e}" in name else (None,)
    for e in experts:
      index = base_index + (() if e is None else (e,))
      slots = tuple(Slot(f"{base_path}/{path}" if base_path else path, index, kind) for path, kind in parts)
      out[prefix + name.format(e=e)] = _entry(fuse, variant, slots)
  return out


def paddle_name_map(cfg: ModelConfig, variant: str = "native") -> dict[str, PaddleTensor]:
  """Every Paddle tensor name the model expects, mapped to its parameter slots."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown Paddle layout variant {variant!r}; choose one of {VARIANTS}")
  prefix = PREFIX[variant]
  names: dict[str, PaddleTensor] = {}
  kinds = cfg.layer_kinds
  for i, (g, r, j) in enumerate(layer_locations(kinds)):
    names.update(_expand(cfg, variant, f"{prefix}layers.{i}.", _layer_rows(cfg, kinds[i]),
                         f"groups/{g}/blocks/layers/{j}", (r,)))
  names.update(_expand(cfg, variant, prefix, TOP_TABLE, "", ()))
  if not cfg.tie_word_embeddings:
    names.update(_expand(cfg, variant, "", UNTIED_HEAD_TABLE, "", ()))
  for d in range(cfg.num_mtp_layers):
    rows = [(n.format(d=d), f, tuple((p.format(d=d), k) for p, k in parts)) for n, f, parts in MTP_TABLE]
    names.update(_expand(cfg, variant, prefix, rows, "", ()))
    block_kind = "moe" if cfg.is_moe_layer(d) else "dense"
    names.update(_expand(cfg, variant, f"{prefix}mtp_block.{d}.", _layer_rows(cfg, block_kind),
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


# ------------------------------------------------------------------------------------------------
# Layout transforms. `targets` are the slots' per-slot parameter shapes (stacked axes removed).
def _in_axes(kind: str) -> int:
  return int(kind.split(":")[1])


def _as_2d(kind: str, target: tuple[int, ...]) -> tuple[int, int]:
  n = _in_axes(kind)
  return int(np.prod(target[:n])), int(np.prod(target[n:]))


def paddle_shape(t: PaddleTensor, targets: list[tuple[int, ...]]) -> tuple[int, ...]:
  """The Paddle tensor shape that fills slots of shapes `targets`."""
  if t.fuse == "none":
    (slot,), (target,) = t.slots, targets
    if slot.kind == "copy":
      return tuple(target)
    if slot.kind == "squeeze":
      return (1,) + tuple(target)
    return _as_2d(slot.kind, target)
  forms = [_as_2d(s.kind, tgt) for s, tgt in zip(t.slots, targets)]
  return (forms[0][0], sum(f[1] for f in forms))


def to_params(t: PaddleTensor, x: np.ndarray, targets: list[tuple[int, ...]]) -> list[np.ndarray]:
  """Split / reshape one Paddle tensor into its slots' values (views where possible)."""
  if t.fuse == "none":
    return [x.reshape(targets[0])]
  if t.fuse == "concat":
    widths = np.cumsum([_as_2d(s.kind, tgt)[1] for s, tgt in zip(t.slots, targets)])[:-1]
    return [p.reshape(tgt) for p, tgt in zip(np.split(x, widths, axis=-1), targets)]
  if t.fuse == "gqa":  # targets: q [H, nH, d], k/v [H, nKV, d]
    (h, nh, d), (_, nkv, _) = targets[0], targets[1]
    g = nh // nkv
    grouped = x.reshape(h, nkv, g + 2, d)
    return [grouped[:, :, :g].reshape(h, nh, d), grouped[:, :, g], grouped[:, :, g + 1]]
  raise ValueError(f"unknown fuse kind {t.fuse!r}")


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


# ------------------------------------------------------------------------------------------------
# The official Paddle -> HF rule set (ERNIE tools/paddle2torch/tran_4_5t.py), written as string
# rules rather than through the table above. `--verify` uses it to build the transformers
# reference, so a mistake in the table cannot hide in both sides of the comparison.
def reference_hf_tensors(get, names, cfg: ModelConfig, variant: str = "native"):
  """Yield (HF name, numpy array in torch layout) for every Paddle tensor name in `names`.

  get(name) returns the tensor already bit-cast (see `decode`).
  """
  prefix = PREFIX[variant]
  d, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
  for name in names:
    if cfg.tie_word_embeddings and name == "lm_head.weight":
      continue
    x = get(name)
    hf = "model." + name[len(prefix):] if name.startswith(prefix) else name
    if "qkv_proj" in name:
      if variant == "paddleformers":
        g = nh // nkv
        grouped = x.reshape(x.shape[0], nkv, g + 2, d)
        q = grouped[:, :, :g].reshape(x.shape[0], -1)
        k, v = grouped[:, :, g].reshape(x.shape[0], -1), grouped[:, :, g + 1].reshape(x.shape[0], -1)
      else:
        q, k, v = np.split(x, [nh * d, nh * d + nkv * d], axis=-1)
      for part, new in zip((q, k, v), ("q_proj", "k_proj", "v_proj")):
        yield hf.replace("qkv_proj", new), np.ascontiguousarray(part.T)
    elif "up_gate_proj" in name:
      gate, up = np.split(x, 2, axis=-1)
      yield hf.replace("up_gate_proj", "gate_proj"), np.ascontiguousarray(gate.T)
      yield hf.replace("up_gate_proj", "up_proj"), np.ascontiguousarray(up.T)
    elif any(k in name for k in ("down_proj.weight", "o_proj.weight", "gate.weight",
                                  "mtp_linear_proj")) or name == "lm_head.weight":
      yield hf, np.ascontiguousarray(x.T)
    else:
      yield hf, x
