"""Rotary position embedding with ERNIE's interleaved (GPT-J) pairing (spec §2).

Pair (2i, 2i+1) of each head is rotated by angle pos * theta^(-2i/d). This is NOT the NeoX
half-rotation; the checkpoints' q/k rows are laid out for the interleaved form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inv_frequencies(head_dim: int, theta: float) -> jax.Array:
  exponent = jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / head_dim
  return 1.0 / (theta ** exponent)


def rope_angles(positions: jax.Array, head_dim: int, theta: float, compression_ratio: float = 1.0):
  """cos, sin of shape [..., head_dim // 2] (fp32) for integer `positions` of shape [...]."""
  pos = positions.astype(jnp.float32) / compression_ratio
  angles = pos[..., None] * inv_frequencies(head_dim, theta)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate x [B, S, N, D] with cos/sin [B, S, D/2]; computed in fp32, returned in x.dtype."""
  xf = x.astype(jnp.float32)
  x0, x1 = xf[..., 0::2], xf[..., 1::2]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)
