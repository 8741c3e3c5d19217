from ernie_jax.model.lm import CausalLMOutput, ErnieForCausalLM
from ernie_jax.model.router import RouterOutput


def model_class(cfg):
  """The model class of a config: ErnieForCausalLM (ModelConfig) or the VL model (VLConfig)."""
  from ernie_jax.model.vl import Ernie45VLForConditionalGeneration, VLConfig  # (imports this package)

  return Ernie45VLForConditionalGeneration if isinstance(cfg, VLConfig) else ErnieForCausalLM


__all__ = ["CausalLMOutput", "ErnieForCausalLM", "RouterOutput", "model_class"]
