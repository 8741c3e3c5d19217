"""ERNIE 4.5 VL: vision transformer, resampler, 3-D RoPE and the modality-isolated MoE."""

from ernie_jax.model.vl.config_vl import VisionConfig, VLConfig
from ernie_jax.model.vl.lm_vl import Ernie45VLForConditionalGeneration, VLOutput, forward, prepare_inputs
from ernie_jax.model.vl.moe_vl import VLRouterOutput

__all__ = ["Ernie45VLForConditionalGeneration", "VLConfig", "VLOutput", "VLRouterOutput", "VisionConfig",
           "forward", "prepare_inputs"]
