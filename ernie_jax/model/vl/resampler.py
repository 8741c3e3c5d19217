"""Variable-resolution resampler: ViT patches -> language-model embeddings (spec §4.4).

1. spatial: every 4 consecutive patches (one 2x2 block, by the patch order) are concatenated
   [N/4, 4D] -> Linear -> GELU (erf) -> Linear -> LayerNorm;
2. temporal: per image / video, frame pairs (0,1), (2,3), ... of merged tokens are concatenated
   along channels [even | odd] (an image, t = 1, pairs its single frame with itself; an odd last
   video frame is dropped, like the reference) -> Linear(8D -> 4D) -> GELU -> Linear -> LayerNorm;
3. Linear(4D -> hidden) -> RMSNorm (text eps).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.model.layers import RMSNorm
from ernie_jax.config import VLConfig
from ernie_jax.model.vl.vision import LayerNorm, Linear


def temporal_pair_index(grid_thw: Sequence[Sequence[int]], merge: int) -> tuple[np.ndarray, np.ndarray]:
  """Static gather indices (first, second) into the spatially merged tokens."""
  first, second, offset = [], [], 0
  for t, h, w in grid_thw:
    s = (h * w) // (merge * merge)
    evens = range(0, t, 2)
    odds = range(1 if t > 1 else 0, t, 2)
    for te, to in zip(evens, odds):
      first.append(offset + te * s + np.arange(s))
      second.append(offset + to * s + np.arange(s))
    offset += t * s
  return np.concatenate(first).astype(np.int32), np.concatenate(second).astype(np.int32)


class ResamplerMLP(nnx.Module):
  def __init__(self, din: int, dout: int, eps: float, *, param_dtype, dtype, init_std, rngs):
    kw = dict(param_dtype=param_dtype, dtype=dtype, init_std=init_std, rngs=rngs)
    self.fc1 = Linear(din, dout, bias=True, axes=("embed", "mlp"), **kw)
    self.fc2 = Linear(dout, dout, bias=True, axes=("mlp", "embed"), **kw)
    self.ln = LayerNorm(dout, eps, param_dtype)

  def __call__(self, x):
    return self.ln(self.fc2(jax.nn.gelu(self.fc1(x), approximate=False)))


class Resampler(nnx.Module):
  def __init__(self, cfg: VLConfig, *, rngs: nnx.Rngs):
    v = cfg.vision
    pd, d = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    kw = dict(param_dtype=pd, dtype=d, init_std=cfg.initializer_range, rngs=rngs)
    spatial = v.hidden_size * v.spatial_merge_size ** 2
    self.spatial_linear = ResamplerMLP(spatial, spatial, v.layer_norm_eps, **kw)
    self.temporal_linear = ResamplerMLP(spatial * v.temporal_merge_size, spatial, v.layer_norm_eps, **kw)
    self.mlp = Linear(spatial, cfg.hidden_size, bias=True, axes=("mlp", "embed"), **kw)
    self.after_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    self.merge = v.spatial_merge_size

  def __call__(self, x: jax.Array, grid_thw: Sequence[Sequence[int]]) -> jax.Array:
    """x [N, D] ViT output -> [M, hidden], M = sum of `rope3d.tokens_per_grid` over the grids."""
    m2 = self.merge ** 2
    x = self.spatial_linear(x.reshape(x.shape[0] // m2, x.shape[1] * m2))
    first, second = temporal_pair_index(grid_thw, self.merge)
    x = jnp.concatenate([jnp.take(x, jnp.asarray(first), axis=0),
                         jnp.take(x, jnp.asarray(second), axis=0)], axis=-1)
    x = self.temporal_linear(x)
    return self.after_norm(self.mlp(x))
