"""Model configuration: one frozen dataclass, presets, and readers for HF / Paddle `config.json`.

The config is data. Every contradiction is reported as a `ConfigError` naming the field, at
construction time, so a bad config never reaches tracing or compilation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

DType = Literal["float32", "bfloat16", "float16"]
MoEImpl = Literal["auto", "ragged_dot", "blocked", "loop"]
Remat = Literal["none", "full", "save_dots", "save_qkv", "save_attn_out", "save_mlp", "save_qkv_attn_out"]

_DTYPES = ("float32", "bfloat16", "float16")
_MOE_IMPLS = ("auto", "ragged_dot", "blocked", "loop")
_REMATS = ("none", "full", "save_dots", "save_qkv", "save_attn_out", "save_mlp", "save_qkv_attn_out")
_TRANSPORTS = ("none", "all_to_all", "ragged_all_to_all", "allgather")
_FP8_RECIPES = ("none", "delayed", "current")


class ConfigError(ValueError):
  """A model config field is invalid or contradicts another field."""

  def __init__(self, field: str, message: str):
    super().__init__(f"config field '{field}': {message}")
    self.field = field


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of an ERNIE 4.5 text model (dense or MoE), plus the dtype policy.

  Field names follow the HF `config.json` where one exists. `moe_num_experts == 0` means dense.
  """

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  intermediate_size: int
  head_dim: int = 128  # independent of hidden_size (0.3B: 16 heads x 128 = 2048 != 1024)
  rope_theta: float = 500000.0
  rope_compression_ratio: float = 1.0  # positions are divided by it (1.0 in released models)
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 131072
  initializer_range: float = 0.02  # std of the normal init for matrices (training from scratch)
  # MoE (spec §1.3, §3). Layer i is MoE iff (i+1) % interval == 0 and start <= i <= end.
  moe_num_experts: int = 0
  moe_k: int = 0
  moe_intermediate_size: int = 0
  moe_num_shared_experts: int = 0  # one SwiGLU of width moe_intermediate_size * this, weight 1
  moe_layer_start_index: int = 0
  moe_layer_end_index: int = -1  # -1 means the last layer (normalised in __post_init__)
  moe_layer_interval: int = 1
  moe_norm_min: float = 1e-12
  moe_use_correction_bias: bool = True  # aux-loss-free bias, used for expert selection only
  moe_impl: MoEImpl = "auto"  # grouped matmul: ragged_dot (TPU/GPU), blocked (CPU), loop (oracle)
  # Expert parallelism over the mesh's `expert` axis (ernie_jax.parallel.expert_parallel):
  # "none" (GSPMD decides), "all_to_all" (capacity-padded, runs everywhere), "ragged_all_to_all"
  # (dropless; TPU/GPU only), "allgather" (all-gather tokens, reduce-scatter results; dropless).
  moe_transport: str = "none"
  # all_to_all capacity per expert and source device: ceil(factor * local_tokens * k / experts);
  # <= 0 means no token can ever be dropped (capacity = local tokens).
  moe_capacity_factor: float = 2.0
  # Multi-token prediction depth (num_nextn_predict_layers).
  num_mtp_layers: int = 0
  # Special tokens.
  pad_token_id: int = 0
  bos_token_id: int = 1
  eos_token_id: int = 2
  # Dtype policy: parameters are stored in param_dtype, matmuls run in dtype. The router weight and
  # correction bias are always fp32; norms and softmax compute in fp32.
  param_dtype: DType = "float32"
  dtype: DType = "float32"
  remat: Remat = "none"
  # FP8 matmuls (ernie_jax.model.fp8): "none", "delayed" (amax history) or "current" scaling, for
  # attention projections, MLPs, shared and routed experts. Router, norms, softmax, loss stay fp32.
  fp8_recipe: str = "none"
  fp8_history_len: int = 16
  fp8_margin: float = 0.0

  def __post_init__(self):
    if self.moe_layer_end_index == -1:
      object.__setattr__(self, "moe_layer_end_index", self.num_hidden_layers - 1)
    _validate(self)

  # ----------------------------------------------------------------------------------------------
  @property
  def is_moe(self) -> bool:
    return self.moe_num_experts > 0

  @property
  def is_vl(self) -> bool:
    """True for the VL config (vision encoder + second expert set)."""
    return False

  @property
  def num_groups(self) -> int:
    """Query heads per kv head (GQA group size)."""
    return self.num_attention_heads // self.num_key_value_heads

  def is_moe_layer(self, i: int) -> bool:
    return (
      self.is_moe
      and (i + 1) % self.moe_layer_interval == 0
      and self.moe_layer_start_index <= i <= self.moe_layer_end_index
    )

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    return tuple("moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers))

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ConfigError(unknown[0], f"unknown field (known: {', '.join(sorted(names))})")
    return cls(**d)

  # ----------------------------------------------------------------------------------------------
  # Presets (spec §1.2).
  @classmethod
  def ernie45_0p3b(cls, **kw) -> "ModelConfig":
    return cls(**{**dict(vocab_size=103424, hidden_size=1024, num_hidden_layers=18,
                         num_attention_heads=16, num_key_value_heads=2, intermediate_size=3072,
                         head_dim=128, tie_word_embeddings=True), **kw})

  @classmethod
  def ernie45_21b_a3b(cls, **kw) -> "ModelConfig":
    return cls(**{**dict(vocab_size=103424, hidden_size=2560, num_hidden_layers=28,
                         num_attention_heads=20, num_key_value_heads=4, intermediate_size=12288,
                         head_dim=128, tie_word_embeddings=True, moe_num_experts=64, moe_k=6,
                         moe_intermediate_size=1536, moe_num_shared_experts=2,
                         moe_layer_start_index=1, moe_layer_end_index=27), **kw})

  @classmethod
  def ernie45_300b_a47b(cls, **kw) -> "ModelConfig":
    return cls(**{**dict(vocab_size=103424, hidden_size=8192, num_hidden_layers=54,
                         num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672,
                         head_dim=128, tie_word_embeddings=False, moe_num_experts=64, moe_k=8,
                         moe_intermediate_size=3584, moe_num_shared_experts=0,
                         moe_layer_start_index=3, moe_layer_end_index=53), **kw})

  @classmethod
  def tiny_dense(cls, **kw) -> "ModelConfig":
    return cls(**{**dict(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, intermediate_size=128,
                         head_dim=24), **kw})

  @classmethod
  def tiny_moe(cls, **kw) -> "ModelConfig":
    return cls(**{**dict(vocab_size=256, hidden_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                         head_dim=16, moe_num_experts=8, moe_k=2, moe_intermediate_size=32,
                         moe_num_shared_experts=1, moe_layer_start_index=1), **kw})

  PRESETS = ("ernie45_0p3b", "ernie45_21b_a3b", "ernie45_300b_a47b", "tiny_dense", "tiny_moe")

  @classmethod
  def preset(cls, name: str, **kw) -> "ModelConfig":
    if name not in cls.PRESETS:
      raise ConfigError("preset", f"unknown preset {name!r}; choose one of {cls.PRESETS}")
    return getattr(cls, name)(**kw)

  # ----------------------------------------------------------------------------------------------
  @classmethod
  def from_hf(cls, cfg: dict[str, Any] | str | os.PathLike, **overrides) -> "ModelConfig":
    """From a transformers `config.json` (model_type `ernie4_5` or `ernie4_5_moe`), dict or path."""
    d = _read_json(cfg)
    model_type = d.get("model_type", "")
    if model_type not in ("ernie4_5", "ernie4_5_moe"):
      raise ConfigError("model_type", f"expected 'ernie4_5' or 'ernie4_5_moe', got {model_type!r}")
    if d.get("use_bias"):
      raise ConfigError("use_bias", "ERNIE 4.5 has no biases; use_bias=true is not supported")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ConfigError("rope_parameters.rope_type", f"only 'default' RoPE is supported, got {rope_type!r}")
    theta = rope.get("rope_theta", d.get("rope_theta", 500000.0))
    hidden, heads = _req(d, "hidden_size"), _req(d, "num_attention_heads")
    # Dense HF config defaults head_dim to 128; the MoE config has no such field and attention
    # falls back to hidden // heads.
    default_head_dim = 128 if model_type == "ernie4_5" else hidden // heads
    kw = dict(
      vocab_size=_req(d, "vocab_size"), hidden_size=hidden,
      num_hidden_layers=_req(d, "num_hidden_layers"), num_attention_heads=heads,
      num_key_value_heads=d.get("num_key_value_heads") or heads,
      intermediate_size=_req(d, "intermediate_size"),
      head_dim=d.get("head_dim") or default_head_dim, rope_theta=float(theta),
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
      max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
      pad_token_id=_tok(d.get("pad_token_id"), 0), bos_token_id=_tok(d.get("bos_token_id"), 1),
      eos_token_id=_tok(d.get("eos_token_id"), 2),
    )
    if model_type == "ernie4_5_moe":
      kw.update(
        moe_num_experts=int(d.get("moe_num_experts", 64)), moe_k=int(d.get("moe_k", 6)),
        moe_intermediate_size=int(d.get("moe_intermediate_size", 1536)),
        moe_num_shared_experts=int(d.get("moe_num_shared_experts", 2)),
        moe_layer_start_index=int(d.get("moe_layer_start_index", 1)),
        moe_layer_end_index=int(d.get("moe_layer_end_index", -1)),
        moe_layer_interval=int(d.get("moe_layer_interval", 1)),
        moe_norm_min=float(d.get("moe_norm_min", 1e-12)),
        num_mtp_layers=int(d.get("num_nextn_predict_layers", 0)),
      )
    return cls(**{**kw, **overrides})

  @classmethod
  def from_paddle(cls, cfg: dict[str, Any] | str | os.PathLike, **overrides) -> "ModelConfig":
    """From a Paddle / PaddleFormers `config.json`.

    Differences from HF: PaddleFormers defaults (rope_theta 10000, rms_norm_eps 1e-6) apply when a
    key is missing; MoE fields may be lists (per modality: text first), `moe_use_aux_free` names
    the correction bias and `num_nextn_predict_layers` the MTP depth.
    """
    d = _read_json(cfg)
    if d.get("use_bias"):
      raise ConfigError("use_bias", "ERNIE 4.5 has no biases; use_bias=true is not supported")
    hidden, heads = _req(d, "hidden_size"), _req(d, "num_attention_heads")
    kw = dict(
      vocab_size=_req(d, "vocab_size"), hidden_size=hidden,
      num_hidden_layers=_req(d, "num_hidden_layers"), num_attention_heads=heads,
      num_key_value_heads=d.get("num_key_value_heads") or heads,
      intermediate_size=_req(d, "intermediate_size"),
      head_dim=d.get("head_dim") or hidden // heads,
      rope_theta=float(d.get("rope_theta", 10000.0)),
      rope_compression_ratio=float(d.get("compression_ratio", 1.0)),
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      max_position_embeddings=int(d.get("max_position_embeddings", d.get("max_sequence_length", 131072))),
      pad_token_id=_tok(d.get("pad_token_id"), 0), bos_token_id=_tok(d.get("bos_token_id"), 1),
      eos_token_id=_tok(d.get("eos_token_id"), 2),
      num_mtp_layers=int(d.get("num_nextn_predict_layers", 0) or 0),
    )
    experts = _text(d.get("moe_num_experts", 0))
    if experts:
      kw.update(
        moe_num_experts=int(experts), moe_k=int(_text(d.get("moe_k", 2))),
        moe_intermediate_size=int(_text(d.get("moe_intermediate_size", 0)) or d["intermediate_size"]),
        moe_num_shared_experts=int(_text(d.get("moe_num_shared_experts", 0))),
        moe_layer_start_index=int(_text(d.get("moe_layer_start_index", 0))),
        moe_layer_end_index=int(_text(d.get("moe_layer_end_index", -1))),
        moe_layer_interval=int(_text(d.get("moe_layer_interval", 1))),
        moe_norm_min=float(d.get("moe_norm_min", 1e-12)),
        moe_use_correction_bias=bool(d.get("moe_use_aux_free", True)),
      )
    return cls(**{**kw, **overrides})


# --------------------------------------------------------------------------------------------------
def _read_json(cfg) -> dict[str, Any]:
  if isinstance(cfg, dict):
    return dict(cfg)
  path = os.fspath(cfg)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"config file not found: {path}") from None
  except json.JSONDecodeError as e:
    raise ConfigError("config.json", f"{path} is not valid JSON: {e}") from None


