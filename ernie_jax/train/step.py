"""The train state, its sharded creation, batch placement and the jitted training step.

The model (ErnieForCausalLM for a ModelConfig, the VL model for a VLConfig:
`ernie_jax.model.model_class`) and the objective (a task, `ernie_jax.train.tasks`: `TextLM` by
default, `VisionLanguage` for VL) are pluggable; everything else is shared. One step (`make_train_step`):
  1. split the batch [A, b, S, ...] into A micro-batches and, with `lax.scan`, accumulate the
     gradients of the task's objective; text: LM + mtp_weight * mean_d(MTP_d) + aux_coef * L_aux +
     z_coef * L_z + orth_coef * L_orth (LM / MTP normalised by the token counts of the whole batch,
     so A micro-batches equal one A-times larger batch; the MoE losses are per-micro-batch means
     averaged over micro-batches); VL: token-balanced LM loss + per-modality router losses;
  2. clip (global norm) and apply AdamW to the Params;
  3. update the MoE correction bias (VL: both rows) from the expert usage of the whole batch (spec §3.4);
  4. if the loss, the gradient norm or the new parameters are not finite, return the old state
     unchanged (the host then stops or skips, see `experiments/pretrain.py`).
Everything runs under `jax.set_mesh(mesh)`: the state keeps the shardings given by the logical-axis
rules (`ernie_jax.parallel`), the batch is split over the data-like mesh axes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ernie_jax import model as model_lib
from ernie_jax.config import ModelConfig
from ernie_jax.parallel import DEFAULT_RULES, MeshConfig, batch_spec, logical_to_spec, make_mesh
from ernie_jax.train import tasks
from ernie_jax.train.optimizer import global_norm

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")  # text; VL: data.vl.ROW_KEYS


@dataclasses.dataclass(frozen=True)
class LossConfig:
  mtp_weight: float = 0.1  # weight of the mean MTP loss over depths (spec §3.5: 0.1)
  moe_aux_coef: float = 1e-2  # load-balance loss coefficient (PaddleFormers default 1e-2)
  moe_z_coef: float = 1e-4  # router z-loss coefficient
  moe_orth_coef: float = 0.0  # router orthogonality loss coefficient
  bias_update_lr: float = 1e-3  # aux-loss-free correction-bias step size; 0 freezes the bias


class RngKey(nnx.Variable):
  """A raw uint32[2] PRNG key saved with the train state (not trained)."""


def uses_fp8(cfg: ModelConfig) -> bool:
  return getattr(cfg, "fp8_recipe", "none") != "none"


def trainable(cfg: ModelConfig):
  """What gets a gradient: the Params, plus the FP8 scaling state with FP8 (its "gradient" is its
  new value, see `ernie_jax.train.fp8_optim`)."""
  if uses_fp8(cfg):
    from ernie_jax.train.fp8_optim import FP8_WRT

    return FP8_WRT
  return nnx.Param


class TrainState(nnx.Module):
  """What a step changes: the model (Params + Buffers), the optimizer (moments, step count) and an
  RNG key (reserved for stochastic layers; ERNIE 4.5 pretraining uses none)."""

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, seed: int):
    if uses_fp8(model.config):
      from ernie_jax.train.fp8_optim import with_fp8_overwrite

      tx = with_fp8_overwrite(tx)  # FP8 state is overwritten, never seen by AdamW / clipping
    self.model = model
    self.opt = nnx.Optimizer(model, tx, wrt=trainable(model.config))
    self.rng = RngKey(jax.random.PRNGKey(seed))


# ------------------------------------------------------------------------------------------------
# Mesh, creation, placement.
def build_mesh(mesh_cfg: dict | MeshConfig | None = None, devices=None):
  """The device mesh (axes data / fsdp / tensor / expert) from the config's `mesh` section."""
  if isinstance(mesh_cfg, dict):
    mesh_cfg = MeshConfig(**mesh_cfg)
  return make_mesh(mesh_cfg, devices)


def train_state_shardings(abs_state, mesh, rules=DEFAULT_RULES):
  """NamedShardings of the train state from the logical axis names of its variables (optimizer
  moments carry their parameter's names). Like `ernie_jax.parallel.state_shardings`, but leaves
  variables that hold no array (optax `MaskedNode`s of a multi_transform, e.g. with FP8) alone."""

  def one(path, var):
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    if not hasattr(value, "shape"):
      return var
    axes = (var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None) or (None,) * len(value.shape)
    where = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    sharding = NamedSharding(mesh, logical_to_spec(axes, value.shape, rules, mesh, where))
    return var.replace(sharding) if isinstance(var, nnx.Variable) else sharding

  return jax.tree_util.tree_map_with_path(one, abs_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_train_state(model_cfg, tx, seed: int, mesh, rules=DEFAULT_RULES):
  """(graphdef, abstract state with shardings as values, ShapeDtypeStruct state for restoring).
  model_cfg: a ModelConfig (text) or a VLConfig (VL)."""
  model_class = model_lib.model_class(model_cfg)
  abstract = nnx.eval_shape(lambda: TrainState(model_class(model_cfg, rngs=nnx.Rngs(seed)), tx, seed))
  graphdef, abs_state = nnx.split(abstract)
  shardings = train_state_shardings(abs_state, mesh, rules)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings)
  return graphdef, shardings, target


