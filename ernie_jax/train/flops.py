"""Model FLOPs per trained token, and peak device FLOP/s, for MFU.

Training FLOPs per token = 3 x forward (the backward pass costs twice the forward; recomputation
from remat is NOT counted: MFU measures useful model work):

  forward = 2 * N_active                             (every matmul weight used by a token)
          + 2 * 2 * L_attn * n_heads * head_dim * S / 2   (QK^T and PV against on average S/2
                                                     earlier keys: causal attention)
where
  N_active = sum over decoder layers of
               attention projections  H * head_dim * (2 * n_heads + 2 * n_kv_heads)
             + dense SwiGLU           3 * H * I                        (dense layers)
             + MoE                    H * E                            (router)
                                    + 3 * H * I_moe * (k + n_shared)   (routed + shared experts)
           + LM head                  H * V
           + per MTP depth            2H * H (projection) + one decoder layer + H * V (head)
The embedding lookup is not a matmul and is not counted; norms, softmax and RoPE are ignored.
L_attn counts decoder layers plus MTP layers.

MFU = model FLOPs per second / (peak FLOP/s per device * devices). The peak comes from a table of
accelerators (dense bf16 figures from the vendors) or `peak_tflops_per_device` in the config. On
CPU there is no meaningful spec figure: the peak is MEASURED once as the FLOP/s of a large fp32
matmul on this machine, so CPU "MFU" means "fraction of achievable matmul throughput".
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.config import ModelConfig
from ernie_jax.model.vl import Ernie45VLForConditionalGeneration


def _attn_params(cfg) -> int:
  """Attention projection weights of one decoder layer (q, k, v, o)."""
  return cfg.hidden_size * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)


def _attn_flops_per_token(cfg, layers: int, seq_len: int) -> float:
  """QK^T and PV of one token against on average seq_len / 2 earlier keys, over `layers` layers."""
  return 2 * 2 * layers * cfg.num_attention_heads * cfg.head_dim * seq_len / 2


def _layer_params(cfg: ModelConfig, kind: str) -> int:
  h = cfg.hidden_size
  attn = _attn_params(cfg)
  if kind == "moe":
    ffn = h * cfg.moe_num_experts + 3 * h * cfg.moe_intermediate_size * (cfg.moe_k + cfg.moe_num_shared_experts)
  else:
    ffn = 3 * h * cfg.intermediate_size
  return attn + ffn


def active_matmul_params(cfg: ModelConfig) -> int:
  """Matmul weights used per token (MoE: k routed + shared experts), incl. LM head and MTP."""
  n = sum(_layer_params(cfg, k) for k in cfg.layer_kinds) + cfg.hidden_size * cfg.vocab_size
  for d in range(cfg.num_mtp_layers):
    kind = "moe" if cfg.is_moe_layer(d) else "dense"
    n += 2 * cfg.hidden_size * cfg.hidden_size + _layer_params(cfg, kind) + cfg.hidden_size * cfg.vocab_size
  return n


def total_params(cfg: ModelConfig) -> int:
  """All parameters (every expert; embedding counted once when tied)."""
  h = cfg.hidden_size
  n = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h

  def layer(kind):
    attn = _attn_params(cfg) + 2 * h
    if kind == "moe":
      return attn + h * cfg.moe_num_experts + 3 * h * cfg.moe_intermediate_size * (
        cfg.moe_num_experts + cfg.moe_num_shared_experts)
    return attn + 3 * h * cfg.intermediate_size

  n += sum(layer(k) for k in cfg.layer_kinds)
  for d in range(cfg.num_mtp_layers):
    n += 2 * h * h + 2 * h + layer("moe" if cfg.is_moe_layer(d) else "dense")
  return n


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs to train on one token (forward + backward), see the module docstring."""
  attn = _attn_flops_per_token(cfg, cfg.num_hidden_layers + cfg.num_mtp_layers, seq_len)
  return 3.0 * (2.0 * active_matmul_params(cfg) + attn)


