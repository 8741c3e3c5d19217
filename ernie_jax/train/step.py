"""The train state, its sharded creation, batch placement and the jitted training step.

The model (ErnieForCausalLM for a ModelConfig, the VL model for a VLConfig:
`ernie_jax.model.model_class`) and the objective (a `Task`, `ernie_jax.train.tasks`: `TextLM` by
default, `VisionLanguage` for VL) are pluggable; everything else is shared. One step (`make_train_step`):
  1. split the batch [A, b, S, ...] into A micro-batches and, with `lax.scan`, accumulate the
     gradients of the task's objective (`task.loss_fn`, normalised by `task.normalisers` of the whole
     batch so that A micro-batches equal one A-times larger batch; metrics are summed);
  2. clip (global norm) and apply AdamW to the Params (with FP8: `Fp8Optimizer`, which also writes
     the new FP8 scales / amax histories exactly);
  3. `task.after_update(model, metrics)`: e.g. the MoE correction-bias update (spec §3.4);
  4. if the loss, the gradient norm or the new parameters are not finite, return the old state
     unchanged (the host then stops or skips, see `experiments/pretrain.py`).
The step knows nothing about MoE, modalities or loss coefficients: those belong to the task.
Everything runs under `jax.set_mesh(mesh)`: the state keeps the shardings given by the logical-axis
rules (`ernie_jax.parallel`), the batch is split over the data-like mesh axes.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ernie_jax import model as model_lib
from ernie_jax.config import ModelConfig
from ernie_jax.model import lora as lora_lib
from ernie_jax.parallel import DEFAULT_RULES, MeshConfig, batch_spec, make_mesh, state_shardings, with_rules
from ernie_jax.train import fp8_optim, tasks
from ernie_jax.train.losses import LossConfig
from ernie_jax.train.optimizer import global_norm

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")  # text; VL: data.vl.ROW_KEYS


class RngKey(nnx.Variable):
  """A raw uint32[2] PRNG key saved with the train state (not trained)."""


def uses_fp8(cfg: ModelConfig) -> bool:
  return getattr(cfg, "fp8_recipe", "none") != "none"


def trainable(cfg: ModelConfig, wrt=None):
  """What gets a gradient: `wrt` (an nnx filter, e.g. `nnx.LoRAParam` for LoRA, or the Params outside
  frozen modules) when given, else the Params, plus the FP8 scaling state with FP8 (its "gradient" is
  its new value, see `ernie_jax.train.fp8_optim`)."""
  if wrt is not None:
    if uses_fp8(cfg):
      raise ValueError("FP8 training trains every Param (its scaling state is written by the optimizer): "
                       "it cannot be combined with frozen parameters or LoRA")
    return wrt
  return fp8_optim.FP8_WRT if uses_fp8(cfg) else nnx.Param


class TrainState(nnx.Module):
  """What a step changes: the model (Params + Buffers), the optimizer (moments, step count) and an
  RNG key (reserved for stochastic layers; ERNIE 4.5 pretraining uses none). With FP8 the optimizer
  is an `Fp8Optimizer`: FP8 state is overwritten with its new values, never seen by AdamW / clipping.
  wrt: what trains (`trainable`); the optimizer holds state for those variables only (a frozen base
  under LoRA has no moments). reference: an optional frozen model that never trains (e.g. DPO's
  reference policy with full fine-tuning); the step hands it to the task (`tasks.Task`)."""

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, seed: int, wrt=None,
               reference: nnx.Module | None = None):
    self.model = model
    if reference is not None:
      self.reference = reference
    if uses_fp8(model.config):
      trainable(model.config, wrt)  # (refuses wrt with FP8)
      self.opt = fp8_optim.Fp8Optimizer(model, fp8_optim.with_fp8_overwrite(tx), wrt=fp8_optim.FP8_WRT)
    else:
      self.opt = nnx.Optimizer(model, tx, wrt=trainable(model.config, wrt))
    self.rng = RngKey(jax.random.PRNGKey(seed))


# ------------------------------------------------------------------------------------------------
# Mesh, creation, placement.
def build_mesh(mesh_cfg: dict | MeshConfig | None = None, devices=None):
  """The device mesh (axes data / fsdp / tensor / expert) from the config's `mesh` section."""
  if isinstance(mesh_cfg, dict):
    mesh_cfg = MeshConfig(**mesh_cfg)
  return make_mesh(mesh_cfg, devices)


def _fresh_model(model_cfg, seed: int, rules, adapt):
  model = model_lib.model_class(model_cfg)(model_cfg, rngs=nnx.Rngs(seed))
  return with_rules(model if adapt is None else adapt(model), rules)


def _fresh_state(model_cfg, tx, seed: int, rules, wrt, adapt, reference: bool) -> TrainState:
  """A new train state; with `reference`, a second, unadapted copy of the same initial model."""
  ref = _fresh_model(model_cfg, seed, rules, None) if reference else None
  return TrainState(_fresh_model(model_cfg, seed, rules, adapt), tx, seed, wrt, ref)


