"""Decoder layers and the scanned layer stack, shared by the text and the VL model.

The layer list (dense / MoE per the config's layer rule) is compressed into groups of a repeated
unit, e.g. 21B: [dense] x1, [moe] x27; interval 2: [dense, moe] x n. Each group's parameters are
stacked along a leading "layers" axis and applied with `nnx.scan`, so compile time does not grow
with depth.

The FFN of a layer is given by an `FFN` spec: a dense SwiGLU MLP, or the MoE block with the spec's
expert sets (text: one set; VL: text and vision). Extra FFN inputs (the VL vision mask) travel as
`**ffn_inputs` through the blocks and the scan.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.model import fp8
from ernie_jax.model.attention import Attention, KVCache
from ernie_jax.model.layers import MLP, RMSNorm
from ernie_jax.model.moe.block import ExpertSet, MoE, text_expert_sets
from ernie_jax.parallel.sharding import constrain

REMAT_POLICIES = {
  "full": None,
  "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  # + the routed experts' gate/up projections and per-assignment outputs, which are no plain dots (grouped
  # matmuls in loops / custom VJPs, ragged_dot, batched einsums): their backward does not redo the experts' forward
  "save_dots_experts": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names("moe_gate_up", "moe_expert_out")),
  # ERNIE-style fine-grained recomputation: keep the named matmul outputs, recompute the rest
  # (names are set with jax.ad_checkpoint.checkpoint_name in attention.py / layers.py / moe/block.py; the
  # routed experts' in moe/dispatch.py, moe/expert_loop.py and moe/transports/).
  "save_qkv": jax.checkpoint_policies.save_only_these_names("qkv"),
  "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
  "save_mlp": jax.checkpoint_policies.save_only_these_names("mlp_hidden", "mlp_out", "moe_out"),
  "save_qkv_attn_out": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
}


class FFN(NamedTuple):
  """How a model builds its layers' FFNs: the MoE expert sets and the FP8 recipe (None: no FP8)."""

  expert_sets: tuple[ExpertSet, ...]
  fp8: fp8.Fp8Recipe | None = None


def text_ffn(cfg) -> FFN:
  return FFN(text_expert_sets(cfg), fp8.Fp8Recipe.of(cfg))


class DecoderLayer(nnx.Module):
  """x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x)) with FFN a SwiGLU MLP or the MoE block."""

  def __init__(self, cfg, kind: str, *, rngs: nnx.Rngs, ffn: FFN | None = None):
    ffn = text_ffn(cfg) if ffn is None else ffn
    pd, d = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    self.attn = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                          cfg.head_dim, param_dtype=pd, dtype=d, init_std=cfg.initializer_range,
                          rngs=rngs, fp8_recipe=ffn.fp8, impl=cfg.attention_impl)
    self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    if kind == "moe":
      self.mlp = MoE(cfg, ffn.expert_sets, fp8_recipe=ffn.fp8, rngs=rngs)
    else:
      self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, param_dtype=pd, dtype=d,
                     init_std=cfg.initializer_range, rngs=rngs, fp8_recipe=ffn.fp8)
    self.kind = kind

  def __call__(self, x, cos, sin, *, positions, segment_ids=None, cache: KVCache | None = None,
               cache_index=None, rules=None, **ffn_inputs):
    """ffn_inputs: extra MoE inputs (the VL model's `vision` mask). rules: sharding rules of the
    activation constraints (None: DEFAULT_RULES)."""
    h, cache = self.attn(self.input_norm(x), cos, sin, positions=positions,
                         segment_ids=segment_ids, cache=cache, cache_index=cache_index, rules=rules)
    x = x + h.astype(x.dtype)
    h = self.post_norm(x)
    router = None
    if self.kind == "moe":
      h, router = self.mlp(h, **ffn_inputs)
    else:
      h = self.mlp(h)
    return constrain(x + h.astype(x.dtype), ("batch", "length", "act_embed"), rules), cache, router


def layer_groups(kinds: Sequence[str], max_unit: int = 4) -> list[tuple[tuple[str, ...], int]]:
  """Greedy run-length compression of the layer kinds into (unit, repeats) groups."""
  groups, i, n = [], 0, len(kinds)
  while i < n:
    best_unit, best_reps = (kinds[i],), 1
    for q in range(1, max_unit + 1):
      unit = tuple(kinds[i:i + q])
      if len(unit) < q:
        break
      reps = 1
      while tuple(kinds[i + reps * q:i + (reps + 1) * q]) == unit:
        reps += 1
      if q > 1 and reps < 2:  # a longer unit only pays off when it repeats
        continue
      if reps * q > len(best_unit) * best_reps:
        best_unit, best_reps = unit, reps
    groups.append((best_unit, best_reps))
    i += len(best_unit) * best_reps
  return groups


def layer_locations(kinds: Sequence[str]) -> list[tuple[int, int, int]]:
  """For each layer index: (group, repeat, position in the unit)."""
  return [(g, r, j) for g, (unit, reps) in enumerate(layer_groups(kinds))
          for r in range(reps) for j in range(len(unit))]


class Block(nnx.Module):
  """One repetition of a group's unit: a few consecutive decoder layers."""

  def __init__(self, cfg, unit: tuple[str, ...], *, rngs: nnx.Rngs, ffn: FFN | None = None):
    self.layers = nnx.List([DecoderLayer(cfg, kind, rngs=rngs, ffn=ffn) for kind in unit])

  def __call__(self, x, cos, sin, positions, segment_ids, caches, index=None, rules=None, **ffn_inputs):
    new_caches, routers = [], []
    for j, layer in enumerate(self.layers):
      x, c, r = layer(x, cos, sin, positions=positions, segment_ids=segment_ids,
                      cache=None if caches is None else caches[j], cache_index=index, rules=rules, **ffn_inputs)
      new_caches.append(c)
      if r is not None:
        routers.append(r)
    return x, (None if caches is None else tuple(new_caches)), tuple(routers)


class LayerGroup(nnx.Module):
  """`repeats` stacked copies of a Block, applied with nnx.scan."""

  def __init__(self, cfg, unit: tuple[str, ...], repeats: int, *, rngs: nnx.Rngs, ffn: FFN | None = None):
    @nnx.split_rngs(splits=repeats)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return Block(cfg, unit, rngs=rngs, ffn=ffn)

    self.blocks = make(rngs)
    self.unit = unit
    self.repeats = repeats
    self.remat = cfg.remat
    self.unroll = min(cfg.scan_unroll, repeats)

  def __call__(self, x, cos, sin, positions, segment_ids=None, caches=None, rules=None, **ffn_inputs):
    """caches: per unit position, a KVCache stacked over the repeats ([R, B, T, K, D]). It travels
    in the scan carry and each layer scatters into its own slice, so decoding updates the cache in
    place instead of copying it every step. ffn_inputs (e.g. the VL vision mask) are the same for
    every layer."""

    def body(block, carry, index):
      x, caches = carry
      x, caches, routers = block(x, cos, sin, positions, segment_ids, caches, index, rules, **ffn_inputs)
      return (x, caches), routers

    if self.remat != "none":
      body = nnx.remat(body, policy=REMAT_POLICIES[self.remat])

    @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0), unroll=self.unroll,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def scan_fn(block, carry, index):
      return body(block, carry, index)

    (x, caches), routers = scan_fn(self.blocks, (x, caches), jnp.arange(self.repeats))
    return x, caches, routers
