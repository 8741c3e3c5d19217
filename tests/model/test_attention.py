"""Attention masking: chunked causal path, segment isolation, cache masks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ernie_jax.model.attention import attend, cache_mask, causal_attend, full_mask


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
