"""Typed checkpoint transforms: how a checkpoint tensor's layout maps onto parameter slots.

A *slot* is a parameter path of `nnx.state(model)` plus an index into its leading stacked axes
(layer repeat, expert); `target` below is the slot's shape (stacked axes removed). Each slot has a
`Transform` between the tensor (or its 2-D part, for fused tensors) and the slot's value:

  Copy()        same layout (norm weights, embedding, biases, [H, E] VL routers)
  Squeeze()     [1, *target] <-> target (the [1, E] correction bias)
  Linear(n)     torch Linear [out, in]: transposed to [in, out] and reshaped so the first n axes of
                the parameter hold `in` (HF q_proj [nH*d, H] -> [H, nH, d] is Linear(1), o_proj
                [H, nH*d] -> [nH, d, H] is Linear(2))
  InOut(n)      Paddle Linear [in, out] = the parameter reshaped to [prod(target[:n]), prod(target[n:])]
  Row(r)        row r of a tensor stacking several slots (the VL [2, E] correction bias)

A `Read` (one checkpoint tensor -> its slots) adds how its slots are fused (`Fuse`):

  NONE     one slot
  CONCAT   the slots' 2-D [in, out_i] forms concatenated along the last axis (qkv, up_gate)
  GQA      q, k, v grouped per KV head: [H, nKV * (G + 2) * d], G = query heads per KV head
  ROWS     the slots stacked along a new first axis, slot i being `Row(r)` (row r)

Every transform has `source_shape` (the checkpoint tensor's shape for given slot shapes),
`to_params` (tensor -> slot values, views where possible) and `from_params` (the inverse, export).
The format tables (`hf.py`, `hf_vl.py`, `paddle.py`, `paddle_vl.py`) hold only names and these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # same-size raw views for fast copies


def transposed(x: np.ndarray, tile: int = 128) -> np.ndarray:
  """x.T (2-D) as a new C-contiguous array. Copied in cache-sized tiles and as raw unsigned ints
  (ml_dtypes' bf16 goes through a slow generic copy loop): 2-3x numpy's plain transpose."""
  x = np.ascontiguousarray(x)
  u = UINT.get(x.dtype.itemsize)
  src = x.view(u) if u is not None else x
  m, n = src.shape
  out = np.empty((n, m), src.dtype)
  for i in range(0, m, tile):
    out[:, i:i + tile] = src[i:i + tile].T
  return out.view(x.dtype) if u is not None else out


def _prod(shape) -> int:
  return int(np.prod(shape))


# --------------------------------------------------------------------------------------------------
# Per-slot transforms
class Transform:
  """One slot's transform. `source_shape(target)`: the tensor (part) that fills a slot of shape
  `target`; `to_param(x, target)`; `from_param(value)` (its inverse)."""

  def source_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
    raise NotImplementedError

  def to_param(self, x: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    raise NotImplementedError

  def from_param(self, x: np.ndarray) -> np.ndarray:
    raise NotImplementedError


@dataclass(frozen=True)
class Copy(Transform):
  def source_shape(self, target):
    return tuple(target)

  def to_param(self, x, target):
    return x

  def from_param(self, x):
    return x


@dataclass(frozen=True)
class Squeeze(Transform):
  def source_shape(self, target):
    return (1,) + tuple(target)

  def to_param(self, x, target):
    return x.reshape(target)

  def from_param(self, x):
    return x.reshape((1,) + x.shape)


@dataclass(frozen=True)
class Linear(Transform):
  in_axes: int

  def source_shape(self, target):
    return (_prod(target[self.in_axes:]), _prod(target[:self.in_axes]))

  def to_param(self, x, target):
    return transposed(x).reshape(target)

  def from_param(self, x):
    return transposed(x.reshape(_prod(x.shape[:self.in_axes]), -1))


@dataclass(frozen=True)
class InOut(Transform):
  in_axes: int

  def source_shape(self, target):
    return (_prod(target[:self.in_axes]), _prod(target[self.in_axes:]))

  def to_param(self, x, target):
    return x.reshape(target)

  def from_param(self, x):
    return x.reshape(_prod(x.shape[:self.in_axes]), -1)


@dataclass(frozen=True)
class Row(Transform):
  r: int

  def source_shape(self, target):
    return tuple(target)

  def to_param(self, x, target):
    return x[self.r]

  def from_param(self, x):
    return x


# --------------------------------------------------------------------------------------------------
# Checkpoint tensors
@dataclass(frozen=True)
class Slot:
  path: str  # '/'-joined parameter path in nnx.state(model)
  index: tuple[int, ...]  # index into the leading stacked axes (repeat, expert)
  transform: Transform


class Fuse(enum.Enum):
  NONE = "none"
  CONCAT = "concat"
  GQA = "gqa"
  ROWS = "rows"

  def source_shape(self, slots, targets) -> tuple[int, ...]:
    if self is Fuse.NONE:
      return tuple(slots[0].transform.source_shape(tuple(targets[0])))
    if self is Fuse.ROWS:
      return (len(slots),) + tuple(targets[0])
    forms = [s.transform.source_shape(tuple(t)) for s, t in zip(slots, targets)]  # 2-D [in, out_i]
    return (forms[0][0], sum(f[1] for f in forms))

  def to_params(self, slots, x: np.ndarray, targets) -> list[np.ndarray]:
    if self is Fuse.NONE:
      return [slots[0].transform.to_param(x, tuple(targets[0]))]
    if self is Fuse.ROWS:
      return [s.transform.to_param(x, tuple(t)) for s, t in zip(slots, targets)]
    if self is Fuse.CONCAT:
      widths = np.cumsum([s.transform.source_shape(tuple(t))[1] for s, t in zip(slots, targets)])[:-1]
      return [p.reshape(t) for p, t in zip(np.split(x, widths, axis=-1), targets)]
    (h, nh, d), (_, nkv, _) = targets[0], targets[1]  # GQA; q [H, nH, d], k / v [H, nKV, d]
    g = nh // nkv
    grouped = x.reshape(h, nkv, g + 2, d)
    return [grouped[:, :, :g].reshape(h, nh, d), grouped[:, :, g], grouped[:, :, g + 1]]

  def from_params(self, slots, values: list[np.ndarray]) -> np.ndarray:
    if self is Fuse.NONE:
      return np.ascontiguousarray(slots[0].transform.from_param(values[0]))
    if self is Fuse.ROWS:
      order = sorted(range(len(slots)), key=lambda i: slots[i].transform.r)
      return np.stack([values[i] for i in order])
    parts = [s.transform.from_param(v) for s, v in zip(slots, values)]
    if self is Fuse.CONCAT:
      return np.concatenate(parts, axis=-1)
    h, nkv, d = values[1].shape  # GQA
    q = values[0].reshape(h, nkv, -1, d)
    return np.concatenate([q, values[1][:, :, None], values[2][:, :, None]], axis=2).reshape(h, -1)


@dataclass(frozen=True)
class Read:
  """One checkpoint tensor: its name, the slots it fills (in the order `to_params` returns them)
  and how they are fused."""
  name: str
  slots: tuple[Slot, ...]
  fuse: Fuse = Fuse.NONE

  def source_shape(self, targets) -> tuple[int, ...]:
    return self.fuse.source_shape(self.slots, targets)

  def to_params(self, x: np.ndarray, targets) -> list[np.ndarray]:
    return self.fuse.to_params(self.slots, x, targets)

  def from_params(self, values: list[np.ndarray]) -> np.ndarray:
    return self.fuse.from_params(self.slots, values)
