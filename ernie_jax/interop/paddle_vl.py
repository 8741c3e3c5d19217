"""Paddle ERNIE 4.5 VL (`-Paddle`) checkpoint names <-> ernie_jax VL parameters (spec §5.4, §4).

The native `-Paddle` layout of the text models (`ernie_jax.interop.paddle`: prefix `ernie.`, fused
`qkv_proj` [Q | K | V] and `up_gate_proj` [gate | up], Linear weights [in, out], bf16 as BF16 or
U16 bits), plus:
  * MoE layers: routers `mlp.gate.weight` (text) and `mlp.gate.weight_1` (vision) [H, E] fp32,
    `mlp.moe_statics.e_score_correction_bias` [2, E] fp32 (row 0 text, row 1 vision), experts
    `mlp.experts.{0..E-1}` text and `{E..2E-1}` vision, each with a fused `up_gate_proj`
    [H, 2 * I_modality] and `down_proj` [I_modality, H]; shared experts fused the same way;
  * resampler under `ernie.resampler_model.*`, vision tower under `vision_model.*` (FastDeploy
    also accepts `ernie.vision_model.*`; so do we), with every 2-D weight [in, out] — including
    the ViT's `attn.qkv` and `patch_embed.proj` — i.e. exactly our parameter layout;
  * `lm_head.weight`: ignored when tied; untied it is [H, V] (the Paddle Linear convention).

The tables are the text Paddle tables (LM rows) and the HF VL tables (vision / resampler rows,
whose `linear:n` become Paddle `inout:n`), so nothing is listed twice; the transforms are the
text Paddle ones (`paddle.paddle_shape`, `paddle.to_params`) plus one fuse kind, "rows": the two
router rows of the correction bias, with the HF VL table's `row:r` slots (`hf_vl.to_params`).
`ernie_jax.interop.convert.PaddleVLLayout` puts them together.

PaddleFormers' `save_to_hf=False` layout (`model.` prefix, GQA-grouped qkv) is only understood for
the text models; a VL checkpoint in that layout is refused with a CheckpointError.
"""

from __future__ import annotations

import numpy as np

from ernie_jax.interop import hf_vl, paddle
from ernie_jax.interop.hf import Slot
from ernie_jax.interop.paddle import (DENSE_MLP_TABLE, LAYER_TABLE, SHARED_TABLE, TOP_TABLE, UNTIED_HEAD_TABLE,
                                      PaddleTensor)
from ernie_jax.model.decoder import layer_locations
from ernie_jax.config import VLConfig

PREFIX = paddle.PREFIX["native"]  # "ernie."
VISION_PREFIXES = ("vision_model.", PREFIX + "vision_model.")
RESAMPLER_PREFIX = PREFIX + "resampler_model."


def _paddle_rows(rows):
  """HF VL rows (name, path, kind) -> Paddle rows: the same tensor, [in, out] instead of [out, in]."""
  return tuple((name, "none", ((path, kind.replace("linear:", "inout:")),)) for name, path, kind in rows)


MOE_TABLE = _paddle_rows(hf_vl.MOE_TABLE)  # routers [H, E]: "copy" in both layouts
MOE_BIAS_TABLE = (
  ("mlp.moe_statics.e_score_correction_bias", "rows",
   tuple((path, kind) for _, path, kind in hf_vl.MOE_BIAS_TABLE)),
)
EXPERT_TABLE = (  # `{e}` = checkpoint expert number, `{set}` = text_experts | vision_experts
  ("mlp.experts.{e}.up_gate_proj.weight", "concat", (("mlp/{set}/gate", "inout:1"), ("mlp/{set}/up", "inout:1"))),
  ("mlp.experts.{e}.down_proj.weight", "none", (("mlp/{set}/down", "inout:1"),)),
)
VISION_BLOCK_TABLE = _paddle_rows(hf_vl.VISION_BLOCK_TABLE)
VISION_TOP_TABLE = _paddle_rows(hf_vl.VISION_TOP_TABLE)
RESAMPLER_TABLE = _paddle_rows(hf_vl.RESAMPLER_TABLE)


