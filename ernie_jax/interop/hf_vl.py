"""Hugging Face ERNIE 4.5 VL (`-PT`) checkpoints <-> ernie_jax VL parameters, as a data table.

On-disk names (spec §5.3; what transformers' `save_pretrained` writes after reversing its in-memory
renames): `model.layers.*` (LM), `model.vision_model.*` (ViT), `model.resampler_model.*`
(resampler, `spatial_linear.{0,2,3}` = fc1 / fc2 / LayerNorm), `lm_head.weight` when untied.
MoE layers: routers `mlp.gate.weight` (text) and `mlp.gate.weight_1` (vision) stored [H, E] (our
layout, not transposed), `mlp.moe_statics.e_score_correction_bias` [2, E] (row 0 text, row 1
vision), experts `mlp.experts.{0..E-1}` text and `{E..2E-1}` vision.

Each name maps to one or more slots (parameter path, index into its stacked axes, kind):
  "copy"      same layout;  "linear:n"  torch Linear [out, in] -> [in, out] reshaped (see hf.py);
  "row:r"     row r of a [2, E] tensor.
Names, shapes and dtypes are checked against the config from the headers before any data is read.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.interop.hf import DENSE_MLP_TABLE, LAYER_TABLE, SHARED_TABLE, Slot, hf_shape, to_param
from ernie_jax.interop.safetensors_io import CheckpointError, SafetensorsReader
from ernie_jax.model.decoder import layer_locations
from ernie_jax.model.vl.config_vl import VL_MODEL_TYPES, VLConfig
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
# `{e}` runs over 0..E-1 for the text experts and E..2E-1 for the vision experts
EXPERT_TABLE = (
  ("mlp.experts.{e}.gate_proj.weight", "gate", "linear:1"),
  ("mlp.experts.{e}.up_proj.weight", "up", "linear:1"),
  ("mlp.experts.{e}.down_proj.weight", "down", "linear:1"),
)
VISION_BLOCK_TABLE = (  # under `model.vision_model.blocks.{b}.` -> vision_model/blocks/...
  ("norm1.weight", "norm1/weight", "copy"), ("norm1.bias", "norm1/bias", "copy"),
  ("norm2.weight", "norm2/weight", "copy"), ("norm2.bias", "norm2/bias", "copy"),
  ("attn.qkv.weight", "qkv/kernel", "linear:1"), ("attn.qkv.bias", "qkv/bias", "copy"),
  ("attn.proj.weight", "proj/kernel", "linear:1"), ("attn.proj.bias", "proj/bias", "copy"),
  ("mlp.fc1.weight", "fc1/kernel", "linear:1"), ("mlp.fc1.bias", "fc1/bias", "copy"),
  ("mlp.fc2.weight", "fc2/kernel", "linear:1"), ("mlp.fc2.bias", "fc2/bias", "copy"),
)
TOP_TABLE = (
  ("model.embed_tokens.weight", "embed", "copy"),
  ("model.norm.weight", "norm/weight", "copy"),
  ("model.vision_model.patch_embed.proj.weight", "vision_model/patch_embed", "linear:1"),
  ("model.vision_model.ln.weight", "vision_model/ln/weight", "copy"),
  ("model.vision_model.ln.bias", "vision_model/ln/bias", "copy"),
  ("model.resampler_model.mlp.weight", "resampler/mlp/kernel", "linear:1"),
  ("model.resampler_model.mlp.bias", "resampler/mlp/bias", "copy"),
  ("model.resampler_model.after_norm.weight", "resampler/after_norm/weight", "copy"),
) + tuple(
  (f"model.resampler_model.{mlp}.{i}.{w}", f"resampler/{mlp}/{part}/{p}", kind)
  for mlp in ("spatial_linear", "temporal_linear")
  for i, part in (("0", "fc1"), ("2", "fc2"), ("3", "ln"))
  for w, p, kind in ((("weight", "kernel", "linear:1"), ("bias", "bias", "copy")) if part != "ln"
                     else (("weight", "weight", "copy"), ("bias", "bias", "copy"))))
UNTIED_HEAD_TABLE = (("lm_head.weight", "lm_head", "linear:1"),)
IGNORED_WHEN_TIED = ("lm_head.weight",)


def vl_name_map(cfg: VLConfig) -> dict[str, list[Slot]]:
  """Every checkpoint tensor the model expects -> the slots it fills."""
  names: dict[str, list[Slot]] = {}

  def add(name, path, index, kind):
    names.setdefault(name, []).append(Slot(path, index, kind))

  kinds = cfg.layer_kinds
  for i, (g, r, j) in enumerate(layer_locations(kinds)):
    pre, base = f"model.layers.{i}.", f"groups/{g}/blocks/layers/{j}"
    rows = LAYER_TABLE + (DENSE_MLP_TABLE if kinds[i] == "dense" else
                          MOE_TABLE + (MOE_BIAS_TABLE if cfg.moe_use_correction_bias else ())
                          + (SHARED_TABLE if cfg.moe_num_shared_experts else ()))
    for name, path, kind in rows:
      add(pre + name, f"{base}/{path}", (r,), kind)
    if kinds[i] == "moe":
      e_count = cfg.moe_num_experts
      for name, part, kind in EXPERT_TABLE:
        for e in range(2 * e_count):
          which = "text_experts" if e < e_count else "vision_experts"
          add(pre + name.format(e=e), f"{base}/mlp/{which}/{part}", (r, e % e_count), kind)
  for b in range(cfg.vision.depth):
    for name, path, kind in VISION_BLOCK_TABLE:
      add(f"model.vision_model.blocks.{b}.{name}", f"vision_model/blocks/{path}", (b,), kind)
  for name, path, kind in TOP_TABLE + (() if cfg.tie_word_embeddings else UNTIED_HEAD_TABLE):
    add(name, path, (), kind)
  return names


def source_shape(kind: str, target: tuple[int, ...]) -> tuple[int, ...]:
  if kind.startswith("row:"):
    return (2,) + target
  return hf_shape(kind, target)


def slot_value(kind: str, x: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
  if kind.startswith("row:"):
    return x[int(kind.split(":")[1])]
  return to_param(kind, x, target)


# --------------------------------------------------------------------------------------------------
def is_vl_checkpoint(path) -> bool:
  """True for a directory whose config.json is an ERNIE 4.5 VL config."""
  cfg = os.path.join(os.fspath(path), "config.json")
  if not os.path.isfile(cfg):
    return False
  try:
    with open(cfg) as f:
      return json.load(f).get("model_type") in VL_MODEL_TYPES
  except (OSError, json.JSONDecodeError):
    return False


def _flat(state) -> dict[str, Any]:
  return {"/".join(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}


def check_checkpoint(reader: SafetensorsReader, cfg: VLConfig, shapes: dict[str, tuple[int, ...]]):
  """Names, shapes and dtypes from the headers against the config; raises CheckpointError naming
  the first offending tensor. Returns the name map."""
  names = vl_name_map(cfg)
  where = os.path.dirname(next(iter(reader.tensors.values())).file) if reader.tensors else "?"
  present = set(reader.keys())
  unexpected = sorted(n for n in present - set(names) if not (cfg.tie_word_embeddings and n in IGNORED_WHEN_TIED))
  if unexpected:
    n = unexpected[0]
    raise CheckpointError(f"unexpected tensor '{n}' in {where}: {_describe(cfg, n)}"
                          + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
  missing = sorted(set(names) - present)
  if missing:
    raise CheckpointError(f"missing tensor '{missing[0]}' in {where}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  for name, slots in names.items():
    info, slot = reader.tensors[name], slots[0]
    want = source_shape(slot.kind, tuple(shapes[slot.path][len(slot.index):]))
    if info.shape != want:
      raise CheckpointError(f"tensor '{name}' has shape {list(info.shape)}, expected {list(want)} for "
                            f"the config ({info.file})")
    if info.dtype not in ("F32", "BF16", "F16"):
      raise CheckpointError(f"tensor '{name}' has dtype {info.dtype}; expected F32, BF16 or F16")
  return names


def _describe(cfg: VLConfig, name: str) -> str:
  import re

  m = re.match(r"^model\.layers\.(\d+)\.", name)
  if m and int(m.group(1)) >= cfg.num_hidden_layers:
    return f"layer {m.group(1)} but the config has num_hidden_layers={cfg.num_hidden_layers}"
  m2 = re.match(r"^model\.vision_model\.blocks\.(\d+)\.", name)
  if m2 and int(m2.group(1)) >= cfg.vision.depth:
    return f"vision block {m2.group(1)} but vision_config.depth={cfg.vision.depth}"
  if m and ".experts." in name:
    return (f"an expert tensor; layer {m.group(1)} is {cfg.mlp_layer_types[int(m.group(1))]} and has "
            f"{2 * cfg.moe_num_experts} experts (text + vision)")
  return "not part of the model described by the config"


def iter_params(reader: SafetensorsReader, cfg: VLConfig, abstract_flat: dict[str, Any]):
  """Yield (parameter path, host array in the parameter's dtype), one parameter at a time."""
  shapes = {p: tuple(v.shape) for p, v in abstract_flat.items()}
  names = check_checkpoint(reader, cfg, shapes)
  by_path: dict[str, list[tuple[str, Slot]]] = {}
  for name, slots in names.items():
    for slot in slots:
      by_path.setdefault(slot.path, []).append((name, slot))
  for path, var in abstract_flat.items():
    entries = by_path.get(path)
    if not entries:
      raise CheckpointError(f"no checkpoint tensor fills parameter '{path}'")
    dtype = np.dtype(var.dtype)
    out = np.empty(var.shape, dtype)
    filled = np.zeros(var.shape[:len(entries[0][1].index)], bool)
    for name, slot in entries:
      target = tuple(var.shape[len(slot.index):])
      out[slot.index] = slot_value(slot.kind, reader.get(name), target).astype(dtype)
      filled[slot.index] = True
    if not filled.all():
      raise CheckpointError(f"parameter '{path}' is only partly filled by the checkpoint")
    yield path, out


def load(path, *, dtype: str | None = None, param_dtype: str | None = None, config: VLConfig | None = None,
         mesh=None, rules=None, **config_overrides) -> Ernie45VLForConditionalGeneration:
  """Build an `Ernie45VLForConditionalGeneration` from an HF VL checkpoint directory (single or
  sharded safetensors). mesh / rules: place each parameter straight into its sharded layout."""
  path = os.fspath(path)
  overrides = dict(config_overrides)
  if dtype is not None:
    overrides["dtype"] = dtype
  if param_dtype is not None:
    overrides["param_dtype"] = param_dtype
  cfg = config.replace(**overrides) if config is not None else VLConfig.from_hf(path, **overrides)
  model = nnx.eval_shape(lambda: Ernie45VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(model)
  shardings = None
  if mesh is not None:
    from ernie_jax.parallel import DEFAULT_RULES, state_shardings

    shardings = _flat(state_shardings(abstract, mesh, rules or DEFAULT_RULES))
  reader = SafetensorsReader(path)
  try:
    arrays = {}
    for p, host in iter_params(reader, cfg, _flat(abstract)):
      sh = None if shardings is None else shardings[p].get_value()
      arrays[p] = jnp.asarray(host) if sh is None else jax.make_array_from_callback(
        host.shape, sh, lambda idx, h=host: h[idx])
  finally:
    reader.close()
  flat = nnx.to_flat_state(abstract)
  for key, var in flat:
    var.set_value(arrays["/".join(str(k) for k in key)])
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# --------------------------------------------------------------------------------------------------
def state_to_hf(model: Ernie45VLForConditionalGeneration) -> dict[str, np.ndarray]:
  """The model's parameters under their checkpoint names (inverse of `iter_params`), e.g. for
  `safetensors.numpy.save_file`."""
  from ernie_jax.interop.hf import from_param

  flat = {p: np.asarray(v.get_value()) for p, v in _flat(nnx.state(model)).items()}
  out: dict[str, np.ndarray] = {}
  for name, slots in vl_name_map(model.config).items():
    slot = slots[0]
    if slot.kind.startswith("row:"):
      out[name] = np.stack([flat[s.path][s.index] for s in sorted(slots, key=lambda s: s.kind)])
    else:
      out[name] = np.ascontiguousarray(from_param(slot.kind, flat[slot.path][slot.index]))
  return out
