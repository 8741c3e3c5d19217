"""Grouped-query causal self-attention with interleaved RoPE, segment masking and a KV cache.

Two modes share one code path:
* no cache (training / scoring): keys are the sequence itself; token s sees token t iff t <= s and
  both belong to the same segment (packed documents never attend to each other);
* with a cache (generation): k/v are written into preallocated slots at their absolute positions
  (per batch row, so prompts of different lengths decode together) and a query at position p sees
  slots 0..p.

q/k/v/o may carry LoRA branches (`lora_ops`, added by `ernie_jax.model.lora.apply_lora`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from ernie_jax.model import attention_kernels, fp8
from ernie_jax.model.layers import make_param, normal
from ernie_jax.model.layers import apply_rope
from ernie_jax.model.lora_ops import adapter, add
from ernie_jax.parallel.sharding import constrain

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class KVCache(NamedTuple):
  """One layer's cache: k, v of shape [batch, max_len, kv_heads, head_dim]."""

  k: jax.Array
  v: jax.Array


def full_mask(segment_ids: jax.Array | None, batch: int, seq: int) -> jax.Array:
  """[B, S, S] boolean: causal by index, and within the same segment when segment_ids is given."""
  idx = jnp.arange(seq)
  mask = (idx[None, :] <= idx[:, None])[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return jnp.broadcast_to(mask, (batch, seq, seq))


def cache_mask(positions: jax.Array, max_len: int) -> jax.Array:
  """[B, S, T] boolean: a query at absolute position p sees cache slots 0..p."""
  return jnp.arange(max_len)[None, None, :] <= positions[:, :, None]


def _heads_major(q: jax.Array, k: jax.Array, v: jax.Array):
  """q [B,S,N,D] -> [B,K,G,S,D] (N = K*G query heads grouped by their kv head), k/v [B,T,K,D] -> [B,K,T,D]:
  the layout in which both attention matmuls are plain batched matmuls (no transposes per block)."""
  b, s, n, d = q.shape
  kv = k.shape[2]
  qh = q.reshape(b, s, kv, n // kv, d).transpose(0, 2, 3, 1, 4)
  return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _attend_heads_major(qh: jax.Array, kh: jax.Array, vh: jax.Array, mask: jax.Array) -> jax.Array:
  """qh [B,K,G,S,D], kh/vh [B,K,T,D], mask [B,S,T] -> [B,K,G,S,D]; scores and softmax in fp32."""
  b, kv, g, s, d = qh.shape
  t = kh.shape[2]
  scores = jnp.einsum("bkqd,bktd->bkqt", qh.reshape(b, kv, g * s, d), kh, preferred_element_type=jnp.float32)
  scores = scores.reshape(b, kv, g, s, t) * (d ** -0.5)
  scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(vh.dtype).reshape(b, kv, g * s, t)
  return jnp.einsum("bkqt,bktd->bkqd", probs, vh).reshape(b, kv, g, s, d)


def _tokens_major(oh: jax.Array) -> jax.Array:
  """[B,K,G,S,D] -> [B,S,N,D]."""
  b, kv, g, s, d = oh.shape
  return oh.transpose(0, 3, 1, 2, 4).reshape(b, s, kv * g, d)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """q [B,S,N,D], k/v [B,T,K,D] (N = K*G), mask [B,S,T] -> [B,S,N,D].

  Scores and softmax in fp32; probabilities are cast to v.dtype before the value matmul.
  """
  return _tokens_major(_attend_heads_major(*_heads_major(q, k, v), mask))


def query_chunk(seq: int) -> int:
  """Queries per block of `causal_attend`: 64 up to 2048 tokens, then seq / 32 (at most 32 unrolled blocks).
  (On a CPU, 64 was the fastest of 32..256 for a 0.3B layer at 512 tokens: 43 ms vs 53 ms at 128.)"""
  return 64 if seq <= 2048 else seq // 32


def causal_attend(q, k, v, segment_ids: jax.Array | None, chunk: int | None = None) -> jax.Array:
  """Causal (+segment) attention over the sequence itself, skipping fully masked blocks.

  Queries are processed in static chunks; chunk i only reads keys [0, end of chunk i), which
  saves about half the work of a dense S x S attention for long sequences.
  """
  b, s = q.shape[:2]
  chunk = chunk or query_chunk(s)
  if s <= chunk or s % chunk:
    return attend(q, k, v, full_mask(segment_ids, b, s))
  qh, kh, vh = _heads_major(q, k, v)
  outs = []
  for start in range(0, s, chunk):
    end = start + chunk
    qi = jnp.arange(start, end)[:, None]
    mask = (jnp.arange(end)[None, :] <= qi)[None]
    if segment_ids is not None:
      mask = mask & (segment_ids[:, start:end, None] == segment_ids[:, None, :end])
    mask = jnp.broadcast_to(mask, (b, chunk, end))
    outs.append(_attend_heads_major(qh[:, :, :, start:end], kh[:, :, :end], vh[:, :, :end], mask))
  return _tokens_major(jnp.concatenate(outs, axis=3))


class _AttnFp8(nnx.Module):
  def __init__(self, recipe: fp8.Fp8Recipe):
    self.q, self.k, self.v, self.o = (fp8.make_dot(recipe) for _ in range(4))


class Attention(nnx.Module):
  def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               param_dtype, dtype, init_std: float, rngs: nnx.Rngs, fp8_recipe: fp8.Fp8Recipe | None = None,
               impl: str = "xla"):
    init = normal(init_std)
    self.q = make_param(rngs, init, (hidden, num_heads, head_dim), param_dtype, ("embed", "heads", "head_dim"))
    self.k = make_param(rngs, init, (hidden, num_kv_heads, head_dim), param_dtype, ("embed", "kv_heads", "head_dim"))
    self.v = make_param(rngs, init, (hidden, num_kv_heads, head_dim), param_dtype, ("embed", "kv_heads", "head_dim"))
    self.o = make_param(rngs, init, (num_heads, head_dim, hidden), param_dtype, ("heads", "head_dim", "embed"))
    self.dtype = dtype
    self.impl = impl  # training / scoring kernel (`attention_kernels`; model.attention_impl)
    self.fp8 = None if fp8_recipe is None else _AttnFp8(fp8_recipe)

  def _proj(self, name, eq, x, w, lora_eqs):
    """x @ w (FP8 or not) + the LoRA branch of `name` when it has one."""
    y = fp8.einsum(None if self.fp8 is None else getattr(self.fp8, name), eq, x, w)
    return add(y, x, adapter(self, name, self.dtype), *lora_eqs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, *, positions: jax.Array,
               segment_ids: jax.Array | None = None, cache: KVCache | None = None,
               cache_index=None, rules=None):
    """cache: one layer's KVCache [B, T, K, D], or, with `cache_index`, a stack [R, B, T, K, D] of
    which slice `cache_index` is this layer's (updated in place)."""
    d = self.dtype
    x = x.astype(d)
    qkv = ("bsh,hr->bsr", "bsr,rnd->bsnd")
    q = self._proj("q", "bsh,hnd->bsnd", x, self.q[...].astype(d), qkv)
    k = self._proj("k", "bsh,hnd->bsnd", x, self.k[...].astype(d), qkv)
    v = self._proj("v", "bsh,hnd->bsnd", x, self.v[...].astype(d), qkv)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    heads = ("batch", "length", "act_heads", None)
    q, k, v = (checkpoint_name(constrain(t, heads, rules), "qkv") for t in (q, k, v))
    b, s = x.shape[:2]
    if cache is None:
      impl = attention_kernels.resolve(self.impl)
      if impl == "xla":
        out = causal_attend(q, k, v, segment_ids)
      else:
        out = attention_kernels.fused_attend(impl, q, k, v, segment_ids, rules=rules)
    else:
      rows = jnp.arange(b)[:, None]
      at = (rows, positions) if cache_index is None else (cache_index, rows, positions)
      cache = KVCache(cache.k.at[at].set(k.astype(cache.k.dtype), mode="drop"),
                      cache.v.at[at].set(v.astype(cache.v.dtype), mode="drop"))
      ck, cv = (cache.k, cache.v) if cache_index is None else (cache.k[cache_index], cache.v[cache_index])
      mask = cache_mask(positions, ck.shape[1])
      out = attend(q, ck.astype(d), cv.astype(d), mask)
    o_eqs = ("bsnd,ndr->bsr", "bsr,rh->bsh")
    y = checkpoint_name(self._proj("o", "bsnd,ndh->bsh", out, self.o[...].astype(d), o_eqs), "attn_out")
    return y, cache
