"""ERNIE 4.5 VL conditional-generation model: vision tower + resampler + 3-D-RoPE MoE language model.

Forward: token embeddings, with the resampler's outputs written over the image (video) placeholder
positions in order of appearance; then the text model's decoder stack (`DecoderLM`: GQA attention,
here with 3-D RoPE angles, then a dense SwiGLU MLP or the MoE, here with two expert sets, text and
vision, selected per token by the vision mask), final RMSNorm and LM head; logits in fp32.

Host-side helpers (`prepare_inputs`) build the (t, h, w) positions and MoE token types from the
token ids and the static image / video grids; `forward` is a jitted entry point with the grids as
static arguments.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from ernie_jax.model.decoder import FFN
from ernie_jax.model.lm import DecoderLM
from ernie_jax.model.moe import VLRouterOutput, vl_expert_sets
from ernie_jax.model.vl import rope3d
from ernie_jax.config import VLConfig
from ernie_jax.model.vl.resampler import Resampler
from ernie_jax.model.vl.vision import VisionTransformer
from ernie_jax.parallel.sharding import constrain

Grid = Sequence[Sequence[int]]


@struct.dataclass
class VLOutput:
  logits: jax.Array  # [B, S, V] fp32
  hidden: jax.Array  # [B, S, H] last decoder layer output, before the final norm
  router: VLRouterOutput | None  # stacked over MoE layers: [L_moe, B*S, ...]
  vision_mask: jax.Array | None  # [B, S] bool: tokens routed to the vision experts (None: all text)
  cache: Any = None


def merge_embeddings(x: jax.Array, tokens: jax.Array, features: jax.Array, token_id: int) -> jax.Array:
  """Replace x[b, s] where tokens[b, s] == token_id by the next row of `features`.

  features [M, H]: one sequence for the whole batch, taken in row-major order over the batch (like the
  reference's masked_scatter). features [B, M, H]: per row -- row b's k-th placeholder takes features[b, k]
  (rows with a fixed number of image slots: rows that use fewer slots leave their trailing features unused,
  so an unused slot never shifts another row's images)."""
  mask = tokens == token_id
  if features.ndim == 3:
    idx = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, features.shape[1] - 1)
    rows = jnp.take_along_axis(features.astype(x.dtype), idx[..., None], axis=1)
    return jnp.where(mask[..., None], rows, x)
  idx = jnp.cumsum(mask.reshape(-1)) - 1
  rows = jnp.take(features.astype(x.dtype), jnp.clip(idx, 0, features.shape[0] - 1), axis=0)
  return jnp.where(mask[..., None], rows.reshape(x.shape), x)


class Ernie45VLForConditionalGeneration(DecoderLM):
  """The text model's decoder (`DecoderLM`) with the VL expert sets (text, vision) in its MoE
  layers and 3-D RoPE, plus the vision transformer and the resampler."""

  def __init__(self, cfg: VLConfig, *, rngs: nnx.Rngs):
    self._build(cfg, FFN(vl_expert_sets(cfg), None), rngs)
    pd = jnp.dtype(cfg.param_dtype)
    self.vision_model = VisionTransformer(cfg.vision, param_dtype=pd, dtype=jnp.dtype(cfg.dtype),
                                          init_std=cfg.initializer_range, remat=cfg.remat, rngs=rngs)
    self.resampler = Resampler(cfg, rngs=rngs)

  # ------------------------------------------------------------------------------------------------
  def _derive_positions(self, tokens, image_grid_thw, video_grid_thw, images: bool, videos: bool) -> jax.Array:
    """The (t, h, w) positions of image / video inputs given without positions (host-side, concrete ids)."""
    for given, grid, name in ((images, image_grid_thw, "image"), (videos, video_grid_thw, "video")):
      if given and grid is None:
        raise ValueError(f"{name} inputs without positions need {name}_grid_thw to derive the 3-D positions; "
                         "pass positions= (see prepare_inputs)")
    try:
      ids = np.asarray(tokens)
    except jax.errors.TracerArrayConversionError:
      raise ValueError("image / video inputs without positions: the 3-D (t, h, w) positions are derived from "
                       "the token ids, which are traced here (inside jit / grad); pass positions= and "
                       "token_types= from prepare_inputs(...), or call ernie_jax.model.vl.forward") from None
    prep = prepare_inputs(self.config, ids, image_grid_thw=image_grid_thw if images else None,
                          video_grid_thw=video_grid_thw if videos else None)
    return jnp.asarray(prep["positions"], jnp.int32)

  def encode_vision(self, pixel_values: jax.Array, grid_thw: Grid) -> jax.Array:
    """Patches [N, C*p*p] of images / videos with static grids -> LM embeddings [M, hidden]."""
    return self.resampler(self.vision_model(pixel_values, grid_thw), grid_thw)

  def _encode(self, pixels: jax.Array, grid_thw: Grid, rows: int) -> jax.Array:
    """`encode_vision` of pixels [N, C*p*p] -> [M, hidden], or of per-row pixels [B, N_b, C*p*p] (grid_thw: the
    grids of all rows' images in order) -> [B, M_b, hidden] (merged per row, see `merge_embeddings`)."""
    if pixels.ndim != 3:
      return self.encode_vision(pixels, grid_thw)
    if pixels.shape[0] != rows:
      raise ValueError(f"per-row pixel values [B, N, C*p*p] need B = the batch size {rows}, got {pixels.shape}")
    feats = self.encode_vision(pixels.reshape(-1, pixels.shape[-1]), grid_thw)
    return feats.reshape(rows, -1, feats.shape[-1])

  def vision_mask(self, tokens: jax.Array) -> jax.Array:
    """Tokens the MoE routes to the vision experts: placeholders and image/video start/end tokens."""
    return jnp.isin(tokens, jnp.asarray(self.config.vision_token_ids, tokens.dtype))

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               token_types: jax.Array | None = None, text_only: bool = False,
               pixel_values: jax.Array | None = None, image_grid_thw: Grid | None = None,
               pixel_values_videos: jax.Array | None = None, video_grid_thw: Grid | None = None,
               image_embeds: jax.Array | None = None, video_embeds: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache=None,
               cache_positions: jax.Array | None = None) -> VLOutput:
    """tokens [B, S] -> VLOutput.

    positions: [B, S, 3] (t, h, w) from `prepare_inputs`. Default: text positions 0..S-1 without
      image / video inputs; with them (transformers' way of calling the model) the 3-D positions are
      derived here with `prepare_inputs` from the ids and grids, which needs concrete ids: under a
      jax transform (traced ids) pass positions explicitly, or use `forward`.
    token_types: [B, S] MoE modality (0 text, 1 image, 2 video); default: from the token ids (the
      placeholders and the image/video start/end tokens are vision). text_only=True routes every
      token as text and skips the vision experts (generated tokens).
    pixel_values / pixel_values_videos with their static grids (tuples of (t, h, w)), or
      precomputed image_embeds / video_embeds [M, hidden]: written over the image / video
      placeholder tokens in order. Per row instead: pixel values [B, N_b, C*p*p] (every row the same
      number of image slots; the grids list all B rows' slots in order) or embeds [B, M_b, hidden] --
      row b's placeholders take row b's features in order and unused trailing slots are ignored
      (training rows with a fixed image budget, `ernie_jax.data.vl_chat`).
    cache / cache_positions [B, S]: KV cache from `init_cache` and the cache slot of each token.
    """
    c = self.config
    b, s = tokens.shape
    if positions is None:
      vision_inputs = (pixel_values, pixel_values_videos, image_embeds, video_embeds)
      if all(v is None for v in vision_inputs):
        positions = rope3d.text_positions(b, s)
      else:
        positions = self._derive_positions(tokens, image_grid_thw, video_grid_thw,
                                           pixel_values is not None or image_embeds is not None,
                                           pixel_values_videos is not None or video_embeds is not None)
    if positions.shape != (b, s, 3):
      raise ValueError(f"positions must be [batch, seq, 3] (t, h, w), got {positions.shape}")
    x = self.embed_tokens(tokens)
    if pixel_values is not None:
      image_embeds = self._encode(pixel_values, image_grid_thw, b)
    if image_embeds is not None:
      x = merge_embeddings(x, tokens, image_embeds, c.image_token_id)
    if pixel_values_videos is not None:
      video_embeds = self._encode(pixel_values_videos, video_grid_thw, b)
    if video_embeds is not None:
      x = merge_embeddings(x, tokens, video_embeds, c.video_token_id)
    x = constrain(x, ("batch", "length", "act_embed"), self.sharding_rules)
    if text_only:
      vision = None
    elif token_types is None:
      vision = self.vision_mask(tokens)
    else:
      vision = token_types > 0
    if cache is not None and cache_positions is None:
      raise ValueError("cache_positions (the cache slot of every token) are required with a cache")
    slots = cache_positions if cache is not None else jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cos, sin = rope3d.mrope_angles(positions, c.head_dim, c.rope_theta, c.mrope_section)
    x, router, cache = self.decode_layers(x, cos, sin, slots, segment_ids, cache, vision=vision)
    return VLOutput(self.head(x), x, router, vision, cache)


