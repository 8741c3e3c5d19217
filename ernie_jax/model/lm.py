"""ERNIE 4.5 causal language models.

`DecoderLM` is the part the text and the VL model share: token embedding, the scanned decoder layer
groups (`decoder.py`, FFNs per an `FFN` spec), final RMSNorm and LM head (tied to the embedding by
default; logits in fp32), the KV cache layout, `layer(i)` and the router outputs in layer order.
`ErnieForCausalLM` is the text model (dense or MoE, 1-D RoPE) with optional multi-token-prediction
modules; the VL model (`ernie_jax.model.vl.lm_vl`) adds the vision encoder and a second expert set.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ernie_jax.config import ModelConfig
from ernie_jax.model.attention import KVCache
from ernie_jax.model.decoder import FFN, DecoderLayer, LayerGroup, layer_groups, layer_locations, text_ffn
from ernie_jax.model.layers import RMSNorm, make_param, normal, rope_angles
from ernie_jax.model.moe.router import RouterOutput
from ernie_jax.parallel.sharding import batch_shards, constrain


@struct.dataclass
class CausalLMOutput:
  logits: jax.Array  # [B, S, V] fp32
  hidden: jax.Array  # [B, S, H] last decoder layer output, before the final norm (MTP input)
  router: RouterOutput | None  # stacked over MoE layers in layer order: [L_moe, B*S, ...]
  cache: Any = None  # updated KV cache when one was given


class MTPLayer(nnx.Module):
  """One multi-token-prediction depth (spec §3.5):
  h_d = block_d(proj_d(concat[emb_norm_d(Embed(tokens shifted by d+1)), hidden_norm_d(h_{d-1})]))."""

  def __init__(self, cfg: ModelConfig, depth: int, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    h = cfg.hidden_size
    self.emb_norm = RMSNorm(h, cfg.rms_norm_eps, pd)
    self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps, pd)
    self.proj = make_param(rngs, normal(cfg.initializer_range), (2 * h, h), pd, (None, "embed"))
    kind = "moe" if cfg.is_moe_layer(depth) else "dense"
    self.block = DecoderLayer(cfg, kind, rngs=rngs)


class DecoderLM(nnx.Module):
  """Embedding, decoder layer groups, final norm and LM head (subclasses call `_build` first).

  `sharding_rules`: the logical-axis rules of the activation constraints (None: DEFAULT_RULES; set
  with `ernie_jax.parallel.sharding.with_rules`)."""

  sharding_rules = None

  def _build(self, cfg, ffn: FFN, rngs: nnx.Rngs):
    self.config = cfg
    pd = jnp.dtype(cfg.param_dtype)
    std = cfg.initializer_range
    self.embed = make_param(rngs, normal(std), (cfg.vocab_size, cfg.hidden_size), pd, ("vocab", "embed"))
    self.groups = nnx.List([LayerGroup(cfg, unit, reps, rngs=rngs, ffn=ffn)
                            for unit, reps in layer_groups(cfg.layer_kinds)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    self.lm_head = (None if cfg.tie_word_embeddings else
                    make_param(rngs, normal(std), (cfg.hidden_size, cfg.vocab_size), pd, ("embed", "vocab")))

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embed[...], tokens, axis=0).astype(self.config.dtype)

  def head(self, h: jax.Array) -> jax.Array:
    return lm_logits(self, h)

  def decode_layers(self, x, cos, sin, positions, segment_ids=None, cache=None, **ffn_inputs):
    """x [B, S, H] through every layer group -> (x, routers stacked in layer order or None,
    updated cache or None). positions: each token's cache slot."""
    routers, new_cache = [], []
    for g, group in enumerate(self.groups):
      x, c, r = group(x, cos, sin, positions, segment_ids, None if cache is None else cache[g],
                      self.sharding_rules, **ffn_inputs)
      new_cache.append(c)
      routers.extend(_layer_major(r))
    router = None
    if routers:
      router = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *routers)
    return x, router, None if cache is None else tuple(new_cache)

  def layer(self, i: int) -> DecoderLayer:
    """A standalone copy of decoder layer i (sliced out of its scanned group), for inspection."""
    g, r, j = layer_locations(self.config.layer_kinds)[i]
    graphdef, state = nnx.split(self.groups[g].blocks)
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[r], state))
    return block.layers[j]

  def init_cache(self, batch: int, max_len: int, dtype=None):
    """Zeroed KV cache for `batch` rows of up to `max_len` positions (matches the layer groups)."""
    c = self.config
    dtype = jnp.dtype(dtype or c.dtype)
    shape = lambda reps: (reps, batch, max_len, c.num_key_value_heads, c.head_dim)
    return tuple(
      tuple(KVCache(jnp.zeros(shape(g.repeats), dtype), jnp.zeros(shape(g.repeats), dtype))
            for _ in g.unit)
      for g in self.groups)


