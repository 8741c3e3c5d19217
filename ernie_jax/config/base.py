"""What every ERNIE 4.5 model config shares: `ConfigError`, the allowed values (derived once from
the Literal types), the decoder fields common to the text and the VL config (`DecoderConfig`), their
validation, and small `config.json` helpers.

A config is data. Every contradiction is reported as a `ConfigError` naming the field, at
construction time, so a bad config never reaches tracing or compilation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal, get_args

DType = Literal["float32", "bfloat16", "float16"]
MoEImpl = Literal["auto", "ragged_dot", "blocked", "loop"]
AttentionImpl = Literal["auto", "xla", "splash", "cudnn"]
Remat = Literal["none", "full", "save_dots", "save_dots_experts", "save_qkv", "save_attn_out", "save_mlp", "save_qkv_attn_out"]
Transport = Literal["none", "all_to_all", "ragged_all_to_all", "allgather"]
Fp8RecipeName = Literal["none", "delayed", "current"]

DTYPES: tuple[str, ...] = get_args(DType)
MOE_IMPLS: tuple[str, ...] = get_args(MoEImpl)
ATTENTION_IMPLS: tuple[str, ...] = get_args(AttentionImpl)
CUDNN_DTYPES = ("bfloat16", "float16")  # what cuDNN flash attention takes
REMATS: tuple[str, ...] = get_args(Remat)
TRANSPORTS: tuple[str, ...] = get_args(Transport)
FP8_RECIPES: tuple[str, ...] = get_args(Fp8RecipeName)


class ConfigError(ValueError):
  """A model config field is invalid or contradicts another field."""

  def __init__(self, field: str, message: str):
    super().__init__(f"config field '{field}': {message}")
    self.field = field


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """The decoder fields of both model families (`ModelConfig`, `VLConfig`): sizes, RoPE base, norm,
  MoE routing, special tokens and the dtype / remat policy. Field names follow the HF `config.json`
  where one exists."""

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  intermediate_size: int
  head_dim: int = 128  # independent of hidden_size (0.3B: 16 heads x 128 = 2048 != 1024)
  rope_theta: float = 500000.0
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 131072
  initializer_range: float = 0.02  # std of the normal init for matrices (training from scratch)
  # MoE (spec §1.3, §3).
  moe_num_experts: int = 0
  moe_k: int = 0
  moe_intermediate_size: int = 0
  moe_num_shared_experts: int = 0  # one SwiGLU of width moe_intermediate_size * this, weight 1
  moe_norm_min: float = 1e-12
  moe_use_correction_bias: bool = True  # aux-loss-free bias, used for expert selection only
  moe_impl: MoEImpl = "auto"  # grouped matmul: ragged_dot (TPU/GPU), blocked (CPU), loop (oracle)
  # Expert parallelism over the mesh's `expert` axis (ernie_jax.model.moe.expert_parallel):
  # "none" (GSPMD decides), "all_to_all" (capacity-padded, runs everywhere), "ragged_all_to_all"
  # (dropless; TPU/GPU only), "allgather" (all-gather tokens, reduce-scatter results; dropless).
  moe_transport: Transport = "none"
  # all_to_all capacity per expert and source device: ceil(factor * local_tokens * k / experts);
  # <= 0 means no token can ever be dropped (capacity = local tokens).
  moe_capacity_factor: float = 2.0
  # Special tokens.
  pad_token_id: int = 0
  bos_token_id: int = 1
  eos_token_id: int = 2
  # Dtype policy: parameters are stored in param_dtype, matmuls run in dtype. The router weight and
  # correction bias are always fp32; norms and softmax compute in fp32.
  param_dtype: DType = "float32"
  dtype: DType = "float32"
  remat: Remat = "none"
  # Training / scoring attention (ernie_jax.model.attention_kernels): "xla" (query blocks in JAX, every
  # backend), "splash" (TPU Pallas kernel, segment ids in the kernel), "cudnn" (NVIDIA GPUs, bf16/fp16),
  # "auto" (splash on TPU, xla elsewhere). Generation with a KV cache always uses the XLA form.
  attention_impl: AttentionImpl = "auto"
  # Layers per iteration of the scan over each group of repeated layers: 1 (default) compiles one layer body
  # whatever the depth; more trades compile time for speed where a loop iteration costs (XLA:CPU: ~15% of a
  # 0.3B layer, benchmarks/RESULTS.md). A value >= the number of layers unrolls them all.
  scan_unroll: int = 1

  @property
  def is_vl(self) -> bool:
    """True for the VL config (vision encoder + a second, vision expert set)."""
    return False

  @property
  def num_groups(self) -> int:
    """Query heads per kv head (GQA group size)."""
    return self.num_attention_heads // self.num_key_value_heads

  def replace(self, **changes: Any):
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def validate_decoder(c: DecoderConfig) -> None:
  """The checks of the shared fields."""
  for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "head_dim", "max_position_embeddings"):
    positive(c, name)
  if c.head_dim % 2:
    raise ConfigError("head_dim", f"must be even for rotary embeddings, got {c.head_dim}")
  if c.num_attention_heads % c.num_key_value_heads:
    raise ConfigError("num_key_value_heads",
                      f"num_attention_heads={c.num_attention_heads} is not divisible by "
                      f"num_key_value_heads={c.num_key_value_heads}")
  positive(c, "scan_unroll")
  for name in ("rope_theta", "rms_norm_eps"):
    if not getattr(c, name) > 0:
      raise ConfigError(name, f"must be > 0, got {getattr(c, name)!r}")
  for name, allowed in (("param_dtype", DTYPES), ("dtype", DTYPES), ("moe_impl", MOE_IMPLS),
                        ("remat", REMATS), ("moe_transport", TRANSPORTS), ("attention_impl", ATTENTION_IMPLS)):
    if getattr(c, name) not in allowed:
      raise ConfigError(name, f"must be one of {allowed}, got {getattr(c, name)!r}")
  if c.attention_impl == "cudnn" and c.dtype not in CUDNN_DTYPES:
    raise ConfigError("attention_impl", f"'cudnn' computes in {' or '.join(CUDNN_DTYPES)}, but dtype is "
                                        f"{c.dtype!r}: set dtype='bfloat16' or attention_impl='xla'")
  for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
    v = getattr(c, name)
    if not 0 <= v < c.vocab_size:
      raise ConfigError(name, f"{v} is outside the vocabulary [0, {c.vocab_size})")


def validate_moe_routing(c: DecoderConfig) -> None:
  """The MoE checks both families share (for a config with MoE layers)."""
  if not 1 <= c.moe_k <= c.moe_num_experts:
    raise ConfigError("moe_k", f"must be in [1, moe_num_experts={c.moe_num_experts}], got {c.moe_k}")
  if c.moe_num_shared_experts < 0:
    raise ConfigError("moe_num_shared_experts", f"must be >= 0, got {c.moe_num_shared_experts}")
  if not c.moe_norm_min > 0:
    raise ConfigError("moe_norm_min", f"must be > 0, got {c.moe_norm_min}")


def positive(c, name: str, prefix: str = "") -> None:
  v = getattr(c, name)
  if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
    raise ConfigError(prefix + name, f"must be a positive integer, got {v!r}")


# --------------------------------------------------------------------------------------------------
def read_json(cfg) -> dict[str, Any]:
  """A config.json as a dict: given as a dict, a file path or a checkpoint directory."""
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


def req(d: dict, key: str, prefix: str = ""):
  if key not in d or d[key] is None:
    raise ConfigError(f"{prefix}{key}", "missing from config.json")
  return d[key]


def tok(v, default: int) -> int:
  if v is None:
    return default
  return int(v[0] if isinstance(v, (list, tuple)) else v)
