"""Model configs: `ModelConfig` (text, `model.py`) and `VLConfig` with its `VisionConfig` (`vl.py`),
both built on the shared decoder fields and checks of `base.py`. `cfg.is_vl` tells them apart.
`LoraConfig` (`lora.py`) describes LoRA adapters."""

from ernie_jax.config.base import ConfigError, DecoderConfig
from ernie_jax.config.lora import LoraConfig
from ernie_jax.config.model import ModelConfig
from ernie_jax.config.vl import VL_MODEL_TYPES, VisionConfig, VLConfig

__all__ = ["ConfigError", "DecoderConfig", "LoraConfig", "ModelConfig", "VLConfig", "VL_MODEL_TYPES", "VisionConfig"]
