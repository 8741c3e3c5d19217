"""Next-token selection from logits: greedy, temperature, top-k and nucleus (top-p) sampling.

Pure jax and jittable. `top_k` is static (it sets an array shape); `temperature` and `top_p` may be
Python numbers or traced scalars, so one compiled program can serve many sampling settings.

Order of operations (the usual one, as in transformers' logits warpers):
  1. temperature 0 -> greedy argmax (first index on ties); otherwise logits / temperature;
  2. top-k: keep the k largest logits (0 = off);
  3. top-p: keep the smallest set of the most likely remaining tokens whose probability mass is
     >= top_p (the most likely token is always kept);
  4. draw from the renormalised distribution over what is left.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

_NEG_INF = float("-inf")


def _is_static_number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_sampling_args(temperature, top_k, top_p) -> None:
  """Raise ValueError for settings that can never be valid (only checks Python numbers)."""
  if _is_static_number(temperature) and not temperature >= 0:  # also rejects NaN
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
  if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0:
    raise ValueError(f"top_k must be a non-negative Python int (0 = off), got {top_k!r}")
  if _is_static_number(top_p) and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")


def nucleus_mask(sorted_logits: jax.Array, top_p) -> jax.Array:
  """Boolean keep-mask for logits sorted in descending order along the last axis.

  A token is kept iff the probability mass of the tokens strictly before it is < top_p; that is
  the smallest prefix whose mass reaches top_p. The first (most likely) token is always kept.
  """
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p
  return keep.at[..., 0].set(True)


def sample(logits: jax.Array, rng: jax.Array, *, temperature=0.0, top_k: int = 0,
           top_p=1.0) -> jax.Array:
  """Pick one token per row of `logits` [B, V] -> int32 [B].

  rng: a jax PRNG key (`jax.random.key(seed)`, or a legacy `PRNGKey`); unused when greedy.
  temperature: 0 means greedy (argmax); may be a traced scalar (then greedy is selected with
    `jnp.where`, and both paths are computed).
  top_k: static Python int, 0 = off (k >= V is the same as off).
  top_p: nucleus threshold in (0, 1], 1 = off; may be a traced scalar.
  """
  check_sampling_args(temperature, top_k, top_p)
  if logits.ndim != 2:
    raise ValueError(f"logits must be [batch, vocab], got shape {logits.shape}")
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  static_t = _is_static_number(temperature)
  if static_t and temperature == 0:
    return greedy

  vocab = logits.shape[-1]
  t = jnp.asarray(temperature, jnp.float32)
  # Guard the division; rows of a traced temperature 0 are replaced by `greedy` below.
  x = logits / jnp.where(t > 0, t, 1.0)
  k = top_k if 0 < top_k < vocab else vocab
  use_top_p = not (_is_static_number(top_p) and top_p >= 1.0)
  if k < vocab or use_top_p:
    # Work on the k best candidates in descending order (a full sort when top-k is off).
    vals, idx = jax.lax.top_k(x, k)
    if use_top_p:
      vals = jnp.where(nucleus_mask(vals, top_p), vals, _NEG_INF)
    choice = jax.random.categorical(rng, vals, axis=-1)
    tokens = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  else:
    tokens = jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)
  if not static_t:
    tokens = jnp.where(t > 0, tokens, greedy)
  return tokens
