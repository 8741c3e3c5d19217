from ernie_jax.model.lm import CausalLMOutput, ErnieForCausalLM
from ernie_jax.model.moe import RouterOutput

__all__ = ["CausalLMOutput", "ErnieForCausalLM", "RouterOutput"]
