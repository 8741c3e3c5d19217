"""Hugging Face ERNIE 4.5 checkpoint names <-> ernie_jax parameters, as a data table.

Every HF tensor maps to a *slot*: a parameter path in the model state plus an index into its
leading stacked axes (layer repeat, expert). Transforms are described by a kind:
  "copy"       same layout (norm weights, embedding)
  "linear:n"   torch Linear [out, in]: transpose to [in, out], then reshape so the first n axes of
               the parameter hold `in` (e.g. q_proj [nH*d, H] -> [H, nH, d] is linear:1,
               o_proj [H, nH*d] -> [nH, d, H] is linear:2)
  "squeeze"    reshape only ([1, E] correction bias -> [E])
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ernie_jax.config import ModelConfig
from ernie_jax.model.decoder import layer_locations

# (HF name under `model.layers.{l}.`, path under the decoder layer, kind); `{e}` = expert index.
LAYER_TABLE: tuple[tuple[str, str, str], ...] = (
  ("input_layernorm.weight", "input_norm/weight", "copy"),
  ("post_attention_layernorm.weight", "post_norm/weight", "copy"),
  ("self_attn.q_proj.weight", "attn/q", "linear:1"),
  ("self_attn.k_proj.weight", "attn/k", "linear:1"),
  ("self_attn.v_proj.weight", "attn/v", "linear:1"),
  ("self_attn.o_proj.weight", "attn/o", "linear:2"),
)
DENSE_MLP_TABLE = (
  ("mlp.gate_proj.weight", "mlp/gate", "linear:1"),
  ("mlp.up_proj.weight", "mlp/up", "linear:1"),
  ("mlp.down_proj.weight", "mlp/down", "linear:1"),
)
MOE_TABLE = (
  ("mlp.gate.weight", "mlp/router/kernel", "linear:1"),
  ("mlp.experts.{e}.gate_proj.weight", "mlp/experts/gate", "linear:1"),
  ("mlp.experts.{e}.up_proj.weight", "mlp/experts/up", "linear:1"),
  ("mlp.experts.{e}.down_proj.weight", "mlp/experts/down", "linear:1"),
)
MOE_BIAS_TABLE = (
  ("mlp.moe_statics.e_score_correction_bias", "mlp/router/correction_bias", "squeeze"),
)
SHARED_TABLE = (
  ("mlp.shared_experts.gate_proj.weight", "mlp/shared/gate", "linear:1"),
  ("mlp.shared_experts.up_proj.weight", "mlp/shared/up", "linear:1"),
  ("mlp.shared_experts.down_proj.weight", "mlp/shared/down", "linear:1"),
)
TOP_TABLE = (
  ("model.embed_tokens.weight", "embed", "copy"),
  ("model.norm.weight", "norm/weight", "copy"),
)
UNTIED_HEAD_TABLE = (("lm_head.weight", "lm_head", "linear:1"),)
MTP_TABLE = (  # `{d}` = MTP depth
  ("model.mtp_emb_norm.{d}.weight", "mtp/{d}/emb_norm/weight", "copy"),
  ("model.mtp_hidden_norm.{d}.weight", "mtp/{d}/hidden_norm/weight", "copy"),
  ("model.mtp_linear_proj.{d}.weight", "mtp/{d}/proj", "linear:1"),
)
# Present in some checkpoints, carry no information for us.
IGNORED_WHEN_TIED = ("lm_head.weight",)


@dataclass(frozen=True)
class Slot:
  path: str  # '/'-joined parameter path in nnx.state(model)
  index: tuple[int, ...]  # index into the leading stacked axes (repeat, expert)
  kind: str


def _layer_entries(cfg: ModelConfig, kind: str):
  rows = list(LAYER_TABLE)
  if kind == "moe":
    rows += MOE_TABLE + (MOE_BIAS_TABLE if cfg.moe_use_correction_bias else ())
    rows += SHARED_TABLE if cfg.moe_num_shared_experts else ()
  else:
    rows += DENSE_MLP_TABLE
  return rows


def _expand(cfg, prefix, rows, base_path, base_index):
  out = {}
  for hf, path, kind in rows:
    if "{e}" in hf:
      for e in range(cfg.moe_num_experts):
        out[prefix + hf.format(e=e)] = Slot(f"{base_path}/{path}", base_index + (e,), kind)
    else:
      out[prefix + hf] = Slot(f"{base_path}/{path}", base_index, kind)
  return out


def hf_name_map(cfg: ModelConfig) -> dict[str, Slot]:
  """Every HF tensor name the model expects, mapped to its slot."""
  names: dict[str, Slot] = {}
  kinds = cfg.layer_kinds
  for i, (g, r, j) in enumerate(layer_locations(kinds)):
    names.update(_expand(cfg, f"model.layers.{i}.", _layer_entries(cfg, kinds[i]),
                         f"groups/{g}/blocks/layers/{j}", (r,)))
  for hf, path, kind in TOP_TABLE + (() if cfg.tie_word_embeddings else UNTIED_HEAD_TABLE):
    names[hf] = Slot(path, (), kind)
  for d in range(cfg.num_mtp_layers):
    for hf, path, kind in MTP_TABLE:
      names[hf.format(d=d)] = Slot(path.format(d=d), (), kind)
    block_kind = "moe" if cfg.is_moe_layer(d) else "dense"
    names.update(_expand(cfg, f"model.mtp_block.{d}.", _layer_entries(cfg, block_kind),
                         f"mtp/{d}/block", ()))
  return names


def ignorable(cfg: ModelConfig, name: str) -> bool:
  return cfg.tie_word_embeddings and name in IGNORED_WHEN_TIED


# ------------------------------------------------------------------------------------------------
# Layout transforms. `target` is the parameter's per-slot shape (stacked axes removed).
def _linear_in_axes(kind: str) -> int:
  return int(kind.split(":")[1])


def hf_shape(kind: str, target: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape that fills a slot of shape `target`."""
  if kind == "copy":
    return target
  if kind == "squeeze":
    return (1,) + target
  n = _linear_in_axes(kind)
  return (int(np.prod(target[n:])), int(np.prod(target[:n])))


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def transposed(x: np.ndarray, tile: int = 128) -> np.ndarray:
  """x.T (2-D) as a new C-contiguous array. Copied in cache-sized tiles and as raw unsigned ints
  (ml_dtypes' bf16 goes through a slow generic copy loop): 2-3x numpy's plain transpose."""
  x = np.ascontiguousarray(x)
  u = _UINT.get(x.dtype.itemsize)
  src = x.view(u) if u is not None else x
  m, n = src.shape
  out = np.empty((n, m), src.dtype)
  for i in range(0, m, tile):
    out[:, i:i + tile] = src[i:i + tile].T
  return out.view(x.dtype) if u is not None else out


def to_param(kind: str, x: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
  if kind == "copy":
    return x
  if kind == "squeeze":
    return x.reshape(target)
  return transposed(x).reshape(target)


def from_param(kind: str, x: np.ndarray) -> np.ndarray:
  """Inverse of `to_param` (for export)."""
  if kind == "copy":
    return x
  if kind == "squeeze":
    return x.reshape((1,) + x.shape)
  n = _linear_in_axes(kind)
  return transposed(x.reshape(int(np.prod(x.shape[:n])), -1))


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def describe_unexpected(cfg: ModelConfig, name: str) -> str:
  m = _LAYER_RE.match(name)
  if m and int(m.group(1)) >= cfg.num_hidden_layers:
    return f"layer {m.group(1)} but the config has num_hidden_layers={cfg.num_hidden_layers}"
  if "mtp" in name and cfg.num_mtp_layers == 0:
    return "an MTP tensor but the config has num_nextn_predict_layers=0"
  if m and ".experts." in name and not cfg.is_moe_layer(int(m.group(1))):
    return f"an expert tensor but layer {m.group(1)} is dense under the config's MoE layer rule"
  return "not part of the model described by the config"


# ------------------------------------------------------------------------------------------------
# Export: a transformers config.json for a ModelConfig.