def abstract_train_state(model_cfg, tx, seed: int, mesh, rules=DEFAULT_RULES, *, wrt=None, adapt=None,
                         reference: bool = False):
  """(graphdef, abstract state with shardings as values, ShapeDtypeStruct state for restoring).
  model_cfg: a ModelConfig (text) or a VLConfig (VL). wrt: what trains (`trainable`). adapt: applied
  to the freshly built model (e.g. adding LoRA adapters; must be hashable, e.g. a frozen dataclass).
  reference: the state also holds a frozen copy of the initial model (`TrainState.reference`)."""
  abstract = nnx.eval_shape(lambda: _fresh_state(model_cfg, tx, seed, rules, wrt, adapt, reference))
  graphdef, abs_state = nnx.split(abstract)
  shardings = state_shardings(abs_state, mesh, rules, skip_non_arrays=True)  # (optax MaskedNodes with FP8)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings)
  return graphdef, shardings, target


def create_train_state(model_cfg, tx, *, seed: int, mesh, rules=DEFAULT_RULES,
                       pretrained: nnx.Module | None = None, wrt=None, adapt=None, reference: bool = False):
  """(graphdef, state) created directly in the sharded layout inside one jitted function.

  `pretrained`: a model whose parameters replace the random initialisation (`init_from`); it must
  already have the adapted structure (`adapt` is not applied to it, e.g. LoRA added by the caller).
  wrt / adapt / reference: as in `abstract_train_state` (the reference copy of a `pretrained` model is
  a second copy of its parameters).
  """
  if pretrained is None:
    graphdef, init = _jitted_init(model_cfg, tx, seed, mesh, tuple(rules), wrt, adapt, reference)
    with jax.set_mesh(mesh):
      return graphdef, init()
  graphdef, shardings, _ = abstract_train_state(model_cfg, tx, seed, mesh, rules, wrt=wrt, adapt=adapt,
                                                reference=reference)
  mgraph, mstate = nnx.split(pretrained)

  def make(ms):
    # (fresh Variable objects: two merges of the same state would share them, i.e. be one model)
    copy = with_rules(nnx.merge(mgraph, jax.tree.map(lambda x: x, ms)), rules) if reference else None
    return nnx.split(TrainState(with_rules(nnx.merge(mgraph, ms), rules), tx, seed, wrt, copy))[1]

  with jax.set_mesh(mesh):
    return graphdef, jax.jit(make, out_shardings=shardings)(mstate)


@functools.lru_cache(maxsize=4)
def _jitted_init(model_cfg: ModelConfig, tx, seed: int, mesh, rules, wrt=None, adapt=None, reference=False):
  """(graphdef, jitted fresh-state builder), cached so building the same state twice compiles once."""
  graphdef, shardings, _ = abstract_train_state(model_cfg, tx, seed, mesh, rules, wrt=wrt, adapt=adapt,
                                                reference=reference)
  make = lambda: nnx.split(_fresh_state(model_cfg, tx, seed, rules, wrt, adapt, reference))[1]
  return graphdef, jax.jit(make, out_shardings=shardings)


