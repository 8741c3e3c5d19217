"""MoE losses against direct numpy implementations of the spec formulas; the bias update rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax import ErnieForCausalLM, ModelConfig
from ernie_jax.model.moe.router import route
from ernie_jax.train import moe_losses as ml


def _router(seed=0, layers=2, tokens=12, hidden=8, experts=5, k=2):
  rs = np.random.RandomState(seed)
  outs = [route(jnp.asarray(rs.randn(tokens, hidden), jnp.float32),
                jnp.asarray(rs.randn(hidden, experts), jnp.float32),
                jnp.asarray(rs.randn(experts) * 0.3, jnp.float32), k, 1e-12) for _ in range(layers)]
  return jax.tree.map(lambda *a: jnp.stack(a), *outs)


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_load_balance_loss_formula():
  r = _router()
  mask = np.array([1] * 9 + [0] * 3, np.float32)
  got = ml.load_balance_loss(r, jnp.asarray(mask))
  want = 0.0
  for l in range(2):
    p = _np_softmax(np.asarray(r.logits[l], np.float64))[mask > 0]
    s, e = p.shape
    top = np.argsort(-p, -1)[:, :2]  # unbiased top-k
    counts = np.array([(top == i).any(-1).sum() for i in range(e)])
    want += e * np.sum(p.sum(0) / s * counts / s)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_z_loss_formula():
  r = _router(1)
  mask = np.array([1, 0] * 6, np.float32)
  got = ml.z_loss(r, jnp.asarray(mask))
  lg = np.asarray(r.logits, np.float64)
  lse = np.log(np.exp(lg).sum(-1))
  want = sum(np.mean(lse[l][mask > 0] ** 2) for l in range(2))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_orthogonal_loss_formula():
  rs = np.random.RandomState(2)
  kernels = rs.randn(3, 8, 5).astype(np.float32)  # [L, H, E]
  want = 0.0
  for l in range(3):
    w = kernels[l].T.astype(np.float64)
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    m = w @ w.T - np.eye(5)
    want += (m ** 2).sum() / m.size
  np.testing.assert_allclose(ml.orthogonal_loss(jnp.asarray(kernels)), want, rtol=1e-5)


def test_bias_update_direction_and_no_grad():
  cfg = ModelConfig.tiny_moe(num_hidden_layers=4, moe_layer_start_index=1, moe_layer_interval=1)
  model = ErnieForCausalLM(cfg, rngs=nnx.Rngs(0))
  out = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 16))))
  usage = ml.expert_usage(out.router)
  assert usage.shape == (3, cfg.moe_num_experts)
  np.testing.assert_allclose(usage.sum(-1), 2 * 16 * cfg.moe_k)
  before = np.asarray(ml.router_values(model, "correction_bias"))
  ml.update_correction_bias(model, usage, lr=0.01)
  after = np.asarray(ml.router_values(model, "correction_bias"))
  u = np.asarray(usage)
  expected = np.sign(u.mean(-1, keepdims=True) - u) * 0.01
  np.testing.assert_allclose(after - before, expected, atol=1e-7)
  over = u > u.mean(-1, keepdims=True)
  assert (after - before)[over].max() < 0 and (after - before)[~over & (u < u.mean(-1, keepdims=True))].min() > 0
  # the bias is a Buffer, not a Param: no gradient flows to it
  grads = nnx.jit(nnx.grad(lambda m: m(jnp.ones((1, 4), jnp.int32)).logits.sum()))(model)
  assert not any("correction_bias" in "/".join(map(str, p)) for p, _ in nnx.to_flat_state(grads))
