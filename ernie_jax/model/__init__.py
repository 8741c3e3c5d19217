from ernie_jax.model.lm import CausalLMOutput, ErnieForCausalLM
from ernie_jax.model.router import RouterOutput

__all__ = ["CausalLMOutput", "ErnieForCausalLM", "RouterOutput"]
