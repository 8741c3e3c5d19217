"""ernie-jax: ERNIE 4.5 in JAX / Flax NNX."""

from ernie_jax.config import ConfigError, ModelConfig
from ernie_jax.model import CausalLMOutput, ErnieForCausalLM, RouterOutput
from ernie_jax.loading import from_pretrained

__version__ = "0.1.0"
__all__ = ["CausalLMOutput", "ConfigError", "ErnieForCausalLM", "ModelConfig", "RouterOutput", "from_pretrained"]