# Dense (no 2:4 sparsity) peak FLOP/s per device from the vendors' datasheets, matched in order
# against jax's device_kind (so "H100 PCIe" comes before "H100"). NVIDIA's datasheets print the sparse
# figures (H100 SXM: bf16 1979, fp8 3958 TFLOP/s "with sparsity"); the dense ones are half of those.
# H200 has the H100 SXM's compute (GH100), only more and faster memory.
PEAK_FLOPS = (
  ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
  ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
  ("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12),
  ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("B200", 2250e12), ("GB200", 2500e12),
)
# Dense FP8 (E4M3 / E5M2) tensor-core peak, the same way (devices without FP8 tensor cores are absent).
PEAK_FP8_FLOPS = (("H100 PCIe", 1513e12), ("H200", 1979e12), ("H100", 1979e12), ("H800", 1979e12))


def vendor_peak(kind: str, table=PEAK_FLOPS) -> float | None:
  """The datasheet peak for a jax `device_kind` from `table` (PEAK_FLOPS or PEAK_FP8_FLOPS), or None."""
  for name, value in table:
    if name.lower() in kind.lower():
      return value
  return None


_MEASURED: dict[str, float] = {}


def measure_matmul_flops(n: int = 1024, dtype=jnp.float32, repeats: int = 5, chain: int = 1) -> float:
  """FLOP/s of an n x n matmul on the default device (best of `repeats`). chain > 1 times `chain`
  dependent matmuls inside one jitted loop, so that a fast device is not timed on its dispatch latency
  (an FP8 dtype accumulates in bf16 and casts each product back to `dtype`, as an FP8 GEMM chain would)."""
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  scale = 1.0 / n ** 0.5  # keeps the chained products O(1)
  a = (jax.random.normal(ka, (n, n), jnp.float32) * scale).astype(dtype)
  b = (jax.random.normal(kb, (n, n), jnp.float32) * scale).astype(dtype)
  acc = jnp.bfloat16 if jnp.dtype(dtype).itemsize == 1 else None
  dot = lambda x, y: jnp.dot(x, y, preferred_element_type=acc).astype(dtype)
  if chain > 1:
    f = jax.jit(lambda x, y: jax.lax.fori_loop(0, chain, lambda _, z: dot(z, y), x))
  else:
    f = jax.jit(dot)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 * chain / best


def peak_flops_per_device(override_tflops: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from)."""
  if override_tflops > 0:
    return override_tflops * 1e12, "config"
  kind = jax.devices()[0].device_kind
  flops = vendor_peak(kind)
  if flops is not None:
    return flops, f"table ({kind})"
  if jax.default_backend() == "cpu":
    if "cpu" not in _MEASURED:
      _MEASURED["cpu"] = measure_matmul_flops()
    return _MEASURED["cpu"], "measured fp32 matmul (CPU)"
  return float("nan"), f"unknown device {kind!r}; set peak_tflops_per_device"


# --------------------------------------------------------------------------------------------------
# ERNIE 4.5 VL. Per step (static data layout: every row holds `images_per_row` images of one grid):
#   LM: each token as in the text formula, text tokens (and padding) with the text experts, vision
#       tokens (placeholders + image start / end) with the vision experts (k routed each, shared
#       experts on all tokens);
#   vision tower per image of P patches (frame-local, non-causal attention):
#       2 * P * (C*p*p * D + depth * (4 D^2 + 2 D I)) + 2 * 2 * depth * D * P^2,
#   resampler per image of P/4 merged tokens: 2 * P/4 * (2 (4D)^2 + 8D * 4D + (4D)^2 + 4D * H).
# Training = 3 x forward, as for text.
def _vl_layer_params(cfg, kind: str, modality: int) -> int:
  h = cfg.hidden_size
  attn = _attn_params(cfg)
  if kind == "moe":
    shared = 3 * h * cfg.moe_intermediate_size[0] * cfg.moe_num_shared_experts
    return attn + h * cfg.moe_num_experts + 3 * h * cfg.moe_intermediate_size[modality] * cfg.moe_k + shared
  return attn + 3 * h * cfg.intermediate_size


def vl_active_matmul_params(cfg, modality: int = 0) -> int:
  """Matmul weights of the language model used per token of a modality (0 text, 1 vision)."""
  return sum(_vl_layer_params(cfg, k, modality) for k in cfg.layer_kinds) + cfg.hidden_size * cfg.vocab_size


def vl_vision_flops_per_image(cfg, grid) -> float:
  """Forward FLOPs of the vision tower + resampler for one image / video of patch grid (t, h, w)."""
  v = cfg.vision
  t, gh, gw = grid
  frame = gh * gw
  patches = t * frame
  d, merged = v.hidden_size, patches // v.spatial_merge_size ** 2
  vit = 2 * patches * (v.patch_dim * d + v.depth * (4 * d * d + 2 * d * v.intermediate_size))
  vit += 2 * 2 * v.depth * d * frame * patches
  wide = d * v.spatial_merge_size ** 2
  resampler = 2 * merged * (2 * wide * wide + 2 * wide * wide + wide * wide + wide * cfg.hidden_size)
  return float(vit + resampler)


def vl_total_params(cfg) -> int:
  """All parameters of the VL model (counted from its abstract state)."""
  model = nnx.eval_shape(lambda: Ernie45VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def figures(cfg, seq_len: int, rows: int, *, image_grid=None, images_per_row: int = 0) -> dict[str, float]:
  """model_params, active_params, train_flops_per_token and flops_per_step of a step over `rows`
  rows of `seq_len` tokens (ModelConfig, or VLConfig with its data layout)."""
  tokens = rows * seq_len
  if not cfg.is_vl:
    per_token = train_flops_per_token(cfg, seq_len)
    return {"model_params": total_params(cfg), "active_params": active_matmul_params(cfg),
            "train_flops_per_token": per_token, "flops_per_step": per_token * tokens}
  merge = cfg.vision.spatial_merge_size
  vision_per_row = images_per_row * (image_grid[0] * (image_grid[1] // merge) * (image_grid[2] // merge) + 2)
  text_per_row = seq_len - vision_per_row
  attn = _attn_flops_per_token(cfg, cfg.num_hidden_layers, seq_len)
  lm = rows * (text_per_row * (2.0 * vl_active_matmul_params(cfg, 0) + attn)
               + vision_per_row * (2.0 * vl_active_matmul_params(cfg, 1) + attn))
  per_step = 3.0 * (lm + rows * images_per_row * vl_vision_flops_per_image(cfg, image_grid))
  return {"model_params": vl_total_params(cfg), "active_params": vl_active_matmul_params(cfg, 0),
          "train_flops_per_token": per_step / tokens, "flops_per_step": per_step}
