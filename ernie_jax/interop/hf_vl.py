"""Hugging Face ERNIE 4.5 VL (`-PT`) checkpoints <-> ernie_jax VL parameters, as a data table (read
by `ernie_jax.from_pretrained` and the converters through `ernie_jax.interop.convert`).

On-disk names (spec §5.3; what transformers' `save_pretrained` writes after reversing its in-memory
renames): `model.layers.*` (LM), `model.vision_model.*` (ViT; the original `-PT` release and
ERNIE's `tran_4_5t_vl.py` write it top level as `vision_model.*`: both are accepted),
`model.resampler_model.*` (resampler, `spatial_linear.{0,2,3}` = fc1 / fc2 / LayerNorm),
`lm_head.weight` when untied. MoE layers: routers `mlp.gate.weight` (text) and `mlp.gate.weight_1`
(vision) stored [H, E] (our layout, not transposed), `mlp.moe_statics.e_score_correction_bias`
[2, E] (row 0 text, row 1 vision), experts `mlp.experts.{0..E-1}` text and `{E..2E-1}` vision.

Each name maps to one or more slots (parameter path, index into its stacked axes, kind):
  "copy"      same layout;  "linear:n"  torch Linear [out, in] -> [in, out] reshaped (see hf.py);
  "row:r"     row r of a [2, E] tensor (the name has one slot per row).
The tensors are read through the streaming engine of `ernie_jax.interop.convert` (layouts
`HFVLLayout` / `PaddleVLLayout`): names, shapes and dtypes are checked against the config from the
headers before any data is read.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator

import numpy as np
from flax import nnx

from ernie_jax.interop.hf import (DENSE_MLP_TABLE, LAYER_TABLE, SHARED_TABLE, TOP_TABLE, UNTIED_HEAD_TABLE, Slot,
                                  from_param, hf_shape, to_param)
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.model.decoder import layer_locations
from ernie_jax.config import VL_MODEL_TYPES, VLConfig
from ernie_jax.model.vl.lm_vl import Ernie45VLForConditionalGeneration

# Decoder-layer rows shared with the text model (LAYER_TABLE, DENSE_MLP_TABLE, SHARED_TABLE: hf.py).
MOE_TABLE = (
  ("mlp.gate.weight", "mlp/text_router/kernel", "copy"),
  ("mlp.gate.weight_1", "mlp/vision_router/kernel", "copy"),
)
MOE_BIAS_TABLE = (  # one tensor, two slots
  ("mlp.moe_statics.e_score_correction_bias", "mlp/text_router/correction_bias", "row:0"),
  ("mlp.moe_statics.e_score_correction_bias", "mlp/vision_router/correction_bias", "row:1"),
)
# `{e}` runs over 0..E-1 for the text experts and E..2E-1 for the vision experts (`expert_sets`)
EXPERT_TABLE = (
  ("mlp.experts.{e}.gate_proj.weight", "gate", "linear:1"),
  ("mlp.experts.{e}.up_proj.weight", "up", "linear:1"),
  ("mlp.experts.{e}.down_proj.weight", "down", "linear:1"),
)
VISION_BLOCK_TABLE = (  # under `{vision prefix}blocks.{b}.` -> vision_model/blocks/...
  ("norm1.weight", "norm1/weight", "copy"), ("norm1.bias", "norm1/bias", "copy"),
  ("norm2.weight", "norm2/weight", "copy"), ("norm2.bias", "norm2/bias", "copy"),
  ("attn.qkv.weight", "qkv/kernel", "linear:1"), ("attn.qkv.bias", "qkv/bias", "copy"),
  ("attn.proj.weight", "proj/kernel", "linear:1"), ("attn.proj.bias", "proj/bias", "copy"),
  ("mlp.fc1.weight", "fc1/kernel", "linear:1"), ("mlp.fc1.bias", "fc1/bias", "copy"),
  ("mlp.fc2.weight", "fc2/kernel", "linear:1"), ("mlp.fc2.bias", "fc2/bias", "copy"),
)
VISION_TOP_TABLE = (  # under the vision prefix
  ("patch_embed.proj.weight", "vision_model/patch_embed", "linear:1"),
  ("ln.weight", "vision_model/ln/weight", "copy"),
  ("ln.bias", "vision_model/ln/bias", "copy"),
)
RESAMPLER_TABLE = (  # under `{prefix}resampler_model.`
  ("mlp.weight", "resampler/mlp/kernel", "linear:1"),
  ("mlp.bias", "resampler/mlp/bias", "copy"),
  ("after_norm.weight", "resampler/after_norm/weight", "copy"),
) + tuple(
  (f"{mlp}.{i}.{w}", f"resampler/{mlp}/{part}/{p}", kind)
  for mlp in ("spatial_linear", "temporal_linear")
  for i, part in (("0", "fc1"), ("2", "fc2"), ("3", "ln"))
  for w, p, kind in ((("weight", "kernel", "linear:1"), ("bias", "bias", "copy")) if part != "ln"
                     else (("weight", "weight", "copy"), ("bias", "bias", "copy"))))
# LM embedding / final norm / untied head: hf.TOP_TABLE, hf.UNTIED_HEAD_TABLE.
VISION_PREFIXES = ("model.vision_model.", "vision_model.")  # transformers' save_pretrained, -PT release
RESAMPLER_PREFIX = "model.resampler_model."
IGNORED_WHEN_TIED = ("lm_head.weight",)


def expert_sets(cfg: VLConfig) -> Iterator[tuple[int, str, int]]:
  """(checkpoint expert number, expert-set module, index in that set) for all 2E experts."""
  n = cfg.moe_num_experts
  for e in range(2 * n):
    yield e, ("text_experts" if e < n else "vision_experts"), e % n


def detect_vision_prefix(names, prefixes=VISION_PREFIXES) -> str:
  """The prefix of the vision tower's tensors among `prefixes` (the first one if none is used)."""
  names = list(names)
  return next((p for p in prefixes if any(n.startswith(p + "blocks.") or n.startswith(p + "patch_embed.")
                                          for n in names)), prefixes[0])


