"""The forward side of LoRA: what a module computes when it holds LoRA parameters.

`ernie_jax.model.lora.apply_lora` adds, next to a base weight attribute `w`, the `nnx.LoRAParam`s
`w_lora_a` (W's input axes, then the rank) and `w_lora_b` (the rank, then W's output axes), and on
the module the static attributes `lora_scale` and `lora_dropout` (plus, with dropout, a `lora_salt`
variable). A module's forward asks `adapter(self, "w", dtype)`: None when the weight has no LoRA (the
module then runs exactly its code without LoRA), else a `Lora` with the arrays cast to the compute
dtype. The branch `scale * (dropout(x) A) B` is computed on activations, never as A·B:

* `dense_delta` for the dense projections (one einsum through the rank, one out of it);
* `ragged_delta` / `einsum_delta` / `block_delta` for the routed experts (per-expert A [E, H, r],
  B [E, r, I]): the same grouping as the base grouped matmul (two extra `ragged_dot`s, the batched
  einsum of the all_to_all transport, or one block's expert in the blocked form).

Dropout (rate `lora_dropout`, inverted: kept entries scaled by 1 / (1 - rate)) applies to the LoRA
branch input, and only inside `with dropout_key(key):` (training). The key must be a traced value
entered inside the jitted function (e.g. a step argument): a concrete key under a trace would be
baked into the compiled function and silently reused, so that is an error. Each module folds in
its `lora_salt` (a unique id per module and stacked layer, sliced by the layer scan like every
parameter) and the weight's name; routed experts under expert parallelism fold in the device's
index (`fold_devices`), and the blocked form the block index, so no two masks repeat.

`with adapters_off():` switches every adapter off: inside the block `adapter` returns None for every
module, so the model computes exactly its base (DPO's reference model: the frozen base of a LoRA
model, no second copy). The switch is read while tracing and is a `jax.make_user_context`, which is
part of jit's cache key: a function jitted (or a scan body traced) with the adapters on is retraced,
not reused, under `adapters_off()` — entering it inside or outside the jitted function both work.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

WEIGHT_IDS = {"q": 0, "k": 1, "v": 2, "o": 3, "gate": 4, "up": 5, "down": 6, "kernel": 7}

_KEY: contextvars.ContextVar = contextvars.ContextVar("lora_dropout_key", default=None)
_OFF = jax.make_user_context(default_value=False)  # in jit's cache key: switching it retraces


class LoraSalt(nnx.Variable):
  """Per-module (and per stacked layer) int32 id folded into the dropout key; not trainable."""


@struct.dataclass
class Lora:
  """One adapter as forward inputs: a [..., in..., r], b [..., r, out...] in the compute dtype, the
  static scale and dropout rate, and the dropout key (None: no dropout)."""

  a: jax.Array
  b: jax.Array
  key: jax.Array | None = None
  scale: float = struct.field(pytree_node=False, default=1.0)
  rate: float = struct.field(pytree_node=False, default=0.0)


class ExpertLora(NamedTuple):
  """The routed experts' adapters (each None when that projection has no LoRA)."""

  gate: Lora | None = None
  up: Lora | None = None
  down: Lora | None = None


@contextlib.contextmanager
def dropout_key(key: jax.Array):
  """LoRA dropout is active (with this key) for the model calls traced inside the block."""
  token = _KEY.set(key)
  try:
    yield
  finally:
    _KEY.reset(token)


@contextlib.contextmanager
def adapters_off():
  """Model calls traced (or run) inside the block compute the base model: `adapter` returns None."""
  with _OFF(True):
    yield


def adapter(module, name: str, dtype) -> Lora | None:
  """The LoRA of `module.<name>` cast to `dtype`, or None when the weight has none or adapters are off."""
  a = None if _OFF.value else getattr(module, f"{name}_lora_a", None)
  if a is None:
    return None
  rate = float(getattr(module, "lora_dropout", 0.0))
  key = _KEY.get()
  if key is not None and rate > 0:
    if not isinstance(key, jax.core.Tracer) and isinstance(a[...], jax.core.Tracer):
      raise ValueError("lora.dropout_key: the key is a constant inside a traced function (it would be compiled "
                       "in and reused); enter dropout_key(key) inside the jitted step with the key as an argument")
    key = jax.random.fold_in(jax.random.fold_in(key, module.lora_salt[...]), WEIGHT_IDS[name])
  else:
    key = None
  b = getattr(module, f"{name}_lora_b")
  return Lora(a[...].astype(dtype), b[...].astype(dtype), key, scale=float(module.lora_scale), rate=rate)


def expert_lora(experts, dtype) -> ExpertLora | None:
  """The adapters of an `Experts` module (None when it has none)."""
  out = ExpertLora(*(adapter(experts, n, dtype) for n in ("gate", "up", "down")))
  return None if all(x is None for x in out) else out


def dropout(x: jax.Array, lora: Lora, key=None) -> jax.Array:
  """Inverted dropout of the branch input (identity without a key or with rate 0)."""
  key = lora.key if key is None else key
  if key is None or lora.rate <= 0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - lora.rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - lora.rate, x.dtype), jnp.zeros((), x.dtype))


def dense_delta(x: jax.Array, lora: Lora, eq_a: str, eq_b: str) -> jax.Array:
  """scale * einsum(eq_b, einsum(eq_a, dropout(x), A), B)."""
  return lora.scale * jnp.einsum(eq_b, jnp.einsum(eq_a, dropout(x, lora), lora.a), lora.b)


def add(y: jax.Array, x: jax.Array, lora: Lora | None, eq_a: str, eq_b: str) -> jax.Array:
  """y + the LoRA branch of x (y unchanged when lora is None)."""
  return y if lora is None else y + dense_delta(x, lora, eq_a, eq_b).astype(y.dtype)


def ragged_delta(xs: jax.Array, lora: Lora, group_sizes: jax.Array) -> jax.Array:
  """Grouped rows xs [N, in] -> scale * ((dropout(xs) A_g) B_g) [N, out] with two ragged_dots."""
  rd = lambda u, w: jax.lax.ragged_dot(u, w, group_sizes)
  return lora.scale * rd(rd(dropout(xs, lora), lora.a), lora.b)


def einsum_delta(x: jax.Array, lora: Lora, eq_a: str, eq_b: str) -> jax.Array:
  return dense_delta(x, lora, eq_a, eq_b)


def block_delta(x: jax.Array, lora: Lora, group, block) -> jax.Array:
  """One block x [rows, in] of the blocked grouped matmul, all rows of expert `group`."""
  key = None if lora.key is None else jax.random.fold_in(lora.key, block)
  return lora.scale * ((dropout(x, lora, key) @ lora.a[group]) @ lora.b[group])


def expert_delta(x: jax.Array, lora: Lora, e: int) -> jax.Array:
  """Expert e applied to every row (the loop oracle); dropout mask per expert."""
  key = None if lora.key is None else jax.random.fold_in(lora.key, e)
  return lora.scale * ((dropout(x, lora, key) @ lora.a[e]) @ lora.b[e])


def fold_devices(lora: ExpertLora | None, axes) -> ExpertLora | None:
  """Inside shard_map: fold this device's index over `axes` into the dropout keys."""
  if lora is None:
    return None
  idx = jnp.zeros((), jnp.int32)
  for ax in axes:
    idx = idx * jax.lax.axis_size(ax) + jax.lax.axis_index(ax)
  fold = lambda l: l if l is None or l.key is None else l.replace(key=jax.random.fold_in(l.key, idx))
  return ExpertLora(*(fold(l) for l in lora))