def batch_sharding(mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """[micro-batches, rows, seq]: rows split over the data-like axes."""
  return NamedSharding(mesh, P(None, *batch_spec(mesh, rules, ndim=2)))


def put_batch(batch: dict[str, np.ndarray], grad_accum: int, sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows [b, S, ...] -> global arrays [A, B / A, S, ...] sharded by `sharding`
  (rows split, trailing axes whole). Every key of the batch is placed (text: `BATCH_KEYS`)."""
  out = {}
  for k in batch:
    v = np.asarray(batch[k])
    local = v.reshape((grad_accum, v.shape[0] // grad_accum) + v.shape[1:])
    shape = (grad_accum, local.shape[1] * jax.process_count()) + local.shape[2:]
    out[k] = jax.make_array_from_process_local_data(sharding, local, shape)
  return out


def put_global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """A batch every process holds whole (evaluation, reference passes: [B, S, ...]) -> global arrays [B, S, ...]
  sharded by `sharding` (`batch_sharding`'s, [micro-batches, rows, ...]), each process contributing the rows its
  own devices hold, so every row is in the global batch once and in its place (whatever the device order)."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)[None]
    held = [ix[1] for ix in sharding.addressable_devices_indices_map(v.shape).values()]
    start = min(r.start or 0 for r in held)
    stop = max(v.shape[1] if r.stop is None else r.stop for r in held)
    out[k] = jax.make_array_from_process_local_data(sharding, v[:, start:stop], v.shape)[0]
  return out


# ------------------------------------------------------------------------------------------------
# The step.
def make_train_step(graphdef, shardings, loss_cfg: LossConfig | None, schedule: Callable, *,
                    grad_accum: int = 1, donate: bool = True, task: tasks.Task | None = None, wrt=None):
  """jitted (state, batch [A, b, S, ...] dict) -> (state, metrics dict of device scalars / arrays).
  task: the objective (a `tasks.Task`; default `tasks.TextLM`). loss_cfg: coefficients given to a
  built-in task (`tasks.with_loss`); None keeps the task's own. wrt: what trains (`trainable`; the
  same filter the train state was made with)."""
  task = task or tasks.TEXT
  if loss_cfg is not None:
    task = tasks.with_loss(task, loss_cfg)

  def step(state, batch):
    treedef = jax.tree.structure(state)
    ts = nnx.merge(graphdef, state)
    model = ts.model
    cfg = model.config
    wrt_filter = trainable(cfg, wrt)
    param_shardings = nnx.filter_state(shardings["model"], wrt_filter)
    gdef, params, rest = nnx.split(model, wrt_filter, ...)

    # normalisers over the whole batch (all micro-batches)
    rows = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
    norms = task.normalisers(rows, cfg)
    if hasattr(ts, "reference"):  # a frozen model the objective compares against (e.g. DPO's reference)
      norms = dict(norms, reference=nnx.split(ts.reference))
    grad_fn = jax.value_and_grad(task.loss_fn(gdef, rest, grad_accum, norms), has_aux=True)
    lora = lora_lib.lora_config(model)
    if lora is not None and lora.dropout > 0:  # LoRA dropout: a fresh key every step (and micro-batch)
      grad_fn = _with_dropout(grad_fn, jax.random.fold_in(ts.rng[...], ts.opt.step[...]))
    else:
      grad_fn = functools.partial(_without_index, grad_fn)

    # FP8 "gradients" are new scales / amax histories: combined by maximum
    combine = fp8_optim.accumulate if uses_fp8(cfg) else (lambda a, g: jax.tree.map(jnp.add, a, g))
    if grad_accum == 1:
      (_, aux), grads = grad_fn(params, jax.tree.map(lambda v: v[0], batch), 0)
    else:
      def body(acc, xs):
        micro, i = xs
        p = jax.lax.with_sharding_constraint(params, param_shardings)
        (_, aux), g = grad_fn(p, micro, i)
        g = jax.lax.with_sharding_constraint(g, param_shardings)  # keep the accumulator in the param layout
        return combine(acc, g), aux

      zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), param_shardings)
      grads, auxs = jax.lax.scan(body, zeros, (batch, jnp.arange(grad_accum)))
      aux = jax.tree.map(lambda a: jnp.sum(a, axis=0), auxs)

    grad_norm = global_norm(nnx.filter_state(grads, nnx.Param))
    lr = schedule(ts.opt.step[...])
    # The update is applied only when the loss and the gradients are finite; otherwise the state passes through
    # unchanged. (A conditional, not a select of old vs new over the whole state: the select kept both copies of
    # parameters and moments alive and cost ~15% of a 0.3B CPU step.)
    update_ok = jnp.isfinite(aux["loss"]) & jnp.isfinite(grad_norm)

    def apply(state, grads, aux):
      ts = nnx.merge(graphdef, state)
      ts.opt.update(ts.model, grads)  # with FP8 also writes the new FP8 state exactly (Fp8Optimizer)
      task.after_update(ts.model, aux)
      new = nnx.state(ts)
      assert jax.tree.structure(new) == treedef, "train state structure changed inside the step"
      return new

    new_state = jax.lax.cond(update_ok, apply, lambda state, grads, aux: state, state, grads, aux)
    new_params = jax.tree.leaves(nnx.state(nnx.merge(graphdef, new_state).model, nnx.Param))
    param_norm = global_norm(new_params)
    # every parameter finite: the largest magnitude is (NaN propagates through max; no overflow, unlike the norm)
    params_finite = jnp.isfinite(jnp.max(jnp.stack([jnp.max(jnp.abs(p)) for p in new_params])))
    finite = update_ok & params_finite
    metrics = dict(aux, grad_norm=grad_norm, param_norm=param_norm, lr=lr, finite=finite, params_finite=params_finite,
                   tokens=jnp.sum(rows["loss_mask"]))
    return new_state, metrics

  return jax.jit(step, out_shardings=(shardings, None), donate_argnums=(0,) if donate else ())


def _without_index(grad_fn, params, micro, i):
  return grad_fn(params, micro)


def _with_dropout(grad_fn, key):
  """grad_fn(params, micro, i) with LoRA dropout keyed by fold_in(key, i) (`model.lora.dropout_key`)."""

  def fn(params, micro, i):
    with lora_lib.dropout_key(jax.random.fold_in(key, i)):
      return grad_fn(params, micro)

  return fn


def all_finite(state) -> bool:
  """True iff every floating-point array of the state is finite (checked before saving)."""
  leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(_all_finite(leaves))


@jax.jit
def _all_finite(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)
