"""The fused LM head + cross-entropy (`ernie_jax.train.linear_ce`) against the softmax formulas in numpy:
value, gradients (computed in its forward pass, scaled by the cotangent in its backward) and the
evaluation path without gradients, for both head layouts and a chunk that does not divide the sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.train import linear_ce


def _reference(y, w_vh, targets, weights):
  """sum(weights * NLL), d/dy and d/dW ([V, H]) from the softmax formulas, float64."""
  logits = y @ w_vh.T
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  nll = -np.log(np.take_along_axis(p, targets[..., None], -1))[..., 0]
  d = (p - np.eye(w_vh.shape[0])[targets]) * weights[..., None]
  return (nll * weights).sum(), d @ w_vh, np.einsum("bsv,bsh->vh", d, y)


@pytest.mark.parametrize("vocab_major", [True, False])
def test_fused_head_loss_matches_the_formula(vocab_major):
  rng = np.random.default_rng(0)
  b, s, h, v = 2, 13, 8, 37
  y = rng.standard_normal((b, s, h))
  w_vh = rng.standard_normal((v, h))
  targets = rng.integers(0, v, (b, s))
  weights = (rng.random((b, s)) > 0.3) * rng.random((b, s))
  value, dy, dw = _reference(y, w_vh, targets, weights)
  w = w_vh if vocab_major else w_vh.T
  args = [jnp.asarray(a, jnp.float32) for a in (y, w)] + [jnp.asarray(targets), jnp.asarray(weights, jnp.float32)]

  def loss(y, w, targets, weights, scale=1.0):
    return scale * linear_ce.nll_sum(y, w, targets, weights, chunk=5, vocab_major=vocab_major)

  np.testing.assert_allclose(jax.jit(loss)(*args), value, rtol=1e-5)  # no differentiation: the loss alone
  got, (gy, gw) = jax.value_and_grad(loss, argnums=(0, 1))(*args, scale=3.0)
  np.testing.assert_allclose(got, 3 * value, rtol=1e-5)
  np.testing.assert_allclose(gy, 3 * dy, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw, 3 * (dw if vocab_major else dw.T), rtol=1e-4, atol=1e-5)
  one_chunk = linear_ce.nll_sum(*args, chunk=64, vocab_major=vocab_major)  # chunk > sequence: one chunk
  np.testing.assert_allclose(one_chunk, value, rtol=1e-5)


def test_chunk_must_be_positive():
  with pytest.raises(ValueError, match="chunk must be a positive"):
    linear_ce.nll_sum(jnp.zeros((1, 2, 3)), jnp.zeros((4, 3)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)),
                      chunk=0, vocab_major=True)


@pytest.mark.parametrize("vocab_major", [True, False])
def test_per_position_nll_and_its_vjp_match_the_formula(vocab_major):
  """`token_nll` (DPO's per-sequence log-probs): the NLL of every position, and the VJP of an arbitrary
  per-position cotangent (its backward recomputes each chunk's logits)."""
  rng = np.random.default_rng(1)
  b, s, h, v = 2, 11, 8, 29
  y = rng.standard_normal((b, s, h))
  w_vh = rng.standard_normal((v, h))
  targets = rng.integers(0, v, (b, s))
  g = rng.standard_normal((b, s))
  logits = y @ w_vh.T
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  _, dy, dw = _reference(y, w_vh, targets, g)  # d(sum g * NLL): the VJP of cotangent g
  w = w_vh if vocab_major else w_vh.T
  fn = lambda y, w: linear_ce.token_nll(y, w, jnp.asarray(targets), chunk=4, vocab_major=vocab_major)  # noqa: E731
  got, vjp = jax.vjp(fn, jnp.asarray(y, jnp.float32), jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(got, nll, rtol=1e-5, atol=1e-5)
  gy, gw = vjp(jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(gy, dy, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw, dw if vocab_major else dw.T, rtol=1e-4, atol=1e-5)
