"""ERNIE 4.5 VL: the text model's decoder with a second (vision) expert set in its MoE layers
(`ernie_jax.model.moe`), 3-D RoPE, the vision transformer and the resampler."""

from ernie_jax.config import VisionConfig, VLConfig
from ernie_jax.model.vl.lm_vl import Ernie45VLForConditionalGeneration, VLOutput, forward, prepare_inputs
from ernie_jax.model.moe.router import VLRouterOutput

__all__ = ["Ernie45VLForConditionalGeneration", "VLConfig", "VLOutput", "VLRouterOutput", "VisionConfig",
           "forward", "prepare_inputs"]
