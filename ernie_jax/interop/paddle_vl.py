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
whose `Linear(n)` become `InOut(n)`), so nothing is listed twice; the two router rows of the
correction bias are the HF VL table's `Row(r)` slots read with `Fuse.ROWS`. The `paddle/vl` layout
of `ernie_jax.interop.layouts` reads them.

PaddleFormers' `save_to_hf=False` layout (`model.` prefix, GQA-grouped qkv) is only understood for
the text models; a VL checkpoint in that layout is refused with a CheckpointError.
"""

from __future__ import annotations

from ernie_jax.interop import hf_vl, paddle
from ernie_jax.interop.paddle import DENSE_MLP_TABLE, LAYER_TABLE, SHARED_TABLE, TOP_TABLE, UNTIED_HEAD_TABLE
from ernie_jax.interop.transforms import Fuse, InOut, Linear, Read, Slot
from ernie_jax.model.decoder import layer_locations
from ernie_jax.config import VLConfig

PREFIX = paddle.PREFIX["native"]  # "ernie."
VISION_PREFIXES = ("vision_model.", PREFIX + "vision_model.")
RESAMPLER_PREFIX = PREFIX + "resampler_model."


def _paddle_rows(rows):
  """HF VL rows (name, path, transform) -> Paddle rows: the same tensor, [in, out] instead of [out, in]."""
  return tuple((name, Fuse.NONE, ((path, InOut(t.in_axes) if isinstance(t, Linear) else t),)) for name, path, t in rows)


MOE_TABLE = _paddle_rows(hf_vl.MOE_TABLE)  # routers [H, E]: Copy() in both layouts
MOE_BIAS_TABLE = (
  ("mlp.moe_statics.e_score_correction_bias", Fuse.ROWS, tuple((path, t) for _, path, t in hf_vl.MOE_BIAS_TABLE)),
)
EXPERT_TABLE = (  # `{e}` = checkpoint expert number, `{set}` = text_experts | vision_experts
  ("mlp.experts.{e}.up_gate_proj.weight", Fuse.CONCAT, (("mlp/{set}/gate", InOut(1)), ("mlp/{set}/up", InOut(1)))),
  ("mlp.experts.{e}.down_proj.weight", Fuse.NONE, (("mlp/{set}/down", InOut(1)),)),
)
VISION_BLOCK_TABLE = _paddle_rows(hf_vl.VISION_BLOCK_TABLE)
VISION_TOP_TABLE = _paddle_rows(hf_vl.VISION_TOP_TABLE)
RESAMPLER_TABLE = _paddle_rows(hf_vl.RESAMPLER_TABLE)


def paddle_vl_name_map(cfg: VLConfig, vision_prefix: str = VISION_PREFIXES[0]) -> dict[str, Read]:
  """Every Paddle VL tensor name the model expects, mapped to its read."""
  expand = lambda prefix, rows, base, index: paddle.expand(cfg, "native", prefix, rows, base, index)
  names: dict[str, Read] = {}
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
        slots = tuple(Slot(f"{base}/{path.format(set=which)}", (r, k), t) for path, t in parts)
        names[pre + name.format(e=e)] = Read(pre + name.format(e=e), slots, fuse)
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
