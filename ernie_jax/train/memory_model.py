"""Per-device memory of the compiled train step (`ernie_jax.train.step.make_train_step`) for a layout
(mesh sizes, remat policy, gradient-accumulation steps), without devices or compilation.

What XLA's `compiled.memory_analysis()` reports, and what this model estimates, is
  arguments   = the train state (donated) + the batch                          -- EXACT here
  temporaries = the peak of the step's intermediate buffers                    -- MODELLED here
  total       = arguments + temporaries (the outputs alias the donated state)

Arguments (`StateModel`): the abstract train state of the run (`step.abstract_train_state`, the same
recipe `wrt` / `adapt` / reference copy as the trainer; no arrays are allocated) is sharded on a
`jax.sharding.AbstractMesh` of the layout by the logical-axis rules (`parallel.state_shardings`), and
each variable's shard shape gives its bytes: parameters (trained and frozen, LoRA adapters), buffers,
optimizer moments, a DPO reference copy, the RNG key. Gradients are the trained variables' shards in their
own dtype (the step differentiates with respect to the master weights). A mesh that does not divide a
sharded dimension raises `ShardingError`, exactly as the trainer would.

Temporaries: the larger of two phases, per device (T = tokens of one micro-batch on one device =
global_batch / grad_accum / (data x fsdp x expert) rows x seq_len; c = compute dtype bytes, p = parameter
dtype bytes; heads, kv heads, MLP width and vocabulary divided by `tensor`):
  update   = G + new moments + 1 byte per trained element (the new parameters / moments are held until the
             non-finite check decides; the byte is the per-element finiteness mask);
  fwd/bwd  = G + saved + max(head, layer)         (remat != none)
           = G + saved + head + 2 W + backward    (remat none: the head's and the last layer's backward overlap)
where
  G        = gradient bytes (x2 with grad_accum > 1: the accumulator and the micro-batch's gradients);
  saved    = what autodiff keeps per decoder layer and token, by policy (`saved_per_token`; equal to the
             residuals JAX saves for this model, `jax.ad_checkpoint.print_saved_residuals`, tested): full = the
             layer input (c H); save_dots = input + q/k/v + attention output + gate/up outputs (MoE: shared
             experts' and router's; the routed grouped matmuls are not plain dots); save_dots_experts = save_dots + (MoE)
             the routed rows' gate and up outputs (2 I-wide) + each assignment's expert output (k H-wide; rows
             H-wide with allgather); save_qkv / save_attn_out /
             save_qkv_attn_out / save_mlp = input + the named values a backward pass needs (the SwiGLU
             intermediate; not the MLP / MoE outputs); none = every forward
             value (`layer_terms`: norms, q/k/v and the per-chunk key prefixes of the chunked causal attention,
             fp32 probabilities and their cast, attention output, 6 MLP-wide values; MoE: router, shared
             experts, per routed row its input and output and 3-6 I-wide values (`routed_row_values`): rows =
             capacity-padded E x C for all_to_all, k T without expert parallelism (E T for the loop oracle),
             expert x k x T for ragged_all_to_all (its worst-case receive buffer) and allgather; with expert
             parallelism also k H-wide combine values per token), times T, plus the bf16 copies of the
             weights when c != p;
  head     = (2 + MTP depths) fp32 [T, V / tensor] (logits and the cross-entropy's exp; one more per MTP depth);
             with `loss.lm_chunk` (the fused head + cross-entropy, `linear_ce`) instead per head (LM and each
             MTP depth) its weight gradient fp32 [V / tensor, H] and input gradient c [T, H], computed in the
             forward pass and held to the backward, + 3 fp32 [rows x lm_chunk, V / tensor] of one chunk;
             + the MTP layers' forward values, + with fsdp the gathered embedding / head weight and an MTP
             layer's gathered weights and their gradient;
  layer    = one layer recomputed and differentiated (`layer_terms` "recompute": its forward values plus
             the larger of the attention / FFN backward temporaries -- fp32 score gradients, the MLP's 3 wide
             cotangents; the routed experts' rows: 3 H- and 3 I-wide values each) minus the saved values;
             with several scanned layer groups (e.g. 21B: [dense] x1, [moe] x27) plus the smaller layer kind's
             recomputed forward, which XLA overlaps with the other group's backward; plus 2 W;
  W        = one decoder layer's weights as the step uses them (unsharded over fsdp; the routed experts also
             over tensor inside the expert-parallel shard_map) in the parameter dtype: the layer's weights
             and their gradient are both live (x2).
DPO's reference forward (`lora_base` / `copy`) adds a forward-only pass (its logits and one layer's
values) on top of the saved values.

Measured error (tests/train/test_memory_model.py, and `benchmarks/memory_model_sweep.py`: 112 fp32 tiny
configs on 8 fake CPU devices: dense and MoE (all_to_all transport, capacity factors 1 and 2, mixed dense +
MoE and all-MoE layer stacks), every remat policy, data / fsdp / tensor / expert meshes, grad_accum 1-4,
MTP): the arguments match XLA's exactly; the temporaries are within -5% .. +21% of XLA's (mean |error| 4.4%;
90% of the configs within -4% .. +12%; the largest over-estimates are remat none with MTP and capacity
factor 1). MoE without expert parallelism (moe_impl=blocked) on 8 data shards: remat none / save_dots / full
+2.6% / +0.2% / +3.3%. The model errs on the safe side: it was fitted so that under-estimates stay small. DPO / SFT
(full and LoRA, each reference mode): -7% .. +16%. Not validated against XLA here: bf16 compute (XLA:CPU
upcasts bf16 matmul operands to fp32, so a CPU compile over-states bf16 temporaries; on TPU / GPU bf16 is
native), the ragged_dot / ragged_all_to_all / allgather MoE paths (CPU lowers them differently), FP8
(modelled as bf16), LoRA (modelled as full fine-tuning activations), and the vision tower (VL configs are
refused by `estimate`). Accelerator compilers fuse and schedule differently: keep a margin.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from ernie_jax.config.base import REMATS
from ernie_jax.model.attention import query_chunk
from ernie_jax.model.decoder import layer_groups
from ernie_jax.model.moe.dispatch import resolve_impl
from ernie_jax.parallel import DEFAULT_RULES, MESH_AXES, state_shardings
from ernie_jax.train.step import abstract_train_state, trainable

F32 = 4
BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes DEFAULT_RULES split the batch over


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
  """A device-less mesh with the axes MESH_AXES (all Auto, like `parallel.make_mesh`)."""
  return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@dataclasses.dataclass(frozen=True)
class Layout:
  """One candidate: mesh axis sizes, remat policy (`model.remat`) and `grad_accum_steps`."""

  data: int
  fsdp: int
  tensor: int
  expert: int
  remat: str
  grad_accum: int

  @property
  def sizes(self) -> dict[str, int]:
    return {a: getattr(self, a) for a in MESH_AXES}

  @property
  def batch_shards(self) -> int:
    return math.prod(getattr(self, a) for a in BATCH_AXES)

  def overrides(self) -> str:
    """The config overrides that select this layout."""
    return (f"--config.mesh.data={self.data} --config.mesh.fsdp={self.fsdp} --config.mesh.tensor={self.tensor} "
            f"--config.mesh.expert={self.expert} --config.model.remat={self.remat} "
            f"--config.grad_accum_steps={self.grad_accum}")


# --------------------------------------------------------------------------------------------------
# The train state (exact).
@dataclasses.dataclass(frozen=True)
class StateBytes:
  """Per-device bytes of the train state by part."""

  params: int  # model Params (trained and frozen, LoRA adapters included)
  buffers: int  # other model variables (MoE correction bias, FP8 scales / histories)
  optimizer: int  # optimizer moments and counters
  reference: int  # a frozen reference copy of the model (DPO `copy`)
  other: int  # the RNG key
  trained: int  # bytes of the trained variables (= their gradients)
  trained_elements: int
  moments: int  # the optimizer's array state (moments)

  @property
  def total(self) -> int:
    return self.params + self.buffers + self.optimizer + self.reference + self.other


class StateModel:
  """The abstract train state of a run (built once, no devices) and its per-device bytes on any mesh.
  model_cfg / tx / wrt / adapt / reference: as `step.abstract_train_state` (the recipe's)."""

  def __init__(self, model_cfg, tx, *, wrt=None, adapt=None, reference: bool = False, rules=DEFAULT_RULES):
    self.rules = rules
    ones = abstract_mesh({a: 1 for a in MESH_AXES})
    _, _, self.target = abstract_train_state(model_cfg, tx, 0, ones, rules, wrt=wrt, adapt=adapt, reference=reference)
    trained = nnx.filter_state(self.target["model"], trainable(model_cfg, wrt))
    self.trained_paths = {path for path, _ in nnx.to_flat_state(trained)}
    self._cache: dict[tuple[int, ...], StateBytes] = {}

  def state_bytes(self, sizes: dict[str, int]) -> StateBytes:
    """Raises `ShardingError` naming the array when the mesh does not divide one of its sharded dimensions."""
    key = tuple(sizes[a] for a in MESH_AXES)
    if key not in self._cache:
      self._cache[key] = self._state_bytes(sizes)
    return self._cache[key]

  def _state_bytes(self, sizes: dict[str, int]) -> StateBytes:
    shardings = state_shardings(self.target, abstract_mesh(sizes), self.rules, skip_non_arrays=True)
    parts = dict.fromkeys(("params", "buffers", "optimizer", "reference", "other", "trained", "trained_elements",
                           "moments"), 0)
    for (path, var), (_, sharding) in zip(nnx.to_flat_state(self.target), nnx.to_flat_state(shardings)):
      value = var.get_value()
      if not hasattr(value, "shape"):  # (optax MaskedNodes of a multi_transform)
        continue
      shape = sharding.get_value().shard_shape(value.shape)
      itemsize = jnp.dtype(value.dtype).itemsize
      n = math.prod(shape) * itemsize
      if path[0] == "model":
        parts["params" if isinstance(var, nnx.Param) else "buffers"] += n
        if path[1:] in self.trained_paths:
          parts["trained"] += n
          parts["trained_elements"] += n // itemsize
      elif path[0] == "opt":
        parts["optimizer"] += n
        parts["moments"] += n if value.ndim else 0
      elif path[0] == "reference":
        parts["reference"] += n
      else:
        parts["other"] += n
    return StateBytes(**parts)


# --------------------------------------------------------------------------------------------------
# Activations (modelled).
@dataclasses.dataclass(frozen=True)
class Dims:
  """What the activation model needs, per device: T tokens of one micro-batch, sizes after the tensor
  split, dtype bytes, the MoE routing."""

  tokens: int
  seq: int
  c: int  # compute dtype bytes (model.dtype)
  p: int  # parameter dtype bytes (model.param_dtype)
  hidden: int
  heads: int  # query heads on this device (N / tensor)
  kv: int  # kv heads on this device
  head_dim: int
  mlp: int  # dense intermediate on this device
  vocab: int  # logits columns on this device (V / tensor)
  tensor: int = 1
  experts: int = 0
  k: int = 0
  expert_mlp: int = 0  # routed-expert intermediate as computed (whole inside the expert-parallel shard_map)
  shared_mlp: int = 0  # shared-expert intermediate on this device
  transport: str = "none"
  grouped: str = "ragged_dot"  # the grouped matmul without expert parallelism (`dispatch.resolve_impl`)
  capacity_factor: float = 2.0
  expert_axis: int = 1


def attention_chunks(seq: int) -> tuple[int, float]:
  """(query chunks, mean keys per query) of `model.attention.causal_attend` (`query_chunk` queries per block;
  one dense S x S block when the chunk does not divide S)."""
  chunk = query_chunk(seq)
  if seq <= chunk or seq % chunk:
    return 1, float(seq)
  n = seq // chunk
  return n, chunk * (n + 1) / 2


def routed_rows(d: Dims) -> float:
  """Rows of the routed experts' computation on one device, per local token."""
  if d.transport == "all_to_all":  # capacity C per expert and source device (transports.all_to_all.capacity)
    cap = d.tokens if d.capacity_factor <= 0 else max(1, min(d.tokens, math.ceil(
      d.capacity_factor * d.tokens * d.k / d.experts)))
    return d.experts * cap / d.tokens
  if d.transport in ("ragged_all_to_all", "allgather"):  # worst-case receive buffer / all tokens of the group
    return d.expert_axis * d.k
  if d.grouped == "loop":  # the oracle: every expert on every token
    return d.experts
  return d.k  # sorted assignments, no expert parallelism


def routed_row_values(d: Dims) -> int:
  """I-wide forward values kept per routed row without remat (measured with `print_saved_residuals`): 6
  intermediates, but 3 (the gate and up outputs and their SwiGLU product) with the blocked grouped matmul's
  custom VJPs (`moe_impl=blocked` without expert parallelism)."""
  return 3 if d.transport == "none" and d.grouped == "blocked" else 6


def layer_terms(d: Dims, kind: str) -> dict[str, float]:
  """Per-token bytes of one decoder layer ("dense" / "moe"): the forward values autodiff keeps without
  remat, by block (`norms`, `attn`, `ffn`), the backward temporaries (`attn_bwd`, `ffn_bwd`), and what is
  live while a rematerialised layer is recomputed and differentiated (`recompute`; for the routed experts
  3 H- and 3 I-wide values per routed row, as measured, not every forward value at once)."""
  c, h = d.c, d.hidden
  n_ch, keys = attention_chunks(d.seq)
  attn = (c * d.heads * d.head_dim * (2 if n_ch > 1 else 1)  # q (+ its per-chunk slices)
          + 2 * c * d.kv * d.head_dim * (1 + (n_ch - 1) / 2)  # k, v (+ the key prefixes of the chunks)
          + d.heads * keys * (F32 + c) + 16 * d.heads  # fp32 probabilities and their cast, softmax statistics
          + c * d.heads * d.head_dim)  # attention output
  out = {"norms": 2 * (2 * c * h + F32 * h) + 16, "attn": attn,  # per norm: input, output, fp32 copy
         "attn_bwd": d.heads * keys * F32 + c * (d.heads + 2 * d.kv) * d.head_dim}
  if kind == "moe":
    rows = routed_rows(d)
    fixed = 6 * c * d.shared_mlp + F32 * (2 * d.experts + 8 * d.k) + c * h
    if d.transport != "none":  # the transports' per-slot combine values (k H-wide and a mask)
      fixed += d.k * (2 * c + 1) * h
    out["ffn"] = fixed + rows * (2 * c * h + routed_row_values(d) * c * d.expert_mlp)
    out["ffn_bwd"] = rows * 3 * c * d.expert_mlp + 3 * c * d.shared_mlp
    out["recompute"] = (out["norms"] + attn + fixed + rows * 3 * c * (h + d.expert_mlp)
                        + max(out["attn_bwd"], 3 * c * d.shared_mlp + d.k * 2 * c * h))
  else:
    out["ffn"] = 6 * c * d.mlp
    out["ffn_bwd"] = 3 * c * d.mlp
    out["recompute"] = out["norms"] + attn + out["ffn"] + max(out["attn_bwd"], out["ffn_bwd"])
  return out


def saved_per_token(d: Dims, kind: str, remat: str) -> float:
  """Bytes per token one layer keeps for the backward pass under a remat policy (`decoder.REMAT_POLICIES`;
  the scan carry, the layer's input, is always kept)."""
  if remat not in REMATS:
    raise ValueError(f"unknown remat policy {remat!r}; one of {REMATS}")
  c, h = d.c, d.hidden
  if remat == "none":
    t = layer_terms(d, kind)
    return t["norms"] + t["attn"] + t["ffn"] + (3 * c * h if d.tensor > 1 else 0)
  qkv = c * (d.heads + 2 * d.kv) * d.head_dim
  ffn_dots = (2 * c * d.shared_mlp + F32 * d.experts) if kind == "moe" else 2 * c * d.mlp  # (router logits)
  experts = c * (2 * routed_rows(d) * d.expert_mlp + (routed_rows(d) if d.transport == "allgather" else d.k) * h)
  named = {"full": 0, "save_dots": qkv + c * h + ffn_dots, "save_qkv": qkv, "save_attn_out": c * h,
           "save_dots_experts": qkv + c * h + ffn_dots + (experts if kind == "moe" else 0),
           "save_qkv_attn_out": qkv + c * h,
           "save_mlp": c * (d.shared_mlp if kind == "moe" else d.mlp)}  # (outputs are not needed backward)
  return c * h + named[remat]


def _layer_weights(cfg, kind: str, sizes: dict[str, int], expert_parallel: bool) -> float:
  """Bytes of one decoder layer's matmul weights as the step uses them on one device: unsharded over
  fsdp (gathered), split over tensor (routed experts: also gathered over tensor inside the shard_map)."""
  p = jnp.dtype(cfg.param_dtype).itemsize
  t, e = sizes["tensor"], sizes["expert"]
  h = cfg.hidden_size
  attn = h * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) / t * p
  if kind != "moe":
    return attn + 3 * h * cfg.intermediate_size / t * p
  routed = 3 * h * cfg.moe_intermediate_size * cfg.moe_num_experts / e / (1 if expert_parallel else t)
  shared = 3 * h * cfg.moe_intermediate_size * cfg.moe_num_shared_experts / t
  return attn + (routed + shared) * p + h * cfg.moe_num_experts * F32  # (the router is fp32)


