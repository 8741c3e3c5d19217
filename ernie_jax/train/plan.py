"""The layout planner: which mesh, remat policy and micro-batch fit a training run on N devices of M bytes
each, ranked by the communication one optimizer step needs (`python -m ernie_jax.plan`,
`ernie_jax.cli.plan`).

`Planner(config, devices)` reads a pretraining / SFT / DPO config tree (the kind from its sections:
`dpo` -> `PreferenceTuning`, `finetune` -> `FineTuning`, else `Pretraining`) the way the trainer does
(`recipe.parse`, `recipe.optimizer` / `wrt` / `adapt` / `reference_copy`; the architecture of
`run.init_from` when that directory exists, else the config's `model` section; data files and tokenizers are
not read), and estimates per-device memory with `ernie_jax.train.memory_model` (the train state exactly, the
activations by an analytical model; its measured error is in that module's docstring).

Candidates: every factorisation devices = data x fsdp x tensor x expert whose shardings divide every
parameter (the rules' `ShardingError`) and the micro-batches (rows divisible by data x fsdp x expert; expert
> 1 only for MoE models), x every remat policy, x every grad_accum_steps dividing the global batch into
micro-batches the mesh splits. A candidate fits when its total (arguments + temporaries) <= margin x device
memory.

Communication per optimizer step, in bytes received per device (ring collectives: an all-gather or a
reduce-scatter over n devices receives (n-1)/n of the whole buffer, an all-reduce twice that). A = grad_accum
steps, T = tokens of one micro-batch on one device, c / p = compute / parameter dtype bytes, H = hidden size:
  fsdp    A x sum over parameters of (g - 1) x shard x (2 c + p [trained only]): two all-gathers of the weights
          (forward, backward) and a reduce-scatter of the gradient, g = the fsdp size (routed experts under an
          expert-parallel transport: fsdp x tensor, gathered into the shard_map); the step keeps the
          accumulated gradient in the parameters' layout, so every micro-batch reduces;
  data    A x sum over trained parameters of 2 (r - 1) / r x shard x p, r = the batch axes (data, fsdp,
          expert) that do not shard the parameter (routed experts under a transport: not expert);
  tensor  A x 2 (t - 1) / t x T x H x c per all-reduce: per decoder layer 2 forward (attention output, MLP /
          shared experts; MoE layers without shared experts 1), as many backward and again when recomputed
          (remat != none), + 1 per LM head (its input gradient), MTP layers like decoder layers;
  expert  A x per MoE layer 2 exchanges forward (dispatch, return), 2 backward, 2 more when recomputed (1 with
          save_dots_experts, which keeps the returned expert outputs), each
          (e - 1) / e x rows x H x c with rows = E x C (all_to_all capacity), k T (ragged_all_to_all) or
          e T (allgather: all-gather, reduce-scatter); transport "none" with expert > 1 is left to GSPMD and
          estimated as the routed experts gathered over expert (counted under fsdp).
Candidates are ranked by the total, then by recomputation (none < save_dots_experts < save_dots < save_qkv_attn_out <
save_mlp < save_qkv < save_attn_out < full), then fewer accumulation steps, then memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ernie_jax.config.base import REMATS
from ernie_jax.interop.sources import open_checkpoint
from ernie_jax.model.moe.transports.all_to_all import capacity
from ernie_jax.parallel import MESH_AXES, MeshConfig, ShardingError, logical_to_spec
from ernie_jax.train import trainer
from ernie_jax.train.dpo import PreferenceTuning
from ernie_jax.train.memory import step_bytes
from ernie_jax.train.memory_model import BATCH_AXES, Layout, Memory, StateModel, abstract_mesh, estimate
from ernie_jax.train.sft import FineTuning
from ernie_jax.train.step import (BATCH_KEYS, abstract_train_state, batch_sharding, build_mesh, make_train_step,
                                  trainable)

#: recomputation cost order of the remat policies (cheapest first), the tie-break of the ranking
REMAT_COST = ("none", "save_dots_experts", "save_dots", "save_qkv_attn_out", "save_mlp", "save_qkv", "save_attn_out", "full")
PLACEHOLDER = "<not read by the planner>"


class PlanError(ValueError):
  """A planning request that cannot be answered: one line saying what to change."""


def recipe_for(config) -> trainer.Pretraining:
  """The recipe of a config tree: DPO (a `dpo` section), SFT (a `finetune` section), else pretraining."""
  if "dpo" in config:
    return PreferenceTuning()
  if "finetune" in config:
    return FineTuning()
  return trainer.PRETRAINING


def with_placeholders(config) -> ml_collections.ConfigDict:
  """A copy whose required data files / tokenizer are filled with a placeholder (the plan reads neither)."""
  c = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else dict(config))
  data = c.get("data")
  if data is not None:
    if "paths" in data and not data.paths and data.get("source", "") not in ("stdlib", "shapes", ""):
      data.paths = PLACEHOLDER
    if "tokenizer" in data and not data.tokenizer and not c.get("init_from"):
      data.tokenizer = PLACEHOLDER
  return c


def divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def factorisations(devices: int, *, moe: bool) -> Iterable[dict[str, int]]:
  """Every data x fsdp x tensor x expert = devices (expert = 1 for dense models)."""
  for t in divisors(devices):
    for e in divisors(devices // t) if moe else (1,):
      for f in divisors(devices // t // e):
        yield {"data": devices // t // e // f, "fsdp": f, "tensor": t, "expert": e}


@dataclasses.dataclass(frozen=True)
class Candidate:
  memory: Memory
  comm: dict[str, float]  # bytes per step per device: fsdp, data, tensor, expert

  @property
  def layout(self) -> Layout:
    return self.memory.layout

  @property
  def comm_total(self) -> float:
    return sum(self.comm.values())

  def rank_key(self):
    lay = self.layout
    return (round(self.comm_total), REMAT_COST.index(lay.remat), lay.grad_accum, self.memory.total)


class Planner:
  """config: a training config tree (ml-collections); devices: how many; rules: the logical-axis rules."""

  def __init__(self, config, devices: int):
    if not isinstance(devices, int) or devices < 1:
      raise PlanError(f"--devices must be a positive integer, got {devices!r}")
    self.devices = devices
    self.recipe = recipe_for(config)
    self.cfg = self.recipe.parse(with_placeholders(config))
    if self.cfg.run.model_family != "text":
      raise PlanError("the planner models the text models (model_family='text'); VL configs are not modelled yet")
    self.model_cfg, self.arch_source = self._model_config()
    tx, _ = self.recipe.optimizer(self.cfg, self.model_cfg)
    self.wrt = self.recipe.wrt(self.cfg, self.model_cfg)
    adapt = self.recipe.adapt(self.cfg, self.model_cfg)
    self.state_model = StateModel(self.model_cfg, tx, wrt=self.wrt, adapt=adapt,
                                  reference=self.recipe.reference_copy(self.cfg))
    reference = getattr(self.cfg, "reference", None)  # (DPO)
    self.batch_keys = 6 if reference == "precomputed" else 5
    self.reference_forward = reference in ("lora_base", "copy")
    self.lm_chunk = self.cfg.loss.lm_chunk
    self.seq, self.global_batch = self.cfg.data.seq_len, self.cfg.run.global_batch_size
    self._params = self._param_leaves()
    self.param_count = sum(math.prod(shape) for _, shape, *_ in self._params)
    self._states: dict[tuple, object] = {}

  def _model_config(self):
    """(model config, where its architecture comes from): `run.init_from`'s config when that directory exists
    (runtime fields from the config, as the trainer does), else the `model` section."""
    cfg = self.cfg
    path = cfg.run.init_from
    if path and os.path.isdir(os.path.expanduser(path)):
      runtime = {k: getattr(cfg.model, k) for k in trainer.RUNTIME_FIELDS + trainer.FP8_FIELDS if hasattr(cfg.model, k)}
      with open_checkpoint(os.path.expanduser(path), verify=False) as source:
        return source.read_config(**runtime), f"run.init_from {path}"
    note = f" (run.init_from {path} not found here)" if path else ""
    return cfg.model, "the config's model section" + note

  def _param_leaves(self):
    """(logical axes, shape, dtype bytes, trained, routed expert) of every model parameter."""
    trained = {p for p, _ in nnx.to_flat_state(nnx.filter_state(self.state_model.target["model"],
                                                                trainable(self.model_cfg, self.wrt)))}
    out = []
    for path, var in nnx.to_flat_state(self.state_model.target["model"]):
      value = var.get_value()
      if not isinstance(var, nnx.Param) or not hasattr(value, "shape"):
        continue
      axes = tuple(var.get_metadata().get("out_sharding") or ())
      out.append((axes or (None,) * len(value.shape), value.shape, jnp.dtype(value.dtype).itemsize, path in trained,
                  "experts" in axes))
    return out

  # ----------------------------------------------------------------------------------------------
  @property
  def is_moe(self) -> bool:
    return self.model_cfg.is_moe

  def config_layout(self) -> dict[str, int] | None:
    """The config's own mesh resolved for `devices` (None when it does not fit that many)."""
    try:
      return dict(zip(MESH_AXES, self.cfg.mesh.resolve(self.devices)))
    except ValueError:
      return None

  def accum_options(self, sizes: dict[str, int]) -> list[int]:
    """grad_accum_steps values that split the global batch into micro-batches the mesh divides."""
    shards = math.prod(sizes[a] for a in BATCH_AXES)
    return [a for a in divisors(self.global_batch) if (self.global_batch // a) % shards == 0]

  def estimate(self, layout: Layout) -> Memory:
    """Per-device memory of one layout (raises ShardingError / ValueError when it is not valid)."""
    return estimate(self.state_model, self.model_cfg, layout, seq=self.seq, global_batch=self.global_batch,
                    batch_keys=self.batch_keys, reference_forward=self.reference_forward,
                    lm_chunk=self.lm_chunk)

  def communication(self, layout: Layout, memory: Memory) -> dict[str, float]:
    """Bytes received per device per optimizer step, by kind (see the module docstring)."""
    cfg, sizes = self.model_cfg, layout.sizes
    c = jnp.dtype(cfg.dtype).itemsize
    ep = cfg.moe_transport != "none"
    a = layout.grad_accum
    mesh = abstract_mesh(sizes)
    fsdp = data = 0.0
    for axes, shape, p, trained, routed in self._params:
      spec = logical_to_spec(axes, shape, self.state_model.rules, mesh)
      spec_axes = {n for s in spec if s for n in ((s,) if isinstance(s, str) else s)}
      shard = math.prod(shape) / math.prod(sizes[n] for n in spec_axes)
      gather = {"fsdp"} & spec_axes
      if routed and ep:
        gather = spec_axes - {"expert"}
      elif routed and sizes["expert"] > 1:  # GSPMD's choice: estimated as gathering the experts
        gather = gather | {"expert"}
      g = math.prod(sizes[n] for n in gather)
      fsdp += (g - 1) * shard * (2 * c + (p if trained else 0))
      if trained:
        reduce = [n for n in BATCH_AXES if n not in spec_axes and not (routed and n == "expert")]
        r = math.prod(sizes[n] for n in reduce)
        data += 2 * (r - 1) / r * shard * p
    t, e, tokens = layout.tensor, layout.expert, memory.tokens
    recompute = layout.remat != "none"
    tensor = expert = 0.0
    per_ar = 2 * (t - 1) / t * tokens * cfg.hidden_size * c
    mtp_kind = "moe" if cfg.num_mtp_layers and cfg.is_moe_layer(0) else "dense"
    layers = [(k, recompute) for k in cfg.layer_kinds] + [(mtp_kind, False)] * cfg.num_mtp_layers
    for kind, again in layers:
      n_ar = 2 if kind == "dense" or cfg.moe_num_shared_experts else 1
      tensor += n_ar * (2 + (1 if again else 0)) * per_ar
      if kind == "moe" and ep and e > 1:
        if cfg.moe_transport == "all_to_all":
          rows = cfg.moe_num_experts * capacity(tokens, cfg.moe_k, cfg.moe_num_experts, cfg.moe_capacity_factor)
          per = (e - 1) / e * rows
        elif cfg.moe_transport == "ragged_all_to_all":
          per = (e - 1) / e * cfg.moe_k * tokens
        else:  # allgather
          per = (e - 1) * tokens
        redone = 0 if not again else 1 if layout.remat == "save_dots_experts" else 2  # (its return is saved)
        expert += (4 + redone) * per * cfg.hidden_size * c
    tensor += (1 + cfg.num_mtp_layers) * per_ar
    return {"fsdp": a * fsdp, "data": a * data, "tensor": a * tensor, "expert": a * expert}

  # ----------------------------------------------------------------------------------------------
  def meshes(self) -> list[dict[str, int]]:
    """The factorisations of `devices` whose shardings divide every array of the train state."""
    out = []
    for sizes in factorisations(self.devices, moe=self.is_moe):
      try:
        self.state_model.state_bytes(sizes)
      except ShardingError:
        continue
      if self.accum_options(sizes):
        out.append(sizes)
    return out

  def table(self, sizes: dict[str, int], remats: Iterable[str] = REMATS) -> dict[tuple[str, int], Memory]:
    """{(remat, grad_accum): Memory} on one mesh."""
    out = {}
    for remat in remats:
      for a in self.accum_options(sizes):
        out[remat, a] = self.estimate(Layout(**sizes, remat=remat, grad_accum=a))
    return out

  def candidates(self, usable_bytes: float, remats: Iterable[str] = REMATS, *, per_mesh: bool = False
                 ) -> tuple[list[Candidate], Memory | None]:
    """(layouts whose total <= usable_bytes, best first -- with per_mesh, only each mesh's best; the smallest
    layout overall, for the message when none fits)."""
    fits, smallest = [], None
    for sizes in self.meshes():
      mine = []
      for mem in self.table(sizes, remats).values():
        if smallest is None or mem.total < smallest.total:
          smallest = mem
        if mem.total <= usable_bytes:
          mine.append(Candidate(mem, self.communication(mem.layout, mem)))
      mine.sort(key=Candidate.rank_key)
      fits += mine[:1] if per_mesh else mine
    return sorted(fits, key=Candidate.rank_key), smallest

  # ----------------------------------------------------------------------------------------------
  def compile_step(self, layout: Layout, devices=None):
    """(compiled train step, its abstract state argument) on `layout`, built and compiled the way the trainer
    does (same recipe, abstract state, step and batch sharding; nothing is allocated) on `devices` (default:
    all; their number must be the layout's). For checking the estimate against XLA."""
    cfg, recipe = self.cfg, self.recipe
    model_cfg = self.model_cfg.replace(remat=layout.remat)
    mesh = build_mesh(MeshConfig(**layout.sizes), devices)
    tx, schedule = recipe.optimizer(cfg, model_cfg)
    wrt = recipe.wrt(cfg, model_cfg)
    graphdef, shardings, target = abstract_train_state(model_cfg, tx, cfg.run.seed, mesh, wrt=wrt,
                                                       adapt=recipe.adapt(cfg, model_cfg),
                                                       reference=recipe.reference_copy(cfg))
    step = make_train_step(graphdef, shardings, None, schedule, grad_accum=layout.grad_accum,
                           task=recipe.task(cfg, model_cfg), wrt=wrt)
    sharding = batch_sharding(mesh)
    shape = (layout.grad_accum, self.global_batch // layout.grad_accum, self.seq)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in BATCH_KEYS}
    if self.batch_keys > len(BATCH_KEYS):  # DPO's precomputed reference log-probs
      batch["ref_logps"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    with jax.set_mesh(mesh):
      return step.lower(target, batch).compile(), target

  def compiled_step_bytes(self, layout: Layout, devices=None) -> dict[str, int]:
    """XLA's `memory_analysis()` of `compile_step` (`memory.step_bytes`: arguments, outputs, temporaries, total)."""
    return step_bytes(self.compile_step(layout, devices)[0])