def paddle_vl_name_map(cfg: VLConfig, vision_prefix: str = VISION_PREFIXES[0]) -> dict[str, PaddleTensor]:
  """Every Paddle VL tensor name the model expects, mapped to its parameter slots."""
  expand = lambda prefix, rows, base, index: paddle._expand(cfg, "native", prefix, rows, base, index)
  names: dict[str, PaddleTensor] = {}
  kinds = cfg.layer_kinds
  for i, (g, r, j) in enumerate(layer_locations(kinds)):
    pre, base = f"{PREFIX}layers.{i}.", f"groups/{g}/blocks/layers/{j}"
    if kinds[i] == "dense":
      names.update(expand(pre, LAYER_TABLE + DENSE_MLP_TABLE, base, (r,)))
      continue
    names.update(expand(pre, LAYER_TABLE + MOE_TABLE + (MOE_BIAS_TABLE if cfg.moe_use_correction_bias else ())
                        + (SHARED_TABLE if cfg.moe_num_shared_experts else ()), base, (r,)))
    for e, which, k in hf_vl.expert_sets(cfg):
      for name, fuse, parts in EXPERT_TABLE:
        slots = tuple(Slot(f"{base}/{path.format(set=which)}", (r, k), kind) for path, kind in parts)
        names[pre + name.format(e=e)] = PaddleTensor(slots, fuse)
  for b in range(cfg.vision.depth):
    names.update(expand(f"{vision_prefix}blocks.{b}.", VISION_BLOCK_TABLE, "vision_model/blocks", (b,)))
  names.update(expand(vision_prefix, VISION_TOP_TABLE, "", ()))
  names.update(expand(RESAMPLER_PREFIX, RESAMPLER_TABLE, "", ()))
  names.update(expand(PREFIX, TOP_TABLE, "", ()))
  if not cfg.tie_word_embeddings:
    names.update(expand("", UNTIED_HEAD_TABLE, "", ()))
  return names


def describe_unexpected(cfg: VLConfig, name: str, vision_prefix: str | None = None) -> str:
  if name.startswith(PREFIX) and (".q_proj." in name or ".k_proj." in name or ".gate_proj." in name):
    return "an unfused (HF-style) projection in a Paddle checkpoint, which fuses qkv and up_gate"
  return hf_vl.describe_unexpected(cfg, name, vision_prefix)


# --------------------------------------------------------------------------------------------------
# The official Paddle -> HF rule set for VL (ERNIE tools/paddle2torch/tran_4_5t_vl.py), written as
# string rules rather than through the tables above; `--verify` builds the transformers reference
# with it, so a mistake in the tables cannot hide in both sides of the comparison.
def reference_hf_tensors(get, names, cfg: VLConfig):
  """Yield (HF name, numpy array in torch layout) for every Paddle VL tensor name in `names`.

  Rules: `ernie.` -> `model.`; outside the vision tower split `qkv_proj` into [Q | K | V] and
  `up_gate_proj` in halves [gate | up]; transpose every 2-D `.weight` except `embed_tokens`,
  `lm_head` and the routers (`.gate.`). One deviation: an untied `lm_head` [H, V] is transposed
  (the text rule, tran_4_5t.py; the VL script only meets tied heads). get(name) returns the
  tensor already bit-cast (`paddle.decode`)."""
  nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  for name in names:
    if cfg.tie_word_embeddings and name == "lm_head.weight":
      continue
    x = get(name)
    hf = name.replace(PREFIX, "model.")
    if "vision" not in name and "qkv_proj" in name:
      for part, new in zip(np.split(x, [nh * d, nh * d + nkv * d], axis=-1), ("q_proj", "k_proj", "v_proj")):
        yield hf.replace("qkv_proj", new), np.ascontiguousarray(part.T)
    elif "vision" not in name and "up_gate_proj" in name:
      gate, up = np.split(x, 2, axis=-1)
      yield hf.replace("up_gate_proj", "gate_proj"), np.ascontiguousarray(gate.T)
      yield hf.replace("up_gate_proj", "up_proj"), np.ascontiguousarray(up.T)
    elif (name.endswith(".weight") and x.ndim == 2 and "embed_tokens" not in name and ".gate." not in name
          and (name != "lm_head.weight" or not cfg.tie_word_embeddings)):
      yield hf, np.ascontiguousarray(x.T)
    else:
      yield hf, x
