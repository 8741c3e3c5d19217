"""Hugging Face ERNIE 4.5 checkpoint names <-> ernie_jax parameters, as a data table.

Every HF tensor maps to a *slot* (`transforms.Slot`): a parameter path in the model state plus an
index into its leading stacked axes (layer repeat, expert), with a typed transform
(`ernie_jax.interop.transforms`): `Copy()` (norm weights, embedding), `Linear(n)` (torch Linear
[out, in] -> [in, out], reshaped so the first n parameter axes hold `in`: q_proj is Linear(1),
o_proj Linear(2)), `Squeeze()` ([1, E] correction bias -> [E]). `hf_config` writes the
transformers config.json of a ModelConfig.
"""

from __future__ import annotations

import re

from ernie_jax.config import ModelConfig
from ernie_jax.interop.transforms import Copy, Linear, Read, Slot, Squeeze
from ernie_jax.model.decoder import layer_locations

# (HF name under `model.layers.{l}.`, path under the decoder layer, transform); `{e}` = expert index.
LAYER_TABLE = (
  ("input_layernorm.weight", "input_norm/weight", Copy()),
  ("post_attention_layernorm.weight", "post_norm/weight", Copy()),
  ("self_attn.q_proj.weight", "attn/q", Linear(1)),
  ("self_attn.k_proj.weight", "attn/k", Linear(1)),
  ("self_attn.v_proj.weight", "attn/v", Linear(1)),
  ("self_attn.o_proj.weight", "attn/o", Linear(2)),
)
DENSE_MLP_TABLE = (
  ("mlp.gate_proj.weight", "mlp/gate", Linear(1)),
  ("mlp.up_proj.weight", "mlp/up", Linear(1)),
  ("mlp.down_proj.weight", "mlp/down", Linear(1)),
)
MOE_TABLE = (
  ("mlp.gate.weight", "mlp/router/kernel", Linear(1)),
  ("mlp.experts.{e}.gate_proj.weight", "mlp/experts/gate", Linear(1)),
  ("mlp.experts.{e}.up_proj.weight", "mlp/experts/up", Linear(1)),
  ("mlp.experts.{e}.down_proj.weight", "mlp/experts/down", Linear(1)),
)
MOE_BIAS_TABLE = (
  ("mlp.moe_statics.e_score_correction_bias", "mlp/router/correction_bias", Squeeze()),
)
SHARED_TABLE = (
  ("mlp.shared_experts.gate_proj.weight", "mlp/shared/gate", Linear(1)),
  ("mlp.shared_experts.up_proj.weight", "mlp/shared/up", Linear(1)),
  ("mlp.shared_experts.down_proj.weight", "mlp/shared/down", Linear(1)),
)
TOP_TABLE = (
  ("model.embed_tokens.weight", "embed", Copy()),
  ("model.norm.weight", "norm/weight", Copy()),
)
UNTIED_HEAD_TABLE = (("lm_head.weight", "lm_head", Linear(1)),)
MTP_TABLE = (  # `{d}` = MTP depth
  ("model.mtp_emb_norm.{d}.weight", "mtp/{d}/emb_norm/weight", Copy()),
  ("model.mtp_hidden_norm.{d}.weight", "mtp/{d}/hidden_norm/weight", Copy()),
  ("model.mtp_linear_proj.{d}.weight", "mtp/{d}/proj", Linear(1)),
)
# Present in some checkpoints, carry no information for us.
IGNORED_WHEN_TIED = ("lm_head.weight",)


def _layer_entries(cfg: ModelConfig, kind: str):
  rows = list(LAYER_TABLE)
  if kind == "moe":
    rows += MOE_TABLE + (MOE_BIAS_TABLE if cfg.moe_use_correction_bias else ())
    rows += SHARED_TABLE if cfg.moe_num_shared_experts else ()
  else:
    rows += DENSE_MLP_TABLE
  return rows


def _expand(cfg, prefix, rows, base_path, base_index) -> dict[str, Read]:
  out = {}
  for hf, path, t in rows:
    if "{e}" in hf:
      for e in range(cfg.moe_num_experts):
        name = prefix + hf.format(e=e)
        out[name] = Read(name, (Slot(f"{base_path}/{path}", base_index + (e,), t),))
    else:
      out[prefix + hf] = Read(prefix + hf, (Slot(f"{base_path}/{path}", base_index, t),))
  return out


def hf_name_map(cfg: ModelConfig) -> dict[str, Read]:
  """Every HF tensor name the model expects, mapped to its read (one slot each)."""
  names: dict[str, Read] = {}
  kinds = cfg.layer_kinds
  for i, (g, r, j) in enumerate(layer_locations(kinds)):
    names.update(_expand(cfg, f"model.layers.{i}.", _layer_entries(cfg, kinds[i]),
                         f"groups/{g}/blocks/layers/{j}", (r,)))
  for hf, path, t in TOP_TABLE + (() if cfg.tie_word_embeddings else UNTIED_HEAD_TABLE):
    names[hf] = Read(hf, (Slot(path, (), t),))
  for d in range(cfg.num_mtp_layers):
    for hf, path, t in MTP_TABLE:
      names[hf.format(d=d)] = Read(hf.format(d=d), (Slot(path.format(d=d), (), t),))
    block_kind = "moe" if cfg.is_moe_layer(d) else "dense"
    names.update(_expand(cfg, f"model.mtp_block.{d}.", _layer_entries(cfg, block_kind),
                         f"mtp/{d}/block", ()))
  return names


def ignorable(cfg: ModelConfig, name: str) -> bool:
  return cfg.tie_word_embeddings and name in IGNORED_WHEN_TIED


def absent_bias(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
  """Tensors transformers always has but the model may lack (the correction bias): export writes zeros."""
  if not cfg.is_moe or cfg.moe_use_correction_bias:
    return []
  return [(f"model.layers.{i}.mlp.moe_statics.e_score_correction_bias", (1, cfg.moe_num_experts))
          for i, kind in enumerate(cfg.layer_kinds) if kind == "moe"]


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
