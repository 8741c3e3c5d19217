"""Typed checkpoint transforms: every transform's source shape, and from_params inverts to_params."""

from __future__ import annotations

import numpy as np
import pytest

from ernie_jax.interop.transforms import Copy, Fuse, InOut, Linear, Read, Row, Slot, Squeeze


def _read(fuse, *transforms):
  return Read("t", tuple(Slot(f"p{i}", (), t) for i, t in enumerate(transforms)), fuse)


CASES = {  # read, slot shapes, expected source shape
  "copy": (_read(Fuse.NONE, Copy()), [(4, 3)], (4, 3)),
  "squeeze": (_read(Fuse.NONE, Squeeze()), [(5,)], (1, 5)),
  "linear1": (_read(Fuse.NONE, Linear(1)), [(8, 2, 3)], (6, 8)),  # torch q_proj [nH*d, H]
  "linear2": (_read(Fuse.NONE, Linear(2)), [(2, 3, 8)], (8, 6)),  # torch o_proj [H, nH*d]
  "inout2": (_read(Fuse.NONE, InOut(2)), [(2, 3, 8)], (6, 8)),
  "concat": (_read(Fuse.CONCAT, InOut(1), InOut(1)), [(8, 5), (8, 5)], (8, 10)),
  "gqa": (_read(Fuse.GQA, InOut(1), InOut(1), InOut(1)), [(8, 4, 3), (8, 2, 3), (8, 2, 3)], (8, 24)),
  "rows": (_read(Fuse.ROWS, Row(1), Row(0)), [(6,), (6,)], (2, 6)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip(case):
  read, targets, want = CASES[case]
  assert read.source_shape(targets) == want
  x = np.random.RandomState(0).randn(*want).astype(np.float32)
  parts = read.to_params(x, targets)
  assert [p.shape for p in parts] == [tuple(t) for t in targets]
  np.testing.assert_array_equal(read.from_params(parts), x)


def test_known_layouts():
  w = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)  # torch Linear [out=nH*d, in=H]
  (q,) = _read(Fuse.NONE, Linear(1)).to_params(w, [(8, 2, 3)])
  np.testing.assert_array_equal(q, w.T.reshape(8, 2, 3))
  b = np.arange(12, dtype=np.float32).reshape(2, 6)
  text, vision = _read(Fuse.ROWS, Row(0), Row(1)).to_params(b, [(6,), (6,)])
  np.testing.assert_array_equal(text, b[0])
  np.testing.assert_array_equal(vision, b[1])
  # PaddleFormers' GQA qkv: [q heads of group g, k_g, v_g] per KV head
  h, nkv, g, d = 4, 2, 2, 3
  qkv = np.arange(h * nkv * (g + 2) * d, dtype=np.float32).reshape(h, nkv, g + 2, d)
  q, k, v = _read(Fuse.GQA, InOut(1), InOut(1), InOut(1)).to_params(qkv.reshape(h, -1), [(h, nkv * g, d),
                                                                                         (h, nkv, d), (h, nkv, d)])
  np.testing.assert_array_equal(q, qkv[:, :, :g].reshape(h, nkv * g, d))
  np.testing.assert_array_equal(k, qkv[:, :, g])
  np.testing.assert_array_equal(v, qkv[:, :, g + 1])
