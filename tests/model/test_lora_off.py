"""`lora_ops.adapters_off()`: a LoRA model (random, non-zero A and B) computes exactly its base model
inside the block — eagerly, with the switch entered inside a jitted function, around an already compiled
jitted function (jit's cache key holds the switch, so it retraces), and with the adapted and the base
forward in one trace (DPO: policy and reference from one set of weights) including its gradients."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax import ErnieForCausalLM, ModelConfig
from ernie_jax.config import LoraConfig
from ernie_jax.model import lora
from ernie_jax.model.lora_ops import adapters_off
from ernie_jax.model.state import path_str
from tests.helpers import rel

DENSE = ModelConfig.tiny_dense()
MOE = ModelConfig.tiny_moe(moe_impl="blocked")
TOKENS = jnp.asarray(np.random.RandomState(0).randint(3, 120, (2, 12)), jnp.int32)


def _model(cfg, with_lora: bool):
  """The model (with rank-4 LoRA on every default target) built abstractly, then filled from numpy: each
  array is drawn from a seed of its path, so the base weights of both models are the same, and A and B
  are non-zero. (Much faster than a concrete init on CPU.)"""
  make = lambda: ErnieForCausalLM(cfg, rngs=nnx.Rngs(0))  # noqa: E731
  model = nnx.eval_shape(lambda: lora.apply_lora(make(), LoraConfig(rank=4), rngs=nnx.Rngs(1)) if with_lora else make())

  def fill(path, sds):
    key = jax.tree_util.keystr(path)
    x = np.random.RandomState(zlib.crc32(key.encode())).standard_normal(sds.shape)
    return jnp.asarray(1 + 0.1 * x if "norm" in key else 0.1 * x, sds.dtype)

  nnx.update(model, jax.tree_util.tree_map_with_path(fill, nnx.state(model)))
  return model


@nnx.jit
def _logits(model, tokens):
  return model(tokens).logits


@nnx.jit
def _policy_and_reference(model, tokens):
  """Both forwards in one trace (the layer scan traced with and without adapters)."""
  policy = model(tokens).logits
  with adapters_off():
    return policy, model(tokens).logits


@nnx.jit
def _policy_and_reference_grads(model, tokens):
  """The same with the gradient (LoRA parameters) of a policy-minus-reference objective."""
  def objective(m):
    policy = m(tokens).logits
    with adapters_off():
      reference = jax.lax.stop_gradient(m(tokens).logits)
    return jnp.mean(jax.nn.logsumexp(policy, -1) - jax.nn.logsumexp(reference, -1)), (policy, reference)

  grads, (policy, reference) = nnx.grad(objective, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)(model)
  return policy, reference, grads


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_adapters_off_gives_the_base_model(cfg):
  base, model = _model(cfg, False), _model(cfg, True)
  targets = lora.lora_targets(model)
  assert any("/attn/" in p for p in targets) and any("/mlp/" in p for p in targets)
  if cfg.is_moe:
    assert any("/experts/" in p for p in targets) and any("/shared/" in p for p in targets)
  want = np.asarray(_logits(base, TOKENS))
  adapted = np.asarray(_logits(model, TOKENS))  # compiled with the adapters on
  assert rel(adapted, want) > 1e-2  # the adapters change the model

  # around the jitted function compiled above with the adapters on: retraced, not reused
  with adapters_off():
    np.testing.assert_array_equal(np.asarray(_logits(model, TOKENS)), want)
  # the switch is scoped: after the block the adapters are back (the first compilation again)
  np.testing.assert_array_equal(np.asarray(_logits(model, TOKENS)), adapted)

  if cfg.is_moe:  # entered inside the jitted function, next to an adapted forward
    policy, reference = _policy_and_reference(model, TOKENS)
  else:  # the same under nnx.grad (the DPO step), and eagerly
    policy, reference, grads = _policy_and_reference_grads(model, TOKENS)
    flat = {path_str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    assert set(flat) == {f"{t}_lora_{x}" for t in targets for x in "ab"}
    assert all(np.isfinite(g).all() for g in flat.values()) and any(np.abs(g).max() > 0 for g in flat.values())
    with adapters_off():  # eager (op by op, so equal to the compiled base up to rounding)
      np.testing.assert_allclose(np.asarray(model(TOKENS).logits), want, rtol=3e-6, atol=3e-6)
  np.testing.assert_allclose(np.asarray(policy), adapted, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(reference), want, rtol=1e-6, atol=1e-6)