# --------------------------------------------------------------------------------------------------
def static_grids(g) -> tuple[tuple[int, int, int], ...] | None:
  """Grids (t, h, w) as a hashable tuple of int triples (static jit arguments), or None."""
  if g is None:
    return None
  return tuple(tuple(int(v) for v in row) for row in np.asarray(g).reshape(-1, 3))


def prepare_inputs(cfg: VLConfig, input_ids, *, image_grid_thw=None, video_grid_thw=None,
                   attention_mask=None) -> dict[str, np.ndarray]:
  """Host-side inputs for the model: {"positions" [B, S, 3], "token_types" [B, S] (MoE modality,
  0 text / 1 image / 2 video, start/end tokens included), "rope_deltas" [B]}. Checks that the
  placeholder counts match the grids."""
  ids = np.asarray(input_ids)
  mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  v = cfg.vision
  for token, grids, name, video in ((cfg.image_token_id, static_grids(image_grid_thw), "image", False),
                                    (cfg.video_token_id, static_grids(video_grid_thw), "video", True)):
    have = int(((ids == token) & mask).sum())
    want = 0 if grids is None else sum(
      rope3d.tokens_per_grid(g, video, v) for g in grids)
    if have != want:
      raise ValueError(f"{have} {name} placeholder tokens (id {token}) but the {name} grids "
                       f"{list(grids or [])} need {want}")
  positions, deltas = rope3d.rope_index(
    ids, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
    image_grid_thw=static_grids(image_grid_thw), video_grid_thw=static_grids(video_grid_thw), attention_mask=mask,
    spatial_merge=v.spatial_merge_size, temporal_merge=v.temporal_merge_size)
  types = np.zeros(ids.shape, np.int32)
  types[np.isin(ids, [cfg.image_token_id, cfg.image_start_token_id, cfg.image_end_token_id])] = 1
  types[np.isin(ids, [cfg.video_token_id, cfg.video_start_token_id, cfg.video_end_token_id])] = 2
  types[~mask] = 0
  return {"positions": positions, "token_types": types, "rope_deltas": deltas}