def vl_name_map(cfg: VLConfig, vision_prefix: str = VISION_PREFIXES[0]) -> dict[str, list[Slot]]:
  """Every checkpoint tensor the model expects -> the slots it fills."""
  names: dict[str, list[Slot]] = {}

  def add(prefix, rows, base, index):
    for name, path, kind in rows:
      names.setdefault(prefix + name, []).append(Slot(f"{base}/{path}" if base else path, index, kind))

  kinds = cfg.layer_kinds
  for i, (g, r, j) in enumerate(layer_locations(kinds)):
    pre, base = f"model.layers.{i}.", f"groups/{g}/blocks/layers/{j}"
    add(pre, LAYER_TABLE + (DENSE_MLP_TABLE if kinds[i] == "dense" else
                            MOE_TABLE + (MOE_BIAS_TABLE if cfg.moe_use_correction_bias else ())
                            + (SHARED_TABLE if cfg.moe_num_shared_experts else ())), base, (r,))
    if kinds[i] == "moe":
      for e, which, k in expert_sets(cfg):
        add(pre, [(n.format(e=e), f"{which}/{part}", kind) for n, part, kind in EXPERT_TABLE], f"{base}/mlp", (r, k))
  for b in range(cfg.vision.depth):
    add(f"{vision_prefix}blocks.{b}.", VISION_BLOCK_TABLE, "vision_model/blocks", (b,))
  add(vision_prefix, VISION_TOP_TABLE, "", ())
  add(RESAMPLER_PREFIX, RESAMPLER_TABLE, "", ())
  add("", TOP_TABLE + (() if cfg.tie_word_embeddings else UNTIED_HEAD_TABLE), "", ())
  return names


# --------------------------------------------------------------------------------------------------
# Layout transforms over a name's slots. `targets` are the slots' per-slot parameter shapes.
def _rows(slots) -> bool:
  return slots[0].kind.startswith("row:")


def source_shape(slots, targets) -> tuple[int, ...]:
  if _rows(slots):
    return (len(slots),) + tuple(targets[0])
  return hf_shape(slots[0].kind, tuple(targets[0]))


def to_params(slots, x: np.ndarray, targets) -> list[np.ndarray]:
  if _rows(slots):
    return [x[int(s.kind.split(":")[1])] for s in slots]
  return [to_param(slots[0].kind, x, tuple(targets[0]))]


def from_params(slots, values: list[np.ndarray]) -> np.ndarray:
  """Inverse of `to_params` (for export): the checkpoint tensor from its slots' values."""
  if _rows(slots):
    order = sorted(range(len(slots)), key=lambda i: int(slots[i].kind.split(":")[1]))
    return np.stack([values[i] for i in order])
  return np.ascontiguousarray(from_param(slots[0].kind, values[0]))


def ignorable(cfg: VLConfig, name: str) -> bool:
  return cfg.tie_word_embeddings and name in IGNORED_WHEN_TIED


_LAYER_RE = re.compile(r"^(?:model|ernie)\.layers\.(\d+)\.")
_BLOCK_RE = re.compile(r"(?:^|\.)vision_model\.blocks\.(\d+)\.")


