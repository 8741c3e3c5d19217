"""Generation with images / videos for ERNIE 4.5 VL.

The prompts (token ids with the image / video placeholder runs, see `ernie_jax.data.vl_preprocess`) are
right-padded; their (t, h, w) positions, MoE token types and per-row rope deltas are built on the
host. One jitted program then prefills the prompts (vision tower + resampler features written over
the placeholders, vision tokens routed to the vision experts) and decodes in a `lax.while_loop`:
each new token is routed as text, is written to cache slot len_b + step - 1 and gets the text
position slot + rope_delta_b (as in transformers). Greedy by default; temperature / top-k / top-p
sampling as in `ernie_jax.infer.generate`; non-finite logits raise `NonFiniteLogitsError` as there.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.parallel import distributed
from ernie_jax.infer.generate import (LENGTH_BUCKET, Generation, _check_prompts, _check_stop_tokens,
                                      _round_up, all_finite, pad_prompts, raise_if_non_finite)
from ernie_jax.infer.sampling import check_sampling_args, sample
from ernie_jax.model.vl import rope3d
from ernie_jax.model.vl.lm_vl import prepare_inputs, static_grids


def _prefill(model, tokens, lengths, positions, types, pixel_values, videos, cache, image_grid, video_grid):
  b, s = tokens.shape
  slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  out = model(tokens, positions=positions, token_types=types, pixel_values=pixel_values,
              image_grid_thw=image_grid, pixel_values_videos=videos, video_grid_thw=video_grid,
              cache=cache, cache_positions=slots)
  last = out.hidden[jnp.arange(b), lengths - 1]
  return model.head(last[:, None, :])[:, 0], out.cache


def _step(model, tokens, slots, deltas, cache):
  """One generated token per row, routed as text, at cache slot `slots` and position slot + delta."""
  b = tokens.shape[0]
  positions = rope3d.text_positions(b, 1, slots + deltas)
  out = model(tokens[:, None], positions=positions, text_only=True, cache=cache,
              cache_positions=slots[:, None])
  return out.logits[:, 0], out.cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "greedy", "top_k", "use_top_p",
                                             "image_grid", "video_grid"))
def _generate_jit(state, tokens, lengths, positions, types, deltas, pixel_values, videos, max_new,
                  temperature, top_p, key, stops, *, graphdef, max_len, greedy, top_k, use_top_p,
                  image_grid, video_grid):
  b = tokens.shape[0]
  model = nnx.merge(graphdef, state)
  pad = model.config.pad_token_id

  def pick(logits, step):
    return sample(logits, jax.random.fold_in(key, step), temperature=0.0 if greedy else temperature,
                  top_k=top_k, top_p=top_p if use_top_p else 1.0)

  def is_stop(tok):
    return jnp.any(tok[:, None] == stops[None, :], axis=-1)

  cache = model.init_cache(b, max_len)
  logits, cache = _prefill(model, tokens, lengths, positions, types, pixel_values, videos, cache,
                           image_grid, video_grid)
  tok = pick(logits, 0)
  out = jnp.full((b, max_len), pad, jnp.int32).at[:, 0].set(tok)

  def cond(carry):
    step, _, finished, _, _, _, finite = carry
    return (step < max_new) & ~jnp.all(finished) & finite

  def body(carry):
    step, tok, finished, cache, out, st, finite = carry
    logits, cache = _step(nnx.merge(graphdef, st), tok, lengths + step - 1, deltas, cache)
    finite = finite & all_finite(logits, finished)
    new = jnp.where(finished, pad, pick(logits, step))
    out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
    return step + 1, new, finished | is_stop(new), cache, out, st, finite

  init = (jnp.int32(1), tok, is_stop(tok), cache, out, state, all_finite(logits))
  steps, _, _, _, out, _, finite = jax.lax.while_loop(cond, body, init)
  return out, steps, finite


def generate_vl_array(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                      pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                      video_grid_thw=None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      stop_tokens=None, seed: int = 0, max_len: int | None = None) -> Generation:
  """Like `generate_vl`, returning the padded `Generation` (tokens, lengths, steps)."""
  cfg = model.config
  ps = _check_prompts(prompts, cfg.vocab_size)
  check_sampling_args(temperature, top_k, top_p)
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if (pixel_values is None) != (image_grid_thw is None) or (pixel_values_videos is None) != (video_grid_thw is None):
    raise ValueError("pixel values and their grid_thw must be given together")
  stops = _check_stop_tokens(stop_tokens, cfg)
  longest = max(len(p) for p in ps)
  need = longest + max_new_tokens - 1
  if max_len is None:
    max_len = _round_up(need, LENGTH_BUCKET)
  elif max_len < need:
    raise ValueError(f"max_len={max_len} is too small: need {need} cache slots")
  seq = min(_round_up(longest, LENGTH_BUCKET), max_len)
  tokens, lengths = pad_prompts(ps, seq, cfg.pad_token_id)
  mask = np.arange(seq)[None] < lengths[:, None]
  prep = prepare_inputs(cfg, tokens, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                        attention_mask=mask)
  if int(prep["positions"].max()) + max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(f"positions up to {int(prep['positions'].max()) + max_new_tokens} exceed "
                     f"max_position_embeddings={cfg.max_position_embeddings}")
  greedy = temperature == 0
  graphdef, state = nnx.split(model)
  asarr = lambda a: None if a is None else jnp.asarray(a)
  out, steps, finite = _generate_jit(
    state, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(prep["positions"]),
    jnp.asarray(prep["token_types"]), jnp.asarray(prep["rope_deltas"]), asarr(pixel_values),
    asarr(pixel_values_videos), jnp.int32(max_new_tokens), jnp.float32(temperature), jnp.float32(top_p),
    jax.random.key(seed), jnp.asarray(stops), graphdef=graphdef, max_len=int(max_len), greedy=bool(greedy),
    top_k=int(top_k), use_top_p=bool(not greedy and top_p < 1.0), image_grid=static_grids(image_grid_thw),
    video_grid=static_grids(video_grid_thw))
  raise_if_non_finite(finite, model)
  out = np.array(distributed.host_value(out))[:, :max_new_tokens]
  steps = int(steps)
  hit = np.isin(out, stops) & (np.arange(out.shape[1]) < steps)[None]
  n = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, steps).astype(np.int32)
  out[np.arange(out.shape[1])[None] >= n[:, None]] = cfg.pad_token_id
  return Generation(out, n, steps)


def generate_vl(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, **kwargs) -> list[list[int]]:
  """New tokens for each prompt (a list of token-id lists with image / video placeholder runs).

  pixel_values [N, C*14*14] + image_grid_thw [(t, h, w), ...] for all images of all prompts in
  order (likewise pixel_values_videos / video_grid_thw); see `ernie_jax.data.vl_preprocess`.
  Other arguments as in `ernie_jax.infer.generate.generate`.
  """
  return generate_vl_array(model, prompts, max_new_tokens=max_new_tokens, **kwargs).to_lists()
