"""The text model config: `ModelConfig` (dense or MoE, optional MTP and FP8) and its presets. The
decoder fields it shares with the VL config, and their validation, are in `base.py`; `config.json`
is read and written in `ernie_jax.interop.hf_config` / `paddle_config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ernie_jax.config.base import (FP8_RECIPES, ConfigError, DecoderConfig, Fp8RecipeName, positive,
                                   validate_decoder, validate_moe_routing)


@dataclasses.dataclass(frozen=True)
class ModelConfig(DecoderConfig):
  """Architecture of an ERNIE 4.5 text model (dense or MoE), plus the dtype policy.

  Field names follow the HF `config.json` where one exists. `moe_num_experts == 0` means dense.
  Layer i is MoE iff (i+1) % moe_layer_interval == 0 and start <= i <= end.
  """

  rope_compression_ratio: float = 1.0  # positions are divided by it (1.0 in released models)
  moe_layer_start_index: int = 0
  moe_layer_end_index: int = -1  # -1 means the last layer (normalised in __post_init__)
  moe_layer_interval: int = 1
  # Multi-token prediction depth (num_nextn_predict_layers).
  num_mtp_layers: int = 0
  # FP8 matmuls (ernie_jax.model.fp8): "none", "delayed" (amax history) or "current" scaling, for
  # attention projections, MLPs, shared and routed experts. Router, norms, softmax, loss stay fp32.
  fp8_recipe: Fp8RecipeName = "none"
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

  def is_moe_layer(self, i: int) -> bool:
    return (
      self.is_moe
      and (i + 1) % self.moe_layer_interval == 0
      and self.moe_layer_start_index <= i <= self.moe_layer_end_index
    )

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    return tuple("moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers))

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


def _validate(c: ModelConfig) -> None:
  validate_decoder(c)
  if not c.rope_compression_ratio > 0:
    raise ConfigError("rope_compression_ratio", f"must be > 0, got {c.rope_compression_ratio!r}")
  if c.fp8_recipe not in FP8_RECIPES:
    raise ConfigError("fp8_recipe", f"must be one of {FP8_RECIPES}, got {c.fp8_recipe!r}")
  if c.fp8_history_len < 1:
    raise ConfigError("fp8_history_len", f"must be >= 1, got {c.fp8_history_len}")
  if c.num_mtp_layers < 0:
    raise ConfigError("num_mtp_layers", f"must be >= 0, got {c.num_mtp_layers}")
  if c.moe_num_experts < 0:
    raise ConfigError("moe_num_experts", f"must be >= 0, got {c.moe_num_experts}")
  if not c.is_moe:
    return
  validate_moe_routing(c)
  positive(c, "moe_intermediate_size")
  positive(c, "moe_layer_interval")
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
