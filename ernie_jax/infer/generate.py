"""Batched autoregressive generation with a preallocated KV cache.

How a batch of prompts of different lengths is decoded:
* prompts are RIGHT-padded (with the pad token) to a common, bucketed length and prefilled with
  positions 0..S-1; each row's first new token comes from the logits at its own last prompt token
  (the outputs of padded queries are never used);
* row b then decodes its t-th new token at absolute position len_b + t - 1: the attention cache
  writes k/v at slot = position (overwriting the pad slots) and a query at position p sees slots
  0..p, so pad garbage is never attended to;
* a row that produced a stop token is finished: it keeps emitting the pad token, and the loop
  stops as soon as every row is finished (or after `max_new_tokens`).

The whole generation (prefill, then a `lax.while_loop` of single-token decode steps with on-device
sampling) is one jitted program, so there is no host round trip per token. Compiled programs are
cached by jax.jit on the model's graph definition and the static settings (batch, bucketed prompt
and cache lengths, top_k, whether sampling / top-p is on); the model weights, temperature, top_p,
seed, max_new_tokens and stop tokens are runtime arguments and never trigger a recompile.

Non-finite logits (a NaN / Inf weight, an overflow) never pass silently: the loop carries one flag,
"every logit of every unfinished row was finite", and `generate` / `generate_array` raise
`NonFiniteLogitsError` (a ValueError, one line) when it is false; the tokens are not returned.

The lower-level pieces `prefill` and `decode_step` (jitted, cache donated) are exposed for tests and
custom loops; `generate` uses the same step functions inside its loop.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.parallel import distributed
from ernie_jax.infer.sampling import check_sampling_args, sample
from ernie_jax.parallel.sharding import batch_shards

class NonFiniteLogitsError(ValueError):
  """The model produced NaN / Inf logits during generation (its weights or inputs are broken)."""


def all_finite(logits: jax.Array, finished: jax.Array | None = None) -> jax.Array:
  """Scalar bool: every logit [B, V] of the rows not `finished` [B] is finite."""
  ok = jnp.isfinite(logits)
  if finished is not None:
    ok = ok | finished[:, None]
  return jnp.all(ok)


def raise_if_non_finite(finite, model) -> None:
  """The one-line error for a generation whose `finite` flag came back false."""
  if not bool(finite):
    raise NonFiniteLogitsError(
      f"the model produced non-finite (NaN/Inf) logits while generating ({type(model).__name__}, "
      f"dtype {model.config.dtype}): a weight holds NaN/Inf or the activations overflow; check the "
      "checkpoint (loading warns about non-finite parameters) or generate in float32")


# Prompt and cache lengths are rounded up to a multiple of this, so nearby lengths share a program.
LENGTH_BUCKET = 16


# --------------------------------------------------------------------------------------------------
# Step functions (traced; shared by the exposed jitted pieces and the fused loop).
def _prefill_impl(model, tokens, lengths, cache):
  """tokens [B, S] right-padded, lengths [B] -> (logits [B, V] at each row's last token, cache)."""
  b, s = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  out = model(tokens, positions=positions, cache=cache)
  # Only the hidden state is used: XLA drops the unused [B, S, V] logits, and the LM head runs on
  # one position per row.
  last = out.hidden[jnp.arange(b), lengths - 1]  # [B, H]
  logits = model.head(last[:, None, :])[:, 0]
  return logits, out.cache


def _step_impl(model, tokens, positions, cache):
  """tokens [B], positions [B] -> (logits [B, V], cache)."""
  out = model(tokens[:, None], positions=positions[:, None], cache=cache)
  return out.logits[:, 0], out.cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _prefill_jit(graphdef, state, tokens, lengths, cache):
  return _prefill_impl(nnx.merge(graphdef, state), tokens, lengths, cache)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _decode_step_jit(graphdef, state, tokens, positions, cache):
  return _step_impl(nnx.merge(graphdef, state), tokens, positions, cache)


def prefill(model, tokens, lengths, cache):
  """Run the prompts through the model, filling `cache`.

  tokens: [B, S] int, right-padded prompts; lengths: [B] true prompt lengths (1 <= len <= S);
  cache: from `model.init_cache(B, max_len)` with max_len >= S. The cache is donated: do not use
  the object you passed in afterwards, use the returned one.
  Returns (logits [B, V] fp32 predicting each row's next token, i.e. at position len_b - 1, cache).
  """
  graphdef, state = nnx.split(model)
  return _prefill_jit(graphdef, state, jnp.asarray(tokens, jnp.int32),
                      jnp.asarray(lengths, jnp.int32), cache)


def decode_step(model, tokens, positions, cache):
  """Feed one token per row: tokens [B] at absolute positions [B].

  Returns (logits [B, V] fp32 for the following token, cache). The cache is donated.
  """
  graphdef, state = nnx.split(model)
  return _decode_step_jit(graphdef, state, jnp.asarray(tokens, jnp.int32),
                          jnp.asarray(positions, jnp.int32), cache)


# --------------------------------------------------------------------------------------------------
# The fused generation program.
@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "greedy", "top_k", "use_top_p"))
def _generate_jit(state, tokens, lengths, max_new, temperature, top_p, key, stops, *, graphdef,
                  max_len, greedy, top_k, use_top_p):
  b = tokens.shape[0]
  model = nnx.merge(graphdef, state)
  pad = model.config.pad_token_id

  def pick(logits, step):
    return sample(logits, jax.random.fold_in(key, step),
                  temperature=0.0 if greedy else temperature, top_k=top_k,
                  top_p=top_p if use_top_p else 1.0)

  def is_stop(tok):
    return jnp.any(tok[:, None] == stops[None, :], axis=-1)

  cache = model.init_cache(b, max_len)
  logits, cache = _prefill_impl(model, tokens, lengths, cache)
  tok = pick(logits, 0)
  finite = all_finite(logits)
  out = jnp.full((b, max_len), pad, jnp.int32).at[:, 0].set(tok)
  finished = is_stop(tok)

  def cond(carry):
    step, _, finished, _, _, _, finite = carry
    return (step < max_new) & ~jnp.all(finished) & finite

  def body(carry):
    # The (loop-invariant) weights travel in the carry so the model is rebuilt from variables of
    # the loop's own trace level; nnx refuses graph nodes closed over from the outer trace.
    step, tok, finished, cache, out, st, finite = carry
    logits, cache = _step_impl(nnx.merge(graphdef, st), tok, lengths + step - 1, cache)
    finite = finite & all_finite(logits, finished)
    new = jnp.where(finished, pad, pick(logits, step))
    out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
    return step + 1, new, finished | is_stop(new), cache, out, st, finite

  init = (jnp.int32(1), tok, finished, cache, out, state, finite)
  steps, _, _, _, out, _, finite = jax.lax.while_loop(cond, body, init)
  return out, steps, finite