def dims_for(cfg, layout: Layout, seq: int, micro_rows: int) -> Dims:
  """The activation model's per-device sizes for a ModelConfig on a layout."""
  t = layout.tensor
  ep = cfg.moe_transport != "none"
  return Dims(tokens=micro_rows * seq, seq=seq, c=jnp.dtype(cfg.dtype).itemsize, p=jnp.dtype(cfg.param_dtype).itemsize,
              hidden=cfg.hidden_size, heads=cfg.num_attention_heads // t, kv=cfg.num_key_value_heads // t,
              head_dim=cfg.head_dim, mlp=cfg.intermediate_size // t, vocab=cfg.vocab_size // t, tensor=t,
              experts=cfg.moe_num_experts, k=cfg.moe_k,
              expert_mlp=cfg.moe_intermediate_size // (1 if ep else t),
              shared_mlp=cfg.moe_intermediate_size * cfg.moe_num_shared_experts // t,
              transport=cfg.moe_transport, grouped=resolve_impl(cfg.moe_impl), capacity_factor=cfg.moe_capacity_factor,
              expert_axis=layout.expert)


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-device bytes of the train step on one layout (see the module docstring)."""

  layout: Layout
  state: StateBytes
  batch: int  # the step's batch argument
  grads: int  # gradient buffers (x2 with accumulation)
  activations: int  # the forward / backward peak, gradients excluded
  update: int  # the optimizer-update peak, gradients included
  micro_rows: int  # rows of one micro-batch on one device
  tokens: int  # tokens of one micro-batch on one device

  @property
  def arguments(self) -> int:
    return self.state.total + self.batch

  @property
  def temporaries(self) -> int:
    return max(self.grads + self.activations, self.update)

  @property
  def total(self) -> int:
    return self.arguments + self.temporaries


def estimate(state_model: StateModel, cfg, layout: Layout, *, seq: int, global_batch: int, batch_keys: int = 5,
             reference_forward: bool = False, lm_chunk: int = 0) -> Memory:
  """Per-device memory of the train step of a text model (`ModelConfig`) on `layout`.
  batch_keys: int32 / fp32 [rows, seq] arrays per batch row (text: 5; DPO with precomputed reference
  log-probs: 6). reference_forward: DPO's forward-only reference pass (`lora_base` / `copy`). lm_chunk: the
  training config's `loss.lm_chunk` (0: the whole logits).
  Raises `ShardingError` (the mesh does not divide a parameter) or ValueError (the batch does not split)."""
  if getattr(cfg, "is_vl", False):
    raise ValueError("the memory model covers the text models (ModelConfig); VL configs are not modelled")
  shards, a = layout.batch_shards, layout.grad_accum
  if global_batch % a or (global_batch // a) % shards:
    raise ValueError(f"global_batch_size {global_batch} / grad_accum_steps {a} is not divisible by the "
                     f"{shards} batch shards (data x fsdp x expert)")
  rows = global_batch // a // shards
  state = state_model.state_bytes(layout.sizes)
  cfg = cfg.replace(remat=layout.remat)
  d = dims_for(cfg, layout, seq, rows)
  t, remat, c = d.tokens, layout.remat, d.c
  kinds = list(cfg.layer_kinds)
  lt = {k: layer_terms(d, k) for k in set(kinds)}
  grads = state.trained * (2 if a > 1 else 1)

  saved = sum(saved_per_token(d, k, remat) for k in kinds) * t
  if remat == "none":
    _, keys = attention_chunks(seq)
    saved += len({u for u in kinds}) * d.heads * keys * (1 + F32) * t  # (the hoisted masks of each scanned group)
    if d.c != d.p:  # the compute-dtype copies of every layer's weights
      saved += sum(_layer_weights(cfg, k, layout.sizes, cfg.moe_transport != "none") / d.p for k in kinds) * c
  if d.c != d.p:  # the compute-dtype copy of the LM head
    saved += cfg.vocab_size // layout.tensor * cfg.hidden_size * c * (1 if cfg.tie_word_embeddings else 2)

  mtp_kind = "moe" if cfg.num_mtp_layers and cfg.is_moe_layer(0) else "dense"
  mtp = cfg.num_mtp_layers * t * (sum(lt.get(mtp_kind, layer_terms(d, mtp_kind))[x] for x in ("norms", "attn", "ffn"))
                                  + 5 * c * d.hidden)
  if lm_chunk:
    head = ((1 + cfg.num_mtp_layers) * (d.vocab * d.hidden * F32 + t * d.hidden * c)
            + 3 * rows * min(lm_chunk, seq) * F32 * d.vocab + mtp)
  else:
    head = (2 + cfg.num_mtp_layers) * t * F32 * d.vocab + mtp
  if layout.fsdp > 1:  # the embedding / LM head gathered over fsdp; an MTP layer's weights and their gradient
    head += cfg.vocab_size // layout.tensor * cfg.hidden_size * d.p * (1 if cfg.tie_word_embeddings else 2)
    if cfg.num_mtp_layers:
      head += 2 * (_layer_weights(cfg, mtp_kind, layout.sizes, cfg.moe_transport != "none")
                   + 2 * d.hidden * d.hidden * d.p)
  w = 2 * max(_layer_weights(cfg, k, layout.sizes, cfg.moe_transport != "none") for k in set(kinds))
  tp = 2 * c * d.hidden if layout.tensor > 1 else 0  # row-parallel partial sums and their all-reduced copies
  if remat == "none":
    peak = head + w + max(max(x["attn_bwd"], x["ffn_bwd"]) for x in lt.values()) * t
  else:
    layer = max(x["recompute"] - saved_per_token(d, k, remat) for k, x in lt.items()) + tp
    if len(layer_groups(kinds)) > 1:  # XLA overlaps the next group's recomputed forward with this group's backward
      layer += min(x["norms"] + x["attn"] + x["ffn"] - saved_per_token(d, k, remat) for k, x in lt.items())
    peak = max(head, layer * t + w)
  if reference_forward:  # a forward-only pass: its logits / cross-entropy and one layer's values
    peak = max(peak, t * (2 * F32 * d.vocab + max(x["norms"] + x["attn"] + x["ffn"] for x in lt.values())))
  update = state.trained + state.moments + state.trained_elements
  batch = batch_keys * 4 * a * rows * seq
  return Memory(layout, state, batch, grads, int(saved + peak), int(update), rows, t)