@functools.partial(jax.jit, static_argnames=("graphdef", "image_grid", "video_grid", "text_only"))
def _forward_jit(state, tokens, positions, token_types, pixel_values, pixel_values_videos, *,
                 graphdef, image_grid, video_grid, text_only):
  model = nnx.merge(graphdef, state)
  return model(tokens, positions=positions, token_types=token_types, text_only=text_only,
               pixel_values=pixel_values, image_grid_thw=image_grid,
               pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid)


def forward(model: Ernie45VLForConditionalGeneration, input_ids, *, pixel_values=None,
            image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
            attention_mask=None, positions=None, token_types=None) -> VLOutput:
  """Jitted full forward from host inputs (compiled once per model structure, input shapes and
  grids). Positions and token types are built with `prepare_inputs` unless given."""
  ids = np.asarray(input_ids, np.int32)
  if positions is None or token_types is None:
    prep = prepare_inputs(model.config, ids, image_grid_thw=image_grid_thw,
                          video_grid_thw=video_grid_thw, attention_mask=attention_mask)
    positions = prep["positions"] if positions is None else positions
    token_types = prep["token_types"] if token_types is None else token_types
  if (pixel_values is None) != (image_grid_thw is None) or (pixel_values_videos is None) != (video_grid_thw is None):
    raise ValueError("pixel values and their grid_thw must be given together")
  graphdef, state = nnx.split(model)
  return _forward_jit(state, jnp.asarray(ids), jnp.asarray(positions, jnp.int32),
                      jnp.asarray(token_types, jnp.int32),
                      None if pixel_values is None else jnp.asarray(pixel_values),
                      None if pixel_values_videos is None else jnp.asarray(pixel_values_videos),
                      graphdef=graphdef, image_grid=static_grids(image_grid_thw), video_grid=static_grids(video_grid_thw),
                      text_only=False)