# --------------------------------------------------------------------------------------------------
def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_prompts(prompts, vocab_size: int) -> list[np.ndarray]:
  if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
    raise ValueError("prompts must be a list of prompts, each a list of token ids")
  if len(prompts) == 0:
    raise ValueError("prompts is empty: give at least one prompt (a list of token ids)")
  out = []
  for i, p in enumerate(prompts):
    if _is_int(p):
      raise ValueError("prompts must be a list of token-id lists; for a single prompt pass "
                       f"[[...]], got a flat list starting with {p!r}")
    if isinstance(p, (str, bytes)):
      raise ValueError(f"prompt {i} is a string; encode it with a tokenizer first "
                       "(ernie_jax.data.tokenizers.load_tokenizer)")
    try:
      a = np.asarray(p)
    except Exception as e:  # ragged nested lists and the like
      raise ValueError(f"prompt {i} is not a flat list of token ids: {e}") from None
    if a.ndim != 1:
      raise ValueError(f"prompt {i} must be a flat list of token ids, got shape {a.shape}")
    if a.size == 0:
      raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    if a.dtype.kind not in "iu":
      raise ValueError(f"prompt {i} must contain integer token ids, got dtype {a.dtype}")
    bad = (a < 0) | (a >= vocab_size)
    if bad.any():
      j = int(np.argmax(bad))
      raise ValueError(f"prompt {i} has token id {int(a[j])} at index {j}, outside the "
                       f"vocabulary [0, {vocab_size})")
    out.append(a.astype(np.int32))
  return out


def _check_stop_tokens(stop_tokens, cfg) -> np.ndarray:
  if stop_tokens is None:
    stop_tokens = (cfg.eos_token_id,)
  elif _is_int(stop_tokens):
    stop_tokens = (stop_tokens,)
  stops = list(stop_tokens)
  for t in stops:
    if not _is_int(t) or not 0 <= t < cfg.vocab_size:
      raise ValueError(f"stop token {t!r} is not a token id in [0, {cfg.vocab_size}); "
                       "pass stop_tokens=() to disable stopping")
  # An id that never occurs stands in for "no stop tokens" (the array must be non-empty).
  return np.asarray(stops or [-1], np.int32)


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
  """Right-pad prompts to `length` -> (tokens [B, length] int32, lengths [B] int32) numpy arrays."""
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  if lengths.max() > length:
    raise ValueError(f"a prompt has {lengths.max()} tokens, more than the padded length {length}")
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = np.asarray(p, np.int32)
  return tokens, lengths


