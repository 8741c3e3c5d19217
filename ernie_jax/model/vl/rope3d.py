"""Rotary embeddings of ERNIE 4.5 VL: 3-D RoPE in the language model, 2-D RoPE in the ViT, and the
construction of the (t, h, w) position ids (spec §4.2, §4.3; transformers `get_rope_index`).

Language model ("freq_allocation"): the head's D/2 interleaved pairs (slot i rotates dims 2i, 2i+1
with frequency theta^(-2i/D), as in the text model) are shared out between the three position axes:
the last `t` slots follow the temporal position, the first h + w slots alternate height (even i)
and width (odd i). Text tokens have t = h = w = their index, so this reduces to 1-D RoPE.

Position ids are built on the host (numpy) from the token ids and the image / video grids, because
they depend on the grids, which are static (they also fix the vision encoder's shapes).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ernie_jax.model.layers import inv_frequencies

T_AXIS, H_AXIS, W_AXIS = 0, 1, 2


def slot_axes(head_dim: int, mrope_section: Sequence[int]) -> np.ndarray:
  """[head_dim/2] position axis (0 = t, 1 = h, 2 = w) that drives each frequency slot."""
  h, w, t = mrope_section
  slots = np.arange(head_dim // 2)
  hw = np.where(slots % 2 == 0, H_AXIS, W_AXIS)
  return np.where(slots >= h + w, T_AXIS, hw).astype(np.int32)


def mrope_angles(positions: jax.Array, head_dim: int, theta: float, mrope_section: Sequence[int]):
  """positions [B, S, 3] (t, h, w) -> cos, sin [B, S, head_dim/2] fp32 for `rope.apply_rope`."""
  axes = slot_axes(head_dim, mrope_section)
  pos = jnp.take(positions.astype(jnp.float32), jnp.asarray(axes), axis=-1)  # [B, S, D/2]
  angles = pos * inv_frequencies(head_dim, theta)
  return jnp.cos(angles), jnp.sin(angles)


# --------------------------------------------------------------------------------------------------
# Vision transformer: 2-D rotary with NeoX half rotation.
def vision_position_ids(grid_thw: Sequence[Sequence[int]], merge: int) -> np.ndarray:
  """[N, 2] (row, col) of every patch, in the 2x2-merge-block order the patches are stored in;
  repeated for every frame."""
  out = []
  for t, h, w in grid_thw:
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    out.append(np.tile(np.stack([rows, cols], -1), (t, 1)))
  return np.concatenate(out).astype(np.int32)


def vision_rope(pos_hw: jax.Array, head_dim: int, theta: float):
  """pos_hw [N, 2] -> cos, sin [N, head_dim]: head_dim/4 frequencies over head_dim/2, applied to
  rows then cols, the whole tiled twice (NeoX halves)."""
  quarter = head_dim // 2
  inv = 1.0 / (theta ** (jnp.arange(0, quarter, 2, dtype=jnp.int32).astype(jnp.float32) / quarter))
  f = pos_hw.astype(jnp.float32)[..., None] * inv  # [N, 2, D/4]
  emb = jnp.concatenate([f[:, 0], f[:, 1]], axis=-1)
  emb = jnp.concatenate([emb, emb], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """NeoX rotation of x [N, heads, D] with cos/sin [N, D]: x*cos + rotate_half(x)*sin, in fp32."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, None] + rot * sin[:, None]
  return out.astype(x.dtype)


# --------------------------------------------------------------------------------------------------
# Position ids of the language model.
def tokens_per_grid(grid: Sequence[int], video: bool, vision_cfg) -> int:
  """LM tokens (placeholders, resampler outputs) of one image / video grid (t, h, w) in patches:
  merged spatially by `spatial_merge_size` per side and, for a video, `temporal_merge_size` frames
  into one."""
  t, h, w = grid
  m = vision_cfg.spatial_merge_size
  return (t // vision_cfg.temporal_merge_size if video else t) * (h // m) * (w // m)


def rope_index(input_ids, *, image_token_id: int, video_token_id: int,
               image_grid_thw: Sequence[Sequence[int]] | None = None,
               video_grid_thw: Sequence[Sequence[int]] | None = None,
               attention_mask=None, spatial_merge: int = 2, temporal_merge: int = 2):
  """(positions [B, S, 3] int32 as (t, h, w), rope_deltas [B] int32).

  Text tokens (incl. the image/video start/end tokens) get (p, p, p) with p counting up. A run of
  image placeholders takes the next image grid (t, gh, gw) in order (over the whole batch, like
  the reference): token (ti, r, c) of the LLM grid (t, gh/2, gw/2) gets (p + ti, p + r, p + c),
  then p += max(gh, gw) / 2. Videos: t / 2 LLM frames. Padding (attention_mask 0) gets 0.
  rope_deltas: max position + 1 - number of real tokens; a token generated at cache slot s gets
  text position s + delta.
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
  mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  kinds = np.where(ids == image_token_id, 1, np.where(ids == video_token_id, 2, 0))
  grids = {1: list(image_grid_thw or ()), 2: list(video_grid_thw or ())}
  used = {1: 0, 2: 0}
  positions = np.zeros(ids.shape + (3,), np.int64)
  deltas = np.zeros((ids.shape[0],), np.int64)
  for b in range(ids.shape[0]):
    valid = np.nonzero(mask[b])[0]
    kind = kinds[b, valid]
    pos_rows, p, i = [], 0, 0
    while i < len(kind):
      j = i
      while j < len(kind) and kind[j] == kind[i]:
        j += 1
      if kind[i] == 0:
        ar = p + np.arange(j - i)
        pos_rows.append(np.stack([ar, ar, ar], -1))
        p += j - i
      else:
        name = "image" if kind[i] == 1 else "video"
        left = j - i
        while left > 0:  # consecutive images without separators consume several grids
          if used[kind[i]] >= len(grids[kind[i]]):
            raise ValueError(f"row {b}: more {name} placeholder tokens than {name} grids "
                             f"({len(grids[kind[i]])} given)")
          t, h, w = (int(v) for v in grids[kind[i]][used[kind[i]]])
          used[kind[i]] += 1
          gt = t // temporal_merge if kind[i] == 2 else t
          gh, gw = h // spatial_merge, w // spatial_merge
          n = gt * gh * gw
          if n > left:
            raise ValueError(f"row {b}: a run of {j - i} {name} placeholder tokens does not match the "
                             f"{name} grids (grid {(t, h, w)} needs {n} tokens, {left} left)")
          tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
          pos_rows.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)], -1) + p)
          p += max(h, w) // spatial_merge
          left -= n
      i = j
    if pos_rows:
      rows = np.concatenate(pos_rows)
      positions[b, valid] = rows
      deltas[b] = rows.max() + 1 - len(valid)
  for kind, name in ((1, "image"), (2, "video")):
    if used[kind] != len(grids[kind]):
      raise ValueError(f"{len(grids[kind])} {name} grids given but the placeholders use {used[kind]}")
  return positions.astype(np.int32), deltas.astype(np.int32)


def text_positions(batch: int, seq: int, offset=0) -> jax.Array:
  """[B, S, 3] positions (p, p, p) with p = offset + 0..S-1 (offset scalar or [B])."""
  p = jnp.arange(seq, dtype=jnp.int32)[None, :] + jnp.asarray(offset, jnp.int32).reshape(-1, 1)
  p = jnp.broadcast_to(p, (batch, seq))
  return jnp.repeat(p[..., None], 3, axis=-1)
