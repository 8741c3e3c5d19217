"""Hugging Face ERNIE 4.5 VL (`-PT`) checkpoints <-> ernie_jax VL parameters, as a data table (read
by `ernie_jax.from_pretrained` and the converters through the `hf/vl` layout of
`ernie_jax.interop.layouts`).

On-disk names (spec §5.3; what transformers' `save_pretrained` writes after reversing its in-memory
renames): `model.layers.*` (LM), `model.vision_model.*` (ViT; the original `-PT` release and
ERNIE's `tran_4_5t_vl.py` write it top level as `vision_model.*`: both are accepted),
`model.resampler_model.*` (resampler, `spatial_linear.{0,2,3}` = fc1 / fc2 / LayerNorm),
`lm_head.weight` when untied. MoE layers: routers `mlp.gate.weight` (text) and `mlp.gate.weight_1`
(vision) stored [H, E] (our layout, not transposed), `mlp.moe_statics.e_score_correction_bias`
[2, E] (row 0 text, row 1 vision), experts `mlp.experts.{0..E-1}` text and `{E..2E-1}` vision.

Each name maps to a `transforms.Read`: its slots with typed transforms (`Copy()`, `Linear(n)` as in
hf.py, `Row(r)`: row r of the [2, E] bias, read with `Fuse.ROWS`). `hf_config` writes the
transformers config.json of a VLConfig.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import numpy as np
from flax import nnx

from ernie_jax.interop.hf import DENSE_MLP_TABLE, LAYER_TABLE, SHARED_TABLE, TOP_TABLE, UNTIED_HEAD_TABLE
from ernie_jax.interop.transforms import Copy, Fuse, Linear, Read, Row, Slot
from ernie_jax.model.decoder import layer_locations
from ernie_jax.model.state import flat_state
from ernie_jax.config import VL_MODEL_TYPES, VLConfig

# Decoder-layer rows shared with the text model (LAYER_TABLE, DENSE_MLP_TABLE, SHARED_TABLE: hf.py).
MOE_TABLE = (
  ("mlp.gate.weight", "mlp/text_router/kernel", Copy()),
  ("mlp.gate.weight_1", "mlp/vision_router/kernel", Copy()),
)
MOE_BIAS_TABLE = (  # one tensor, two slots
  ("mlp.moe_statics.e_score_correction_bias", "mlp/text_router/correction_bias", Row(0)),
  ("mlp.moe_statics.e_score_correction_bias", "mlp/vision_router/correction_bias", Row(1)),
)
# `{e}` runs over 0..E-1 for the text experts and E..2E-1 for the vision experts (`expert_sets`)
EXPERT_TABLE = (
  ("mlp.experts.{e}.gate_proj.weight", "gate", Linear(1)),
  ("mlp.experts.{e}.up_proj.weight", "up", Linear(1)),
  ("mlp.experts.{e}.down_proj.weight", "down", Linear(1)),
)
VISION_BLOCK_TABLE = (  # under `{vision prefix}blocks.{b}.` -> vision_model/blocks/...
  ("norm1.weight", "norm1/weight", Copy()), ("norm1.bias", "norm1/bias", Copy()),
  ("norm2.weight", "norm2/weight", Copy()), ("norm2.bias", "norm2/bias", Copy()),
  ("attn.qkv.weight", "qkv/kernel", Linear(1)), ("attn.qkv.bias", "qkv/bias", Copy()),
  ("attn.proj.weight", "proj/kernel", Linear(1)), ("attn.proj.bias", "proj/bias", Copy()),
  ("mlp.fc1.weight", "fc1/kernel", Linear(1)), ("mlp.fc1.bias", "fc1/bias", Copy()),
  ("mlp.fc2.weight", "fc2/kernel", Linear(1)), ("mlp.fc2.bias", "fc2/bias", Copy()),
)
VISION_TOP_TABLE = (  # under the vision prefix
  ("patch_embed.proj.weight", "vision_model/patch_embed", Linear(1)),
  ("ln.weight", "vision_model/ln/weight", Copy()),
  ("ln.bias", "vision_model/ln/bias", Copy()),
)
RESAMPLER_TABLE = (  # under `{prefix}resampler_model.`
  ("mlp.weight", "resampler/mlp/kernel", Linear(1)),
  ("mlp.bias", "resampler/mlp/bias", Copy()),
  ("after_norm.weight", "resampler/after_norm/weight", Copy()),
) + tuple(
  (f"{mlp}.{i}.{w}", f"resampler/{mlp}/{part}/{p}", t)
  for mlp in ("spatial_linear", "temporal_linear")
  for i, part in (("0", "fc1"), ("2", "fc2"), ("3", "ln"))
  for w, p, t in ((("weight", "kernel", Linear(1)), ("bias", "bias", Copy())) if part != "ln"
                  else (("weight", "weight", Copy()), ("bias", "bias", Copy()))))
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


def vl_name_map(cfg: VLConfig, vision_prefix: str = VISION_PREFIXES[0]) -> dict[str, Read]:
  """Every checkpoint tensor the model expects -> its read (the slots it fills)."""
  slots: dict[str, list[Slot]] = {}

  def add(prefix, rows, base, index):
    for name, path, t in rows:
      slots.setdefault(prefix + name, []).append(Slot(f"{base}/{path}" if base else path, index, t))

  kinds = cfg.layer_kinds
  for i, (g, r, j) in enumerate(layer_locations(kinds)):
    pre, base = f"model.layers.{i}.", f"groups/{g}/blocks/layers/{j}"
    add(pre, LAYER_TABLE + (DENSE_MLP_TABLE if kinds[i] == "dense" else
                            MOE_TABLE + (MOE_BIAS_TABLE if cfg.moe_use_correction_bias else ())
                            + (SHARED_TABLE if cfg.moe_num_shared_experts else ())), base, (r,))
    if kinds[i] == "moe":
      for e, which, k in expert_sets(cfg):
        add(pre, [(n.format(e=e), f"{which}/{part}", t) for n, part, t in EXPERT_TABLE], f"{base}/mlp", (r, k))
  for b in range(cfg.vision.depth):
    add(f"{vision_prefix}blocks.{b}.", VISION_BLOCK_TABLE, "vision_model/blocks", (b,))
  add(vision_prefix, VISION_TOP_TABLE, "", ())
  add(RESAMPLER_PREFIX, RESAMPLER_TABLE, "", ())
  add("", TOP_TABLE + (() if cfg.tie_word_embeddings else UNTIED_HEAD_TABLE), "", ())
  return {n: Read(n, tuple(s), Fuse.ROWS if isinstance(s[0].transform, Row) else Fuse.NONE)
          for n, s in slots.items()}


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


def absent_bias(cfg: VLConfig) -> list[tuple[str, tuple[int, ...]]]:
  """Correction-bias tensors transformers always has but a model without the bias lacks (export
  writes zeros)."""
  if cfg.moe_use_correction_bias:
    return []
  return [(f"model.layers.{i}.mlp.moe_statics.e_score_correction_bias", (2, cfg.moe_num_experts))
          for i, kind in enumerate(cfg.layer_kinds) if kind == "moe"]


def is_vl_config(d: dict[str, Any]) -> bool:
  """An ERNIE 4.5 VL config.json: a VL model_type, or (Paddle) a `vision_config`."""
  return d.get("model_type") in VL_MODEL_TYPES or isinstance(d.get("vision_config"), dict)


def state_to_hf(model) -> dict[str, np.ndarray]:
  """The VL model's parameters under their checkpoint names (inverse of loading), e.g. for
  `safetensors.numpy.save_file` in tests. (`ernie_jax.interop.convert.export_hf` streams them to disk.)"""
  flat = {p: np.asarray(v.get_value()) for p, v in flat_state(nnx.state(model)).items()}
  return {name: read.from_params([flat[s.path][s.index] for s in read.slots])
          for name, read in vl_name_map(model.config).items()}
