"""Fine-tuning parameter groups (`ernie_jax.train.param_groups`): frozen routers / vision tower get no
gradient and no optimizer state; learning-rate ratios scale the AdamW update of their group exactly
(checked against the same optimizer without groups, i.e. optax.adamw itself)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.config import ModelConfig, VLConfig
from ernie_jax.model import model_class
from ernie_jax.train.optimizer import OptimConfig, make_optimizer
from ernie_jax.train.param_groups import GroupsConfig, group_of, make_grouped_optimizer, trained_filter

OPT = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1, clip_norm=0.0)


def _paths(state):
  """Paths of the arrays of a state (optax's MaskedNode placeholders of other groups hold none)."""
  return {".".join(map(str, p)) for p, v in nnx.to_flat_state(state) if hasattr(v.get_value(), "shape")}


def _one_update(model, ft):
  """One optimizer step on a fixed pseudo-gradient (every trained leaf = sin of its values)."""
  opt = nnx.Optimizer(model, make_grouped_optimizer(OPT, ft, 10)[0], wrt=trained_filter("full", ft))
  params = nnx.state(model, trained_filter("full", ft))
  grads = jax.tree.map(jnp.sin, params)
  before = jax.tree.map(lambda x: x, nnx.state(model, nnx.Param))
  nnx.jit(lambda o, m, g: o.update(m, g))(opt, model, grads)
  after = nnx.state(model, nnx.Param)
  delta = {".".join(map(str, p)): np.asarray(a[...]) - np.asarray(b[...])
           for (p, a), (_, b) in zip(nnx.to_flat_state(after), nnx.to_flat_state(before))}
  return opt, delta


def test_router_ratio_and_freeze_on_a_moe_model():
  cfg = ModelConfig.tiny_moe()
  make = lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0))  # noqa: E731
  _, ref = _one_update(make(), GroupsConfig())
  _, scaled = _one_update(make(), GroupsConfig(router_lr_ratio=0.01))
  router = [k for k in ref if "router.kernel" in k]
  assert router
  for k in ref:
    want = ref[k] * (0.01 if k in router else 1.0)
    np.testing.assert_allclose(scaled[k], want, rtol=1e-5, atol=1e-9, err_msg=k)
  # the same update as plain pretraining AdamW when every ratio is 1
  m = make()
  opt = nnx.Optimizer(m, make_optimizer(OPT, 10)[0], wrt=nnx.Param)
  before = jax.tree.map(lambda x: x, nnx.state(m, nnx.Param))
  opt.update(m, jax.tree.map(jnp.sin, nnx.state(m, nnx.Param)))
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(m, nnx.Param)), nnx.to_flat_state(before)):
    np.testing.assert_allclose(np.asarray(a[...]) - np.asarray(b[...]), ref[".".join(map(str, p))], rtol=1e-6, atol=0)

  frozen_model = make()
  opt, frozen = _one_update(frozen_model, GroupsConfig(freeze_router=True))
  for k in router:
    assert not np.any(frozen[k]), k  # unchanged
  moments = [p for p in _paths(nnx.state(opt)) if "router.kernel" in p]
  assert not moments, moments[:3]  # no optimizer state for frozen routers
  assert any(np.any(frozen[k]) for k in frozen if k not in router)


def test_vision_ratio_and_freeze_on_a_vl_model():
  cfg = VLConfig.tiny()
  make = lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0))  # noqa: E731
  _, ref = _one_update(make(), GroupsConfig())
  _, scaled = _one_update(make(), GroupsConfig(vision_lr_ratio=0.9))
  vision = [k for k in ref if k.startswith("vision_model.")]
  assert vision and all(group_of(tuple(k.split("."))) == "vision" for k in vision)
  for k in ref:
    np.testing.assert_allclose(scaled[k], ref[k] * (0.9 if k in vision else 1.0), rtol=1e-5, atol=1e-9, err_msg=k)
  opt, frozen = _one_update(make(), GroupsConfig(freeze_vision=True))
  assert all(not np.any(frozen[k]) for k in vision)
  moments = [p for p in _paths(nnx.state(opt)) if "vision_model" in p]
  assert not moments, moments[:3]


def test_pretraining_config_groups_freeze_the_router_and_are_validated(tmp_path, xla_cache):
  """`groups.*` through experiments/pretrain.py: a frozen router keeps its values from step to step while
  the rest trains; vision settings on a text model are refused naming the field."""
  import pytest

  from ernie_jax.loading import from_pretrained
  from ernie_jax.train.config import TrainConfigError
  from tests.train.test_pretrain import MICRO, _config, pretrain

  pretrain.train(_config(tmp_path / "run", xla_cache, **MICRO, steps=2, **{"checkpoint.every_steps": 1,
                                                                           "groups.freeze_router": True}))
  one, two = (nnx.to_flat_state(nnx.state(from_pretrained(str(tmp_path / "run" / "checkpoints" / str(s))), nnx.Param))
              for s in (1, 2))
  routers = [(p, a, b) for (p, a), (_, b) in zip(one, two) if "router" in ".".join(map(str, p))]
  assert routers and all(np.array_equal(np.asarray(a[...]), np.asarray(b[...])) for _, a, b in routers)
  assert any(not np.array_equal(np.asarray(a[...]), np.asarray(b[...])) for (p, a), (_, b) in zip(one, two)
             if "router" not in ".".join(map(str, p)))
  with pytest.raises(TrainConfigError, match="groups.freeze_vision"):
    pretrain.train(_config(tmp_path / "bad", xla_cache, **{"groups.freeze_vision": True}))