def describe_unexpected(cfg: VLConfig, name: str, vision_prefix: str | None = None) -> str:
  m = _LAYER_RE.match(name)
  if m and int(m.group(1)) >= cfg.num_hidden_layers:
    return f"layer {m.group(1)} but the config has num_hidden_layers={cfg.num_hidden_layers}"
  m2 = _BLOCK_RE.search(name)
  if m2 and int(m2.group(1)) >= cfg.vision.depth:
    return f"vision block {m2.group(1)} but vision_config.depth={cfg.vision.depth}"
  if m and ".experts." in name:
    return (f"an expert tensor; layer {m.group(1)} is {cfg.mlp_layer_types[int(m.group(1))]} and has "
            f"{2 * cfg.moe_num_experts} experts (text + vision)")
  if vision_prefix and "vision_model." in name and not name.startswith(vision_prefix):
    return f"a vision tensor outside '{vision_prefix}', where this checkpoint's vision tower is"
  return "not part of the model described by the config"


# --------------------------------------------------------------------------------------------------
# Export: a transformers config.json for a VLConfig.
def absent_bias(cfg: VLConfig) -> list[tuple[str, tuple[int, ...]]]:
  """Correction-bias tensors transformers always has but a model without the bias lacks (export
  writes zeros)."""
  if cfg.moe_use_correction_bias:
    return []
  return [(f"model.layers.{i}.mlp.moe_statics.e_score_correction_bias", (2, cfg.moe_num_experts))
          for i, kind in enumerate(cfg.layer_kinds) if kind == "moe"]


def reference_logits(model: Ernie45VLForConditionalGeneration, hf_dir, *, seed: int = 0):
  """(ours, transformers') fp32 logits on a two-row prompt with one image per row (a square and a
  non-square grid) between random text tokens: `convert.verify` for VL checkpoints."""
  import torch
  import transformers

  from ernie_jax.model.vl.lm_vl import forward

  cfg = model.config
  m = cfg.vision.spatial_merge_size
  grids = [(1, 2 * m, 2 * m), (1, 2 * m, 3 * m)]
  rs = np.random.RandomState(seed)
  text = np.setdiff1d(np.arange(min(3, cfg.vocab_size - 1), cfg.vocab_size), cfg.vision_token_ids)
  n_img = [h * w // (m * m) for _, h, w in grids]
  seq = max(n_img) + 10
  rows = []
  for n in n_img:
    r = rs.choice(text, seq - n - 2).tolist()
    rows.append(r[:3] + [cfg.image_start_token_id] + [cfg.image_token_id] * n + [cfg.image_end_token_id] + r[3:])
  ids = np.asarray(rows)
  pixels = rs.randn(sum(t * h * w for t, h, w in grids), cfg.vision.patch_dim).astype(np.float32)
  ours = np.asarray(forward(model, ids, pixel_values=pixels, image_grid_thw=grids).logits, np.float64)
  ref = transformers.Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(os.fspath(hf_dir), dtype=torch.float32)
  image = ids == cfg.image_token_id
  vision = np.isin(ids, [cfg.image_token_id, cfg.image_start_token_id, cfg.image_end_token_id])
  with torch.no_grad():
    out = ref.eval()(input_ids=torch.as_tensor(ids), mm_token_type_ids=torch.as_tensor(image.astype(np.int64)),
                     moe_mm_token_type_ids=torch.as_tensor(vision.astype(np.int64)),
                     pixel_values=torch.as_tensor(pixels), image_grid_thw=torch.as_tensor(grids))
  return ours, out.logits.float().numpy().astype(np.float64)


# --------------------------------------------------------------------------------------------------
def is_vl_config(d: dict[str, Any]) -> bool:
  """An ERNIE 4.5 VL config.json: a VL model_type, or (Paddle) a `vision_config`."""
  return d.get("model_type") in VL_MODEL_TYPES or isinstance(d.get("vision_config"), dict)


def is_vl_checkpoint(path) -> bool:
  """True for an ERNIE 4.5 VL checkpoint directory: HF / Paddle (from config.json) or Orbax (from
  the config stored with the weights)."""
  from ernie_jax.interop import orbax_io

  path = os.fspath(path)
  if orbax_io.is_orbax_checkpoint(path):
    try:
      return orbax_io.is_vl_info(orbax_io.read_info(path))
    except (CheckpointError, ValueError, OSError):
      return False
  cfg = os.path.join(path, "config.json")
  if not os.path.isfile(cfg):
    return False
  try:
    with open(cfg) as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError):
    return False
  return isinstance(d, dict) and is_vl_config(d)


def state_to_hf(model: Ernie45VLForConditionalGeneration) -> dict[str, np.ndarray]:
  """The model's parameters under their checkpoint names (inverse of loading), e.g. for
  `safetensors.numpy.save_file`. (`ernie_jax.interop.convert.export_hf` streams them to disk.)"""
  flat = {"/".join(str(k) for k in p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
  return {name: from_params(slots, [flat[s.path][s.index] for s in slots])
          for name, slots in vl_name_map(model.config).items()}