def create_train_state(model_cfg, tx, *, seed: int, mesh, rules=DEFAULT_RULES,
                       pretrained: nnx.Module | None = None):
  """(graphdef, state) created directly in the sharded layout inside one jitted function.

  `pretrained`: a model whose parameters replace the random initialisation (`init_from`).
  """
  if pretrained is None:
    graphdef, init = _jitted_init(model_cfg, tx, seed, mesh, tuple(rules))
    with jax.set_mesh(mesh):
      return graphdef, init()
  graphdef, shardings, _ = abstract_train_state(model_cfg, tx, seed, mesh, rules)
  mgraph, mstate = nnx.split(pretrained)
  make = lambda ms: nnx.split(TrainState(nnx.merge(mgraph, ms), tx, seed))[1]
  with jax.set_mesh(mesh):
    return graphdef, jax.jit(make, out_shardings=shardings)(mstate)


@functools.lru_cache(maxsize=4)
def _jitted_init(model_cfg: ModelConfig, tx, seed: int, mesh, rules):
  """(graphdef, jitted fresh-state builder), cached so building the same state twice compiles once."""
  graphdef, shardings, _ = abstract_train_state(model_cfg, tx, seed, mesh, rules)
  model_class = model_lib.model_class(model_cfg)
  make = lambda: nnx.split(TrainState(model_class(model_cfg, rngs=nnx.Rngs(seed)), tx, seed))[1]
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


# ------------------------------------------------------------------------------------------------
# The step.
def make_train_step(graphdef, shardings, loss_cfg: LossConfig, schedule: Callable, *,
                    grad_accum: int = 1, donate: bool = True, task=None):
  """jitted (state, batch [A, b, S, ...] dict) -> (state, metrics dict of device scalars / arrays).
  task: the objective (`ernie_jax.train.tasks`; default `tasks.TEXT`)."""
  task = task or tasks.TEXT

  def step(state, batch):
    old_leaves, treedef = jax.tree.flatten(state)
    ts = nnx.merge(graphdef, state)
    model = ts.model
    cfg = model.config
    wrt = trainable(cfg)
    param_shardings = nnx.filter_state(shardings["model"], wrt)
    gdef, params, rest = nnx.split(model, wrt, ...)

    # normalisers over the whole batch (all micro-batches)
    rows = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
    norms = task.normalisers(rows, cfg)
    grad_fn = jax.value_and_grad(task.loss_fn(gdef, rest, loss_cfg, grad_accum, norms), has_aux=True)

    combine = lambda a, g: jax.tree.map(jnp.add, a, g)
    if uses_fp8(cfg):  # FP8 "gradients" are new scales / amax histories: combined by maximum
      from ernie_jax.train.fp8_optim import accumulate as combine
    if grad_accum == 1:
      (_, aux), grads = grad_fn(params, jax.tree.map(lambda v: v[0], batch))
    else:
      def body(acc, micro):
        p = jax.lax.with_sharding_constraint(params, param_shardings)
        (_, aux), g = grad_fn(p, micro)
        g = jax.lax.with_sharding_constraint(g, param_shardings)  # keep the accumulator in the param layout
        return combine(acc, g), aux

      zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), param_shardings)
      grads, auxs = jax.lax.scan(body, zeros, batch)
      aux = jax.tree.map(lambda a: jnp.sum(a, axis=0), auxs)

    grad_norm = global_norm(nnx.filter_state(grads, nnx.Param))
    lr = schedule(ts.opt.step[...])
    ts.opt.update(model, grads)
    if uses_fp8(cfg):
      # Write the new FP8 scales / histories exactly: the optimizer's overwrite goes through
      # params + (new - params), which rounds tiny gradient scales (~1e-9 next to 1.0) to 0.
      from ernie_jax.model.fp8 import Fp8Meta

      nnx.update(model, nnx.filter_state(grads, Fp8Meta))
    if loss_cfg.bias_update_lr and cfg.moe_use_correction_bias:
      task.update_bias(model, aux, loss_cfg.bias_update_lr)
    new_params = jax.tree.leaves(nnx.state(model, nnx.Param))
    param_norm = global_norm(new_params)
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in new_params]))
    finite = jnp.isfinite(aux["loss"]) & jnp.isfinite(grad_norm) & params_finite

    new_leaves, new_treedef = jax.tree.flatten(nnx.state(ts))
    assert new_treedef == treedef, "train state structure changed inside the step"
    new_state = jax.tree.unflatten(treedef, [jnp.where(finite, n, o) for n, o in zip(new_leaves, old_leaves)])
    metrics = dict(aux, grad_norm=grad_norm, param_norm=param_norm, lr=lr, finite=finite,
                   tokens=jnp.sum(rows["loss_mask"]))
    return new_state, metrics

  return jax.jit(step, out_shardings=(shardings, None), donate_argnums=(0,) if donate else ())


def all_finite(state) -> bool:
  """True iff every floating-point array of the state is finite (checked before saving)."""
  leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(_all_finite(leaves))


@jax.jit
def _all_finite(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)