@dataclasses.dataclass(frozen=True)
class Generation:
  """Padded result of `generate_array`.

  tokens: [B, max_new_tokens] int32 new tokens; after a row's stop token (included) and past the
    end of the loop the row holds the pad token.
  lengths: [B] number of valid new tokens per row (up to and including the first stop token).
  steps: tokens generated per row before the loop ended (< max_new_tokens iff every row stopped).
  """

  tokens: np.ndarray
  lengths: np.ndarray
  steps: int

  def to_lists(self) -> list[list[int]]:
    return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def generate_array(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   stop_tokens: Sequence[int] | int | None = None, seed: int = 0,
                   max_len: int | None = None) -> Generation:
  """Like `generate`, but returns the padded token array, per-row lengths and the step count."""
  cfg = model.config
  ps = _check_prompts(prompts, cfg.vocab_size)
  if not _is_int(max_new_tokens) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
  check_sampling_args(temperature, top_k, top_p)
  if not _is_int(seed):
    raise ValueError(f"seed must be an int, got {seed!r}")
  stops = _check_stop_tokens(stop_tokens, cfg)
  if max_new_tokens == 0:
    return Generation(np.zeros((len(ps), 0), np.int32), np.zeros((len(ps),), np.int32), 0)

  n_rows = len(ps)
  ps = ps + [ps[-1]] * (-n_rows % batch_shards(model.sharding_rules))  # rows the mesh does not divide: padded
  longest = max(len(p) for p in ps)
  need = longest + max_new_tokens - 1  # cache slots written: the last new token is never fed back
  if need > cfg.max_position_embeddings:
    raise ValueError(f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) - 1 = "
                     f"{need} exceeds max_position_embeddings={cfg.max_position_embeddings}")
  if max_len is None:
    max_len = min(_round_up(need, LENGTH_BUCKET), cfg.max_position_embeddings)
  elif not _is_int(max_len) or max_len < need:
    raise ValueError(f"max_len={max_len!r} is too small: the longest prompt ({longest} tokens) plus "
                     f"max_new_tokens ({max_new_tokens}) needs {need} cache slots "
                     "(longest + max_new_tokens - 1)")
  seq = min(_round_up(longest, LENGTH_BUCKET), max_len)
  tokens, lengths = pad_prompts(ps, seq, cfg.pad_token_id)

  greedy = temperature == 0
  graphdef, state = nnx.split(model)
  out, steps, finite = _generate_jit(
    state, jnp.asarray(tokens), jnp.asarray(lengths), jnp.int32(max_new_tokens),
    jnp.float32(temperature), jnp.float32(top_p), jax.random.key(seed), jnp.asarray(stops),
    graphdef=graphdef, max_len=int(max_len), greedy=bool(greedy), top_k=int(top_k),
    use_top_p=bool(not greedy and top_p < 1.0))
  raise_if_non_finite(finite, model)
  out = np.array(distributed.host_value(out))[:, :max_new_tokens]
  steps = int(steps)
  hit = np.isin(out, stops) & (np.arange(out.shape[1]) < steps)[None]
  n = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, steps).astype(np.int32)
  out[np.arange(out.shape[1])[None] >= n[:, None]] = cfg.pad_token_id
  return Generation(out[:n_rows], n[:n_rows], steps)


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] | int | None = None, seed: int = 0,
             max_len: int | None = None) -> list[list[int]]:
  """Generate continuations for a batch of token-id prompts (of any, possibly different, lengths).

  Returns the NEW tokens of each prompt (the prompt is not repeated). Generation of a row ends
  after its first stop token, which IS included in its output (like transformers' `generate`);
  rows without a stop token get exactly `max_new_tokens` tokens. Raises `NonFiniteLogitsError`
  when the model produces NaN / Inf logits.

  temperature: 0 = greedy (default); top_k: 0 = off; top_p: 1 = off (see `sampling.sample`).
  stop_tokens: ids that end a row; None (default) = (config.eos_token_id,), () = never stop early.
  seed: sampling seed (ignored when greedy); the same seed and inputs give the same output.
  max_len: KV-cache length; at least longest prompt + max_new_tokens - 1. Default: that, rounded
    up to a multiple of LENGTH_BUCKET (capped at max_position_embeddings).
  """
  return generate_array(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, seed=seed,
                        max_len=max_len).to_lists()