def _req(d: dict, key: str):
  if key not in d or d[key] is None:
    raise ConfigError(key, "missing from config.json")
  return d[key]


def _tok(v, default: int) -> int:
  if v is None:
    return default
  return int(v[0] if isinstance(v, (list, tuple)) else v)


def _text(v):
  """Paddle VL configs give per-modality lists; the text model uses the first entry."""
  return v[0] if isinstance(v, (list, tuple)) else v


def _validate(c: ModelConfig) -> None:
  def positive(name):
    v = getattr(c, name)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ConfigError(name, f"must be a positive integer, got {v!r}")

  for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "head_dim", "max_position_embeddings"):
    positive(name)
  if c.head_dim % 2:
    raise ConfigError("head_dim", f"must be even for rotary embeddings, got {c.head_dim}")
  if c.num_attention_heads % c.num_key_value_heads:
    raise ConfigError("num_key_value_heads",
                      f"num_attention_heads={c.num_attention_heads} is not divisible by "
                      f"num_key_value_heads={c.num_key_value_heads}")
  for name in ("rope_theta", "rope_compression_ratio", "rms_norm_eps"):
    if not getattr(c, name) > 0:
      raise ConfigError(name, f"must be > 0, got {getattr(c, name)!r}")
  for name, allowed in (("param_dtype", _DTYPES), ("dtype", _DTYPES), ("moe_impl", _MOE_IMPLS),
                        ("remat", _REMATS), ("moe_transport", _TRANSPORTS),
                        ("fp8_recipe", _FP8_RECIPES)):
    if getattr(c, name) not in allowed:
      raise ConfigError(name, f"must be one of {allowed}, got {getattr(c, name)!r}")
  for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
    v = getattr(c, name)
    if not 0 <= v < c.vocab_size:
      raise ConfigError(name, f"{v} is outside the vocabulary [0, {c.vocab_size})")
  if c.fp8_history_len < 1:
    raise ConfigError("fp8_history_len", f"must be >= 1, got {c.fp8_history_len}")
  if c.num_mtp_layers < 0:
    raise ConfigError("num_mtp_layers", f"must be >= 0, got {c.num_mtp_layers}")
  if c.moe_num_experts < 0:
    raise ConfigError("moe_num_experts", f"must be >= 0, got {c.moe_num_experts}")
  if not c.is_moe:
    return
  if not 1 <= c.moe_k <= c.moe_num_experts:
    raise ConfigError("moe_k", f"must be in [1, moe_num_experts={c.moe_num_experts}], got {c.moe_k}")
  positive("moe_intermediate_size")
  positive("moe_layer_interval")
  if c.moe_num_shared_experts < 0:
    raise ConfigError("moe_num_shared_experts", f"must be >= 0, got {c.moe_num_shared_experts}")
  last = c.num_hidden_layers - 1
  if not 0 <= c.moe_layer_start_index <= last:
    raise ConfigError("moe_layer_start_index",
                      f"{c.moe_layer_start_index} is outside the layers [0, {last}]")
  if not c.moe_layer_start_index <= c.moe_layer_end_index <= last:
    raise ConfigError("moe_layer_end_index",
                      f"{c.moe_layer_end_index} must be in [moe_layer_start_index="
                      f"{c.moe_layer_start_index}, {last}]")
  if "moe" not in c.layer_kinds:
    raise ConfigError("moe_layer_interval",
                      f"no layer in [{c.moe_layer_start_index}, {c.moe_layer_end_index}] satisfies "
                      f"(i+1) % {c.moe_layer_interval} == 0, so the model has no MoE layer")
  if not c.moe_norm_min > 0:
    raise ConfigError("moe_norm_min", f"must be > 0, got {c.moe_norm_min}")
