"""ERNIE 4.5 models in Flax NNX.

Text math: `layers.py` (params, RMSNorm, RoPE, SwiGLU MLP), `attention.py`, `moe/` (router, dispatch,
MoE block over expert sets, expert parallelism and its transports), `decoder.py` (decoder layers and
the scanned stack), `lm.py` (the shared `DecoderLM` and the text model), `fp8.py`. The VL model
(`vl/`) is the text model plus the vision encoder and a second expert set.
"""

from ernie_jax.model.lm import CausalLMOutput, ErnieForCausalLM
from ernie_jax.model.moe.router import RouterOutput
from ernie_jax.model.vl.lm_vl import Ernie45VLForConditionalGeneration


def model_class(cfg):
  """The model class of a config: ErnieForCausalLM, or the VL model when `cfg.is_vl`."""
  return Ernie45VLForConditionalGeneration if cfg.is_vl else ErnieForCausalLM


__all__ = ["CausalLMOutput", "ErnieForCausalLM", "Ernie45VLForConditionalGeneration", "RouterOutput",
           "model_class"]
