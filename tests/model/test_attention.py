"""Attention masking: chunked causal path, segment isolation, cache masks; the fused kernels against it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax.config.model import ModelConfig
from ernie_jax.model import attention_kernels
from ernie_jax.model.attention import attend, cache_mask, causal_attend, full_mask
from ernie_jax.model.lm import ErnieForCausalLM
from ernie_jax.parallel import MeshConfig, make_mesh
from ernie_jax.parallel.sharding import DEFAULT_RULES


def _qkv(b=2, s=64, n=4, kv=2, d=8, seed=0):
  rs = np.random.RandomState(seed)
  return (jnp.asarray(rs.randn(b, s, n, d), jnp.float32), jnp.asarray(rs.randn(b, s, kv, d), jnp.float32),
          jnp.asarray(rs.randn(b, s, kv, d), jnp.float32))


def test_chunked_causal_equals_dense_mask():
  q, k, v = _qkv()
  seg = jnp.asarray(np.repeat([[1, 2, 3, 4]], 16, axis=1).reshape(1, 64).repeat(2, 0))
  for segment_ids in (None, seg):
    want = attend(q, k, v, full_mask(segment_ids, 2, 64))
    got = causal_attend(q, k, v, segment_ids, chunk=16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_segments_do_not_leak():
  """Changing document 1's tokens leaves document 2's outputs untouched."""
  q, k, v = _qkv(b=1, s=32)
  seg = jnp.asarray([[1] * 12 + [2] * 20])
  out = causal_attend(q, k, v, seg, chunk=8)
  k2 = k.at[:, :12].set(k[:, :12] * 3 + 1)
  v2 = v.at[:, :12].set(-v[:, :12])
  out2 = causal_attend(q, k2, v2, seg, chunk=8)
  np.testing.assert_array_equal(out[:, 12:], out2[:, 12:])
  assert np.abs(np.asarray(out[:, :12] - out2[:, :12])).max() > 1e-3


def test_cache_mask():
  m = np.asarray(cache_mask(jnp.asarray([[0, 3], [2, 5]]), 6))
  assert m[0, 1].tolist() == [True, True, True, True, False, False]
  assert m[1, 0].tolist() == [True, True, True, False, False, False]


# -- fused kernels (ernie_jax.model.attention_kernels) ---------------------------------------------------------------
def _packed(b, s, seed=1):
  """Segment ids of packed documents: random document lengths per row."""
  rs = np.random.RandomState(seed)
  rows = []
  for _ in range(b):
    cuts = np.sort(rs.choice(np.arange(1, s), size=3, replace=False))
    rows.append(np.searchsorted(cuts, np.arange(s), side="right"))
  return jnp.asarray(np.stack(rows), jnp.int32)


def _value_and_grads(fn, q, k, v):
  """The output and the gradients of a weighted sum of it (the weights make every position count differently)."""
  w = jnp.asarray(np.random.RandomState(3).randn(*q.shape), jnp.float32)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v) * w)  # noqa: E731
  return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("seq, packed", [(200, True), (128, False)])
def test_splash_kernel_equals_blocked_attention(seq, packed):
  """The TPU splash kernel (Pallas interpret mode on CPU), incl. the padding of a sequence that is not a multiple of
  128 and packed documents as segment ids: outputs and q/k/v gradients equal the XLA form's."""
  q, k, v = _qkv(b=2, s=seq, n=4, kv=2, d=32)
  seg = _packed(2, seq) if packed else None
  got, got_g = _value_and_grads(lambda q, k, v: attention_kernels.splash_attend(q, k, v, seg), q, k, v)
  want, want_g = _value_and_grads(lambda q, k, v: causal_attend(q, k, v, seg), q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
  for a, b in zip(got_g, want_g):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


def test_splash_under_a_mesh_splits_batch_and_heads():
  """Under a data x tensor mesh the kernel runs in shard_map on each device's rows and heads: same values and
  gradients; a rule that splits the sequence is refused."""
  q, k, v = _qkv(b=2, s=128, n=4, kv=2, d=32)
  seg = _packed(2, 128)
  mesh = make_mesh(MeshConfig(data=2, tensor=2), devices=jax.devices()[:4])
  with jax.set_mesh(mesh):
    got, got_g = jax.jit(lambda q, k, v: _value_and_grads(
      lambda q, k, v: attention_kernels.splash_attend(q, k, v, seg), q, k, v))(q, k, v)
  want, want_g = _value_and_grads(lambda q, k, v: causal_attend(q, k, v, seg), q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
  for a, b in zip(got_g, want_g):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
  rules = tuple((name, "tensor" if name == "length" else None) for name, _ in DEFAULT_RULES)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="'length'"):
    attention_kernels.splash_attend(q, k, v, seg, rules=rules)


def test_cudnn_call_masks_segments_like_the_blocked_form():
  """The cuDNN path's call (mask, causality, GQA layout) through jax's XLA implementation of the same function."""
  q, k, v = _qkv(b=2, s=64, n=4, kv=2, d=16)
  seg = _packed(2, 64)
  got = attention_kernels.cudnn_attend(q, k, v, seg, implementation="xla")
  np.testing.assert_allclose(got, causal_attend(q, k, v, seg), rtol=1e-5, atol=1e-6)


def test_auto_picks_splash_on_tpu_only():
  assert [attention_kernels.resolve("auto", b) for b in ("tpu", "gpu", "cpu")] == ["splash", "xla", "xla"]
  assert attention_kernels.resolve("cudnn", "tpu") == "cudnn"


def test_model_with_splash_attention_gives_the_same_logits():
  """`model.attention_impl='splash'` through the decoder stack (packed rows, a length the kernel pads)."""
  tokens = jnp.asarray(np.random.RandomState(0).randint(3, 256, (2, 72)), jnp.int32)
  seg = _packed(2, 72)
  models = [ErnieForCausalLM(ModelConfig.tiny_dense(attention_impl=impl), rngs=nnx.Rngs(0)) for impl in ("xla", "splash")]
  graphs, states = zip(*(nnx.split(m) for m in models))
  run = [jax.jit(lambda st, t, g=g: nnx.merge(g, st)(t, segment_ids=seg).logits) for g in graphs]
  jaxprs = [str(jax.make_jaxpr(f)(st, tokens)) for f, st in zip(run, states)]
  assert ["pallas_call" in j for j in jaxprs] == [False, True]  # the kernel is what ran
  np.testing.assert_allclose(run[1](states[1], tokens), run[0](states[0], tokens), rtol=1e-4, atol=1e-4)