class ErnieForCausalLM(DecoderLM):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self._build(cfg, text_ffn(cfg), rngs)
    self.mtp = (nnx.List([MTPLayer(cfg, d, rngs=rngs) for d in range(cfg.num_mtp_layers)])
                if cfg.num_mtp_layers else None)

  def _rope(self, positions):
    c = self.config
    return rope_angles(positions, c.head_dim, c.rope_theta, c.rope_compression_ratio)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache=None) -> CausalLMOutput:
    """tokens [B, S] int -> logits [B, S, V].

    positions: [B, S] absolute positions (default 0..S-1). segment_ids: [B, S] document ids for
    packed sequences (attention never crosses documents). cache: from `init_cache`, for decoding.
    """
    _check_tokens(tokens, "tokens")
    b, s = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    _check_same_shape(positions, tokens, "positions")
    if segment_ids is not None:
      _check_same_shape(segment_ids, tokens, "segment_ids")
    if segment_ids is not None and cache is not None:
      raise ValueError("segment_ids (packed documents) cannot be combined with a KV cache")
    pad = -b % batch_shards(self.sharding_rules) if cache is None else 0
    if pad:  # rows the mesh does not divide (e.g. inference on 2 rows over 8 data shards): padded, then dropped
      rows = lambda a, fill: jnp.pad(a, ((0, pad), (0, 0)), constant_values=fill)  # noqa: E731
      out = self(rows(tokens, self.config.pad_token_id), rows(positions, 0),
                 rows(jnp.ones_like(tokens) if segment_ids is None else segment_ids, 0))
      return unpad_rows(out, b, s)
    cos, sin = self._rope(positions)
    x = constrain(self.embed_tokens(tokens), ("batch", "length", "act_embed"), self.sharding_rules)
    x, router, cache = self.decode_layers(x, cos, sin, positions, segment_ids, cache)
    return CausalLMOutput(self.head(x), x, router, cache)

  def mtp_hidden(self, tokens: jax.Array, hidden: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> list[jax.Array]:
    """The last hidden state of each MTP depth d (before the final norm; `head` gives its logits):
    position t of depth d predicts token t + d + 2.

    `hidden` is `CausalLMOutput.hidden`. Embeddings past the end use the pad token (those
    positions have no target and must be masked by the loss).
    """
    if self.mtp is None:
      return []
    b, s = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cos, sin = self._rope(positions)
    pad = self.config.pad_token_id
    out, h = [], hidden
    for d, m in enumerate(self.mtp):
      shifted = jnp.concatenate([tokens[:, d + 1:], jnp.full((b, d + 1), pad, tokens.dtype)], axis=1)
      e = m.emb_norm(self.embed_tokens(shifted))
      z = jnp.concatenate([e, m.hidden_norm(h.astype(e.dtype))], axis=-1)
      z = z @ m.proj[...].astype(z.dtype)
      h, _, _ = m.block(z, cos, sin, positions=positions, segment_ids=segment_ids, rules=self.sharding_rules)
      out.append(h)
    return out

  def mtp_logits(self, tokens: jax.Array, hidden: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> list[jax.Array]:
    """Logits of each MTP depth (`mtp_hidden` through the final norm and LM head)."""
    return [self.head(h) for h in self.mtp_hidden(tokens, hidden, positions, segment_ids)]


def unpad_rows(out: CausalLMOutput, b: int, s: int) -> CausalLMOutput:
  """The first `b` rows of an output computed on padded rows (router outputs: the first b*s tokens;
  `dropped` keeps its count over all rows)."""
  router = out.router
  if router is not None:
    router = jax.tree.map(lambda a: a[:, :b * s] if a.ndim >= 2 else a, router)
  return out.replace(logits=out.logits[:b], hidden=out.hidden[:b], router=router)


def head_parts(model, h: jax.Array) -> tuple[jax.Array, jax.Array, bool]:
  """(final-normed h in the compute dtype [B, S, H], the LM head weight, whether it is vocab-major): the
  head's weight is the embedding [V, H] when tied (`model.lm_head` None), else `lm_head` [H, V]."""
  y = model.norm(h).astype(jnp.dtype(model.config.dtype))
  if model.lm_head is None:
    return y, model.embed[...], True
  return y, model.lm_head[...], False


def lm_logits(model, h: jax.Array) -> jax.Array:
  """Final norm + LM head (`head_parts`); logits in fp32."""
  y, w, vocab_major = head_parts(model, h)
  b, s, hidden = y.shape
  y = y.reshape(b * s, hidden)  # a 2-D matmul: its weight gradient is ~12% faster on XLA:CPU than over [B, S]
  logits = jnp.einsum("th,vh->tv" if vocab_major else "th,hv->tv", y, w.astype(y.dtype),
                      preferred_element_type=jnp.float32)
  return constrain(logits.reshape(b, s, -1), ("batch", "length", "act_vocab"), model.sharding_rules)


def _layer_major(routers: tuple[RouterOutput, ...]) -> list[RouterOutput]:
  """A group yields one stacked [R, ...] output per MoE position of its unit; return layer order."""
  if not routers:
    return []
  stacked = jax.tree.map(lambda *a: jnp.stack(a, axis=1), *routers)  # [R, P, ...]
  return [jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), stacked)]


def _check_tokens(tokens, name):
  if not hasattr(tokens, "ndim") or tokens.ndim != 2:
    raise ValueError(f"{name} must be an int array [batch, seq], got shape {getattr(tokens, 'shape', None)}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{name} must be integer token ids, got dtype {tokens.dtype}")


def _check_same_shape(a, tokens, name):
  if a.shape != tokens.shape:
    raise ValueError(f"{name} shape {a.shape} must equal tokens shape {tokens.shape}")
