"""ERNIE 4.5 VL configuration: a frozen language-model config with a nested vision config.

Field names follow transformers' `Ernie4_5_VLMoeConfig` (`text_config` / `vision_config`) where one
exists. Every invalid or contradictory value raises `ConfigError` naming the field, at construction.
`from_hf` also reads the original flat Paddle-style VL config (`model_type` `ernie4_5_moe_vl`,
per-modality lists for the MoE fields, spec §1.2).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ernie_jax.config import ConfigError, _read_json

_DTYPES = ("float32", "bfloat16", "float16")
_MOE_IMPLS = ("auto", "ragged_dot", "blocked", "loop")
_REMATS = ("none", "full", "save_dots")
_TRANSPORTS = ("none", "all_to_all", "ragged_all_to_all", "allgather")
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
class VLConfig:
  """ERNIE 4.5 VL language model + vision tower. Defaults = ERNIE-4.5-VL-28B-A3B (HF config
  defaults, spec §1.2). `mlp_layer_types[i]` is "dense" or "sparse" (empty = HF default:
  layer 0 dense, the rest sparse). `moe_intermediate_size` = (text experts, vision experts); the
  shared experts use the text size times `moe_num_shared_experts`."""

  vocab_size: int = 103424
  hidden_size: int = 2560
  num_hidden_layers: int = 28
  num_attention_heads: int = 20
  num_key_value_heads: int = 4
  head_dim: int = 128
  intermediate_size: int = 12288
  rope_theta: float = 500000.0
  mrope_section: tuple[int, int, int] = (22, 22, 20)  # (h, w, t) frequency slots; t = freq_allocation
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 131072
  initializer_range: float = 0.02
  mlp_layer_types: tuple[str, ...] = ()
  moe_num_experts: int = 64  # per modality
  moe_k: int = 6
  moe_intermediate_size: tuple[int, int] = (1536, 512)
  moe_num_shared_experts: int = 2
  moe_norm_min: float = 1e-12
  moe_use_correction_bias: bool = True
  moe_impl: str = "auto"
  moe_transport: str = "none"
  moe_capacity_factor: float = 2.0
  # special tokens (HF defaults, spec §4.5)
  image_token_id: int = 100295
  image_start_token_id: int = 101304
  image_end_token_id: int = 101305
  video_token_id: int = 103367
  video_start_token_id: int = 101306
  video_end_token_id: int = 101307
  pad_token_id: int = 0
  bos_token_id: int = 1
  eos_token_id: int = 2
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str = "none"
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

  def replace(self, **changes: Any) -> "VLConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  # ----------------------------------------------------------------------------------------------
  @classmethod
  def ernie45_vl_28b_a3b(cls, **kw) -> "VLConfig":
    return cls(**kw)

  @classmethod
  def ernie45_vl_424b_a47b(cls, **kw) -> "VLConfig":
    """ERNIE-4.5-VL-424B-A47B (spec §1.2). Only the layer / head counts and the expert counts are
    published (model card); the rest is UNVERIFIED or INFERRED, taken from the 300B-A47B text
    backbone it shares its shape with. With these values the model has ~424 B parameters
    (tests/test_vl_paddle.py counts them: 423.5 B), matching the published total."""
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

  # ----------------------------------------------------------------------------------------------
  @classmethod
  def from_hf(cls, cfg, **overrides) -> "VLConfig":
    """From a transformers VL `config.json` (nested `text_config` / `vision_config`), or the
    original flat VL config (`ernie4_5_moe_vl`: per-modality MoE lists), as dict or path.
    Missing fields take the transformers defaults (= ERNIE-4.5-VL-28B-A3B)."""
    d = _read_json(cfg)
    model_type = d.get("model_type", "")
    if model_type not in VL_MODEL_TYPES:
      raise ConfigError("model_type", f"expected one of {VL_MODEL_TYPES}, got {model_type!r}")
    return cls(**{**_parse(d, paddle=False), **overrides})

  @classmethod
  def from_paddle(cls, cfg, **overrides) -> "VLConfig":
    """From the `config.json` of a Paddle `-Paddle` VL checkpoint (flat: per-modality lists
    `moe_num_experts: [text, vision]`, `moe_intermediate_size: [text, vision]`,
    `moe_layer_{start,end}_index`, `freq_allocation`, `im_patch_id`, nested `vision_config` with
    `embed_dim` / `mlp_ratio`, `pixel_hidden_size`, `spatial_conv_size`, `temporal_conv_size`,
    `moe_use_aux_free`). Paddle's defaults are not transformers' (spec §5.4: rope_theta, eps, tied
    head), so the fields whose default would silently change the numerics are required: a
    missing one raises ConfigError naming it. model_type is not required."""
    return cls(**{**_parse(_read_json(cfg), paddle=True), **overrides})

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


# --------------------------------------------------------------------------------------------------
# Fields whose default would silently change the numerics if a Paddle config.json left them out
# (PaddleFormers' defaults differ from transformers': rope_theta 10000, rms_norm_eps 1e-6, untied).
_PADDLE_REQUIRED = ("rope_theta", "rms_norm_eps", "tie_word_embeddings", "freq_allocation", "moe_k",
                    "moe_num_experts", "moe_intermediate_size")


def _parse(d: dict[str, Any], *, paddle: bool) -> dict[str, Any]:
  """VLConfig keyword arguments from a transformers (nested or flat) or Paddle (flat) config."""
  t = d if paddle else (d.get("text_config") or d)  # the flat layout keeps the text fields at top level
  pre = "" if paddle or t is d else "text_config."
  if paddle:
    for key in _PADDLE_REQUIRED:
      _req(d, key, "")
    v = _req(d, "vision_config", "")
    if not isinstance(v, dict):
      raise ConfigError("vision_config", f"must be an object, got {type(v).__name__}")
    for key in ("depth", "num_heads"):
      _req(v, key, "vision_config.")
    if v.get("hidden_size") is None and v.get("embed_dim") is None:
      raise ConfigError("vision_config.embed_dim", "missing from config.json (nor vision_config.hidden_size)")
    if float(d.get("compression_ratio", 1.0)) != 1.0:
      raise ConfigError("compression_ratio", f"{d['compression_ratio']}: the VL model has no position compression")
    if d.get("rope_3d") is False:
      raise ConfigError("rope_3d", "false (1-D RoPE in a VL model) is not supported")
  else:
    v = d.get("vision_config") or {}
  if t.get("use_bias"):
    raise ConfigError(pre + "use_bias", "ERNIE 4.5 VL has no LM biases; use_bias=true is not supported")
  rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ConfigError(pre + "rope_parameters.rope_type", f"only 'default' is supported, got {rope_type!r}")
  hidden, heads = _req(t, "hidden_size", pre), _req(t, "num_attention_heads", pre)
  head_dim = t.get("head_dim") or hidden // heads
  if "mrope_section" in rope:
    mrope = tuple(rope["mrope_section"])
  elif "freq_allocation" in t:  # flat layout: t gets the last `freq_allocation` slots
    hw = head_dim // 2 - int(t["freq_allocation"])
    mrope = (hw // 2, hw // 2, int(t["freq_allocation"]))
  else:
    mrope = (22, 22, 20)
  layers = _req(t, "num_hidden_layers", pre)
  kinds = t.get("mlp_layer_types")
  if kinds is None and "moe_layer_start_index" in t:
    start = min(_as_list(t["moe_layer_start_index"]))
    end = max(layers - 1 if e == -1 else e for e in _as_list(t.get("moe_layer_end_index", -1)))
    interval = _as_list(t.get("moe_layer_interval", 1))[0]
    kinds = ["sparse" if (i + 1) % interval == 0 and start <= i <= end else "dense" for i in range(layers)]
  experts = _as_list(t.get("moe_num_experts", 64))
  if len(set(experts)) != 1:
    raise ConfigError(pre + "moe_num_experts",
                      f"text and vision expert counts must be equal (reference layout), got {experts}")
  ks = _as_list(t.get("moe_k", 6))
  inter = _as_list(t.get("moe_intermediate_size") or [1536, 512])
  if len(inter) == 1:
    inter = inter * 2
  shared = _as_list(t.get("moe_num_shared_experts", 0 if paddle else 2))[0]

  def tok(key, default, alt=None):
    for src in (d, t):
      for k in (key, alt):
        if k and src.get(k) is not None:
          return int(src[k])
    return default

  vision_hidden = int(v.get("hidden_size") or v.get("embed_dim") or 1280)
  if paddle and d.get("pixel_hidden_size") not in (None, vision_hidden):
    raise ConfigError("pixel_hidden_size", f"{d['pixel_hidden_size']} != vision hidden size {vision_hidden}")
  merge = int(v.get("spatial_merge_size", d.get("spatial_conv_size", 2)))
  if paddle and d.get("spatial_conv_size") not in (None, merge):
    raise ConfigError("spatial_conv_size", f"{d['spatial_conv_size']} != vision_config.spatial_merge_size {merge}")
  vision = VisionConfig(
    depth=int(v.get("depth", 32)), hidden_size=vision_hidden,
    intermediate_size=int(v.get("intermediate_size") or int(vision_hidden * v.get("mlp_ratio", 4))),
    num_heads=int(v.get("num_heads", 16)), in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
    patch_size=int(v.get("patch_size", 14)), spatial_merge_size=merge,
    temporal_merge_size=int(v.get("temporal_merge_size", d.get("temporal_conv_size", 2))),
    rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
    layer_norm_eps=float(v.get("rms_norm_eps", 1e-6)), hidden_act=v.get("hidden_act", "quick_gelu"))
  kw = dict(
    vocab_size=_req(t, "vocab_size", pre), hidden_size=hidden, num_hidden_layers=layers,
    num_attention_heads=heads, num_key_value_heads=t.get("num_key_value_heads") or heads,
    head_dim=head_dim, intermediate_size=_req(t, "intermediate_size", pre),
    rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 500000.0))), mrope_section=mrope,
    rms_norm_eps=float(t.get("rms_norm_eps", 1e-5)),
    tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", True))),
    max_position_embeddings=int(t.get("max_position_embeddings", t.get("max_sequence_length", 131072))),
    mlp_layer_types=tuple(kinds or ()), moe_num_experts=int(experts[0]), moe_k=int(ks[0]),
    moe_intermediate_size=(int(inter[0]), int(inter[1])), moe_num_shared_experts=int(shared),
    moe_norm_min=float(t.get("moe_norm_min", 1e-12)),
    image_token_id=tok("image_token_id", 100295, alt="im_patch_id"),
    image_start_token_id=tok("image_start_token_id", 101304),
    image_end_token_id=tok("image_end_token_id", 101305),
    video_token_id=tok("video_token_id", 103367),
    video_start_token_id=tok("video_start_token_id", 101306),
    video_end_token_id=tok("video_end_token_id", 101307),
    pad_token_id=_tok(t.get("pad_token_id"), 0), bos_token_id=_tok(t.get("bos_token_id"), 1),
    eos_token_id=_tok(t.get("eos_token_id"), 2), vision=vision)
  if paddle:
    kw["moe_use_correction_bias"] = bool(d.get("moe_use_aux_free", True))
  return kw


# --------------------------------------------------------------------------------------------------
def _as_list(v):
  return list(v) if isinstance(v, (list, tuple)) else [v]


def _req(d, key, prefix="text_config."):
  if key not in d or d[key] is None:
    raise ConfigError(f"{prefix}{key}", "missing from config.json")
  return d[key]


def _tok(v, default: int) -> int:
  if v is None:
    return default
  return int(v[0] if isinstance(v, (list, tuple)) else v)


def _positive(c, name, prefix=""):
  v = getattr(c, name)
  if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
    raise ConfigError(prefix + name, f"must be a positive integer, got {v!r}")


def _validate(c: VLConfig) -> None:
  for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings"):
    _positive(c, name)
  if c.num_attention_heads % c.num_key_value_heads:
    raise ConfigError("num_key_value_heads", f"num_attention_heads={c.num_attention_heads} is not "
                      f"divisible by num_key_value_heads={c.num_key_value_heads}")
  if c.head_dim % 2:
    raise ConfigError("head_dim", f"must be even for rotary embeddings, got {c.head_dim}")
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
  if not c.rope_theta > 0 or not c.rms_norm_eps > 0:
    raise ConfigError("rope_theta" if not c.rope_theta > 0 else "rms_norm_eps", "must be > 0")
  for name, allowed in (("param_dtype", _DTYPES), ("dtype", _DTYPES), ("moe_impl", _MOE_IMPLS),
                        ("remat", _REMATS), ("moe_transport", _TRANSPORTS)):
    if getattr(c, name) not in allowed:
      raise ConfigError(name, f"must be one of {allowed}, got {getattr(c, name)!r}")
  for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
    v = getattr(c, name)
    if not 0 <= v < c.vocab_size:
      raise ConfigError(name, f"{v} is outside the vocabulary [0, {c.vocab_size})")
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
    if not 1 <= c.moe_k <= c.moe_num_experts:
      raise ConfigError("moe_k", f"must be in [1, moe_num_experts={c.moe_num_experts}], got {c.moe_k}")
    if len(c.moe_intermediate_size) != 2 or min(c.moe_intermediate_size) <= 0:
      raise ConfigError("moe_intermediate_size",
                        f"must be (text, vision) positive sizes, got {c.moe_intermediate_size}")
    if c.moe_num_shared_experts < 0:
      raise ConfigError("moe_num_shared_experts", f"must be >= 0, got {c.moe_num_shared_experts}")
    if not c.moe_norm_min > 0:
      raise ConfigError("moe_norm_min", f"must be > 0, got {c.moe_norm_min}")
