"""ERNIE 4.5 VL configuration: the shared decoder fields (`base.DecoderConfig`) with the VL-28B
defaults, a per-modality `moe_intermediate_size` (text, vision), an explicit layer list
(`mlp_layer_types`), 3-D RoPE sections, the image / video token ids and a nested vision config.

Field names follow transformers' `Ernie4_5_VLMoeConfig` (`text_config` / `vision_config`) where one
exists. Every invalid or contradictory value raises `ConfigError` naming the field, at construction.
`config.json` is read and written in `ernie_jax.interop.hf_config` / `paddle_config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ernie_jax.config.base import ConfigError, DecoderConfig, positive as _positive, validate_decoder, validate_moe_routing

VL_MODEL_TYPES = ("ernie4_5_vl_moe", "ernie4_5_moe_vl")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """DFNRope ViT (spec §4.3). `layer_norm_eps` is HF's `vision_config.rms_norm_eps` (used by the
  ViT and resampler LayerNorms)."""

  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 5120
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  spatial_merge_size: int = 2
  temporal_merge_size: int = 2
  rope_theta: float = 10000.0
  layer_norm_eps: float = 1e-6
  hidden_act: str = "quick_gelu"

  def __post_init__(self):
    for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                 "spatial_merge_size", "temporal_merge_size"):
      _positive(self, name, prefix="vision_config.")
    if self.hidden_size % self.num_heads:
      raise ConfigError("vision_config.num_heads", f"hidden_size={self.hidden_size} is not divisible by "
                        f"num_heads={self.num_heads}")
    if self.head_dim % 4:
      raise ConfigError("vision_config.hidden_size", f"head_dim={self.head_dim} must be divisible by 4 "
                        "(2-D rotary: a quarter of the head per axis and half)")
    if self.temporal_merge_size != 2:
      raise ConfigError("vision_config.temporal_merge_size",
                        f"only 2 is supported (the reference resampler hard-codes it), got {self.temporal_merge_size}")
    if self.hidden_act not in ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu"):
      raise ConfigError("vision_config.hidden_act", f"unsupported activation {self.hidden_act!r}")
    if not self.layer_norm_eps > 0 or not self.rope_theta > 0:
      raise ConfigError("vision_config.rms_norm_eps", "eps and rope_theta must be > 0")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.patch_size * self.patch_size


@dataclasses.dataclass(frozen=True)
class VLConfig(DecoderConfig):
  """ERNIE 4.5 VL language model + vision tower. Defaults = ERNIE-4.5-VL-28B-A3B (HF config
  defaults, spec §1.2). `mlp_layer_types[i]` is "dense" or "sparse" (empty = HF default:
  layer 0 dense, the rest sparse); it replaces the text config's MoE layer rule.
  `moe_num_experts` is per modality; `moe_intermediate_size` = (text experts, vision experts); the
  shared experts use the text size times `moe_num_shared_experts`."""

  # the VL-28B-A3B values of the shared fields
  vocab_size: int = 103424
  hidden_size: int = 2560
  num_hidden_layers: int = 28
  num_attention_heads: int = 20
  num_key_value_heads: int = 4
  intermediate_size: int = 12288
  moe_num_experts: int = 64
  moe_k: int = 6
  moe_intermediate_size: tuple[int, int] = (1536, 512)
  moe_num_shared_experts: int = 2
  # VL only
  mrope_section: tuple[int, int, int] = (22, 22, 20)  # (h, w, t) frequency slots; t = freq_allocation
  mlp_layer_types: tuple[str, ...] = ()
  # special tokens (HF defaults, spec §4.5)
  image_token_id: int = 100295
  image_start_token_id: int = 101304
  image_end_token_id: int = 101305
  video_token_id: int = 103367
  video_start_token_id: int = 101306
  video_end_token_id: int = 101307
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)

  def __post_init__(self):
    if not self.mlp_layer_types:
      object.__setattr__(self, "mlp_layer_types", ("dense",) + ("sparse",) * (self.num_hidden_layers - 1))
    object.__setattr__(self, "mlp_layer_types", tuple(self.mlp_layer_types))
    object.__setattr__(self, "mrope_section", tuple(int(v) for v in self.mrope_section))
    object.__setattr__(self, "moe_intermediate_size", tuple(int(v) for v in self.moe_intermediate_size))
    if isinstance(self.vision, dict):
      object.__setattr__(self, "vision", VisionConfig(**self.vision))
    _validate(self)

  # ----------------------------------------------------------------------------------------------
  @property
  def layer_kinds(self) -> tuple[str, ...]:
    return tuple("moe" if t == "sparse" else "dense" for t in self.mlp_layer_types)

  @property
  def is_moe(self) -> bool:
    return "moe" in self.layer_kinds

  @property
  def is_vl(self) -> bool:
    return True

  @property
  def vision_token_ids(self) -> tuple[int, ...]:
    """Tokens routed to the vision experts: placeholders and the image/video start/end tokens."""
    return (self.image_token_id, self.video_token_id, self.image_start_token_id,
            self.image_end_token_id, self.video_start_token_id, self.video_end_token_id)

  # ----------------------------------------------------------------------------------------------
  @classmethod
  def ernie45_vl_28b_a3b(cls, **kw) -> "VLConfig":
    return cls(**kw)

  @classmethod
  def ernie45_vl_424b_a47b(cls, **kw) -> "VLConfig":
    """ERNIE-4.5-VL-424B-A47B (spec §1.2). Only the layer / head counts and the expert counts are
    published (model card); the rest is UNVERIFIED or INFERRED, taken from the 300B-A47B text
    backbone it shares its shape with. With these values the model has ~424 B parameters
    (tests/interop/test_vl_paddle.py counts them: 423.5 B), matching the published total."""
    moe_start = 3  # UNVERIFIED: moe_layer_start_index (300B: 3, i.e. layers 0-2 dense)
    base = dict(
      hidden_size=8192,  # INFERRED: 64 heads x 128 (model card gives layers / heads)
      num_hidden_layers=54, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
      intermediate_size=28672,  # UNVERIFIED (likely 28672, the 300B dense FFN)
      mlp_layer_types=("dense",) * moe_start + ("sparse",) * (54 - moe_start),  # UNVERIFIED dense layers
      moe_num_experts=64,  # [64 text, 64 vision] (model card)
      moe_k=8,  # per modality
      moe_intermediate_size=(3584,  # text: UNVERIFIED (the 300B expert size)
                             1536),  # vision: INFERRED from the 424B parameter count
      moe_num_shared_experts=0,  # UNVERIFIED (300B has none)
      tie_word_embeddings=False,  # UNVERIFIED (300B's head is untied)
      vision=VisionConfig())  # UNVERIFIED that the ViT is VL-28B's (DFNRope, depth 32, 1280)
    return cls(**{**base, **kw})

  @classmethod
  def tiny(cls, **kw) -> "VLConfig":
    """A few-MB model for tests and demos."""
    base = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=96, mrope_section=(3, 3, 2),
                moe_num_experts=4, moe_k=2, moe_intermediate_size=(32, 16), moe_num_shared_experts=1,
                image_token_id=100, image_start_token_id=101, image_end_token_id=102,
                video_start_token_id=103, video_end_token_id=104, video_token_id=105,
                vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2))
    return cls(**{**base, **kw})

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "VLConfig":
    """Inverse of `to_dict` (e.g. the config stored in an Orbax checkpoint); an unknown field
    (also inside `vision`) raises ConfigError naming it."""
    vision = d.get("vision")
    for klass, given, where in ((cls, d, ""), (VisionConfig, vision if isinstance(vision, dict) else {}, "vision.")):
      unknown = sorted(set(given) - {f.name for f in dataclasses.fields(klass)})
      if unknown:
        raise ConfigError(where + unknown[0], f"unknown {klass.__name__} field")
    return cls(**d)


def _validate(c: VLConfig) -> None:
  validate_decoder(c)
  if len(c.mrope_section) != 3 or min(c.mrope_section) < 0:
    raise ConfigError("mrope_section", f"must be three non-negative slot counts (h, w, t), got {c.mrope_section}")
  h, w, t = c.mrope_section
  if h != w or h + w + t != c.head_dim // 2:
    raise ConfigError("mrope_section", f"{c.mrope_section}: needs h == w and h + w + t == head_dim / 2 "
                      f"= {c.head_dim // 2} (h/w slots alternate, t takes the last slots)")
  if len(c.mlp_layer_types) != c.num_hidden_layers:
    raise ConfigError("mlp_layer_types", f"has {len(c.mlp_layer_types)} entries for "
                      f"num_hidden_layers={c.num_hidden_layers}")
  bad = [k for k in c.mlp_layer_types if k not in ("dense", "sparse")]
  if bad:
    raise ConfigError("mlp_layer_types", f"entries must be 'dense' or 'sparse', got {bad[0]!r}")
  ids = {}
  for name in ("image_token_id", "image_start_token_id", "image_end_token_id", "video_token_id",
               "video_start_token_id", "video_end_token_id"):
    v = getattr(c, name)
    if not 0 <= v < c.vocab_size:
      raise ConfigError(name, f"{v} is outside the vocabulary [0, {c.vocab_size})")
    if v in ids:
      raise ConfigError(name, f"{v} is also {ids[v]}")
    ids[v] = name
  if c.is_moe:
    _positive(c, "moe_num_experts")
    validate_moe_routing(c)
    if len(c.moe_intermediate_size) != 2 or min(c.moe_intermediate_size) <= 0:
      raise ConfigError("moe_intermediate_size",
                        f"must be (text, vision) positive sizes, got {c.moe_intermediate_size}")
