"""DFNRope vision transformer of ERNIE 4.5 VL (spec §4.3).

Input: all images / video frames of a batch as one packed sequence of pre-flattened 14x14 patches
[N, C*14*14] (patch order: 2x2 merge blocks, see `ernie_jax.data.vl_preprocess`), plus the static grid
(t, h, w) of each image / video. Each frame attends only to itself: the frames are cut out of the
packed sequence with static slices and consecutive frames of equal size are batched, so there is
neither padding nor an N x N mask (long frames are processed in query chunks).

Block (pre-LN): x += proj(attn(LN1(x))); x += fc2(quick_gelu(fc1(LN2(x)))); then a final LayerNorm.
The blocks are stacked on a leading "layers" axis and applied with nnx.scan.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.model.lora_ops import adapter, add
from ernie_jax.model.layers import make_param, normal
from ernie_jax.config import VisionConfig
from ernie_jax.model.vl.rope3d import apply_rope_half, vision_position_ids, vision_rope

Grid = Sequence[Sequence[int]]
# Frames longer than this attend in query chunks of this size (None: by backend; on CPU small
# chunks keep the score block in cache, measured ~10% faster than 1024 for 1024-patch frames).
QUERY_CHUNK: int | None = None


def query_chunk() -> int:
  return QUERY_CHUNK or (256 if jax.default_backend() == "cpu" else 1024)


def _zeros(shape, dtype, axes):
  return nnx.Param(jnp.zeros(shape, dtype), sharding_names=tuple(axes), eager_sharding=False)


def _ones(shape, dtype, axes):
  return nnx.Param(jnp.ones(shape, dtype), sharding_names=tuple(axes), eager_sharding=False)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm in fp32 (biased variance), returned in x.dtype."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps) * weight.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x.dtype)


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, param_dtype):
    self.weight = _ones((dim,), param_dtype, ("norm",))
    self.bias = _zeros((dim,), param_dtype, ("norm",))
    self.eps = eps

  def __call__(self, x):
    return layer_norm(x, self.weight[...], self.bias[...], self.eps)


class Linear(nnx.Module):
  """y = x @ kernel [in, out] (+ bias)."""

  def __init__(self, din: int, dout: int, *, bias: bool, axes, param_dtype, dtype, init_std, rngs):
    self.kernel = make_param(rngs, normal(init_std), (din, dout), param_dtype, axes)
    self.bias = _zeros((dout,), param_dtype, (axes[1],)) if bias else None
    self.dtype = dtype

  def __call__(self, x):
    d = self.dtype
    y = x.astype(d) @ self.kernel[...].astype(d)
    y = add(y, x.astype(d), adapter(self, "kernel", d), "...i,ir->...r", "...r,ro->...o")  # LoRA (resampler)
    return y if self.bias is None else y + self.bias[...].astype(d)


def activation(name: str):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "gelu_pytorch_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  return jax.nn.silu


# --------------------------------------------------------------------------------------------------
def frame_runs(grid_thw: Grid) -> list[tuple[int, int, int]]:
  """Static attention segments: (start, frames, frame_len) with consecutive equal-size frames of
  all images / videos merged into one batched run."""
  runs: list[list[int]] = []
  start = 0
  for t, h, w in grid_thw:
    n = int(h) * int(w)
    if runs and runs[-1][2] == n:
      runs[-1][1] += int(t)
    else:
      runs.append([start, int(t), n])
    start += int(t) * n
  return [tuple(r) for r in runs]


def _dense_attend(q, k, v):
  """q [F, Q, H, D], k/v [F, L, H, D] -> [F, Q, H, D]; fp32 scores and softmax."""
  scores = jnp.einsum("fqhd,fkhd->fhqk", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("fhqk,fkhd->fqhd", probs, v)


def frame_attend(q, k, v, chunk: int | None = None):
  """Full (non-causal) attention within each frame; q/k/v [F, L, H, D]. Long frames are processed
  in query chunks (queries padded to a multiple of the chunk; keys are never padded)."""
  f, l = q.shape[:2]
  chunk = chunk or query_chunk()
  if l <= chunk:
    return _dense_attend(q, k, v)
  n = -(-l // chunk)
  qp = jnp.pad(q, ((0, 0), (0, n * chunk - l), (0, 0), (0, 0)))
  qc = qp.reshape(f, n, chunk, *q.shape[2:]).swapaxes(0, 1)  # [n, F, chunk, H, D]
  out = jax.lax.map(lambda qi: _dense_attend(qi, k, v), qc)
  return out.swapaxes(0, 1).reshape(f, n * chunk, *q.shape[2:])[:, :l]


def segment_attention(q, k, v, runs):
  """q/k/v [N, H, D] packed -> [N, H, D], each frame attending only to itself."""
  outs = []
  for start, frames, length in runs:
    sl = slice(start, start + frames * length)
    shape = (frames, length) + q.shape[1:]
    o = frame_attend(q[sl].reshape(shape), k[sl].reshape(shape), v[sl].reshape(shape))
    outs.append(o.reshape((frames * length,) + q.shape[1:]))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


# --------------------------------------------------------------------------------------------------
class VisionBlock(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, param_dtype, dtype, init_std, rngs):
    d, i = cfg.hidden_size, cfg.intermediate_size
    kw = dict(param_dtype=param_dtype, dtype=dtype, init_std=init_std, rngs=rngs)
    self.norm1 = LayerNorm(d, cfg.layer_norm_eps, param_dtype)
    self.qkv = Linear(d, 3 * d, bias=True, axes=("embed", "mlp"), **kw)
    self.proj = Linear(d, d, bias=True, axes=("mlp", "embed"), **kw)
    self.norm2 = LayerNorm(d, cfg.layer_norm_eps, param_dtype)
    self.fc1 = Linear(d, i, bias=True, axes=("embed", "mlp"), **kw)
    self.fc2 = Linear(i, d, bias=True, axes=("mlp", "embed"), **kw)
    self.heads = cfg.num_heads
    self.act = cfg.hidden_act

  def __call__(self, x, cos, sin, runs):
    n, dim = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(n, 3, self.heads, dim // self.heads)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)
    a = segment_attention(q, k, v, runs).reshape(n, dim)
    x = x + self.proj(a).astype(x.dtype)
    h = activation(self.act)(self.fc1(self.norm2(x)))
    return x + self.fc2(h).astype(x.dtype)


class VisionTransformer(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, param_dtype=jnp.float32, dtype=jnp.float32,
               init_std: float = 0.02, remat: str = "none", rngs: nnx.Rngs):
    self.config = cfg
    self.patch_embed = make_param(rngs, normal(init_std), (cfg.patch_dim, cfg.hidden_size),
                                  param_dtype, (None, "embed"))

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return VisionBlock(cfg, param_dtype=param_dtype, dtype=dtype, init_std=init_std, rngs=rngs)

    self.blocks = make(rngs)
    self.ln = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype)
    self.dtype = dtype
    self.remat = remat

  def __call__(self, patches: jax.Array, grid_thw: Grid) -> jax.Array:
    """patches [N, C*p*p], grid_thw: static (t, h, w) per image/video, sum(t*h*w) == N -> [N, D]."""
    c = self.config
    grid = tuple(tuple(int(v) for v in g) for g in grid_thw)
    check_grid(grid, patches.shape, c)
    cos, sin = vision_rope(jnp.asarray(vision_position_ids(grid, c.spatial_merge_size)),
                           c.head_dim, c.rope_theta)
    runs = frame_runs(grid)
    x = patches.astype(self.dtype) @ self.patch_embed[...].astype(self.dtype)

    def body(block, x):
      return block(x, cos, sin, runs)

    if self.remat != "none":
      body = nnx.remat(body)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def scan_fn(block, x):
      return body(block, x)

    x = scan_fn(self.blocks, x)
    return self.ln(x)


def check_grid(grid, patches_shape, c: VisionConfig) -> None:
  if len(patches_shape) != 2 or patches_shape[1] != c.patch_dim:
    raise ValueError(f"pixel values must be [num_patches, {c.patch_dim}] (C*{c.patch_size}*{c.patch_size} "
                     f"flattened patches), got shape {tuple(patches_shape)}")
  if not grid:
    raise ValueError("grid_thw is empty: give (t, h, w) for every image / video")
  m = c.spatial_merge_size
  for g in grid:
    if len(g) != 3 or min(g) < 1:
      raise ValueError(f"grid {g} must be three positive sizes (t, h, w)")
    if g[1] % m or g[2] % m:
      raise ValueError(f"grid {g}: h and w must be multiples of spatial_merge_size={m}")
  total = int(np.sum([g[0] * g[1] * g[2] for g in grid]))
  if total != patches_shape[0]:
    raise ValueError(f"the grids {list(grid)} describe {total} patches but pixel values have "
                     f"{patches_shape[0]}")
