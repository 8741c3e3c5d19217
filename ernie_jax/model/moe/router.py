"""The MoE router (spec §3.1): fp32 softmax over experts, top-k chosen with the correction bias added
to the probabilities (selection only), weights = unbiased probabilities renormalised with norm_min.

`Router` holds the parameters (fp32 kernel [H, E], optional correction-bias buffer [E]); `route` is
the math; `RouterOutput` (one expert set) and `VLRouterOutput` (the VL model's text and vision sets)
are what the MoE losses read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ernie_jax.model.layers import Buffer, make_param, normal


@struct.dataclass
class RouterOutput:
  """What the router decided for each token ([T, ...], T = batch*seq); used by the MoE losses."""

  logits: jax.Array  # [T, E] fp32, before softmax (z-loss)
  probs: jax.Array  # [T, E] fp32 softmax (load-balance loss)
  indices: jax.Array  # [T, k] int32 selected experts (chosen with the correction bias)
  weights: jax.Array  # [T, k] fp32 renormalised unbiased probabilities of the selected experts
  dropped: jax.Array  # int32 scalar: assignments dropped by a capacity-limited transport


def route(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, k: int, norm_min: float) -> RouterOutput:
  logits = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  probs = jax.nn.softmax(logits, axis=-1)
  scores = probs if bias is None else probs + bias.astype(jnp.float32)
  _, indices = jax.lax.top_k(jax.lax.stop_gradient(scores), k)
  weights = jnp.take_along_axis(probs, indices, axis=-1)
  weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), norm_min)
  return RouterOutput(logits, probs, indices.astype(jnp.int32), weights, jnp.zeros((), jnp.int32))


@struct.dataclass
class VLRouterOutput:
  """Both routers' decisions for every token ([T, ...], or [L, T, ...] stacked over MoE layers).
  Only the text rows of `text` and the vision rows of `vision` were used; the losses mask the rest
  with the model output's `vision_mask`."""

  text: RouterOutput
  vision: RouterOutput


class Router(nnx.Module):
  def __init__(self, hidden: int, num_experts: int, *, use_bias: bool, init_std: float, rngs: nnx.Rngs):
    self.kernel = make_param(rngs, normal(init_std), (hidden, num_experts), jnp.float32, ("embed", None))
    self.correction_bias = (
      Buffer(jnp.zeros((num_experts,), jnp.float32), sharding_names=(None,), eager_sharding=False)
      if use_bias else None)

  def bias(self) -> jax.Array | None:
    return None if self.correction_bias is None else self.correction_bias[...]

  def __call__(self, x: jax.Array, k: int, norm_min: float) -> RouterOutput:
    return route(x, self.kernel[...], self.bias(), k, norm_min)
