"""The LM head fused with the cross-entropy, a chunk of positions at a time.

`nll_sum(y, w, targets, weights, chunk=c)` is `sum_t weights_t * NLL_t` with `logits = y @ W.T` (fp32),
computed over the sequence in chunks of `c` positions: the fp32 logits of the whole batch ([B, S, V]:
13.5 GB for 32k tokens of a 103k vocabulary) never exist, only one chunk's ([B, c, V]).

The loss is the last operation of the step and its cotangent is one scalar, so the forward pass also
computes the gradients (the "fused linear cross-entropy" trick): per chunk, `d = weights * (softmax -
onehot)`, `dy = d @ W` and `dW += d.T @ y`; the backward only scales them. That keeps the three head
matmuls of plain autodiff (no recomputed logits) and frees each chunk's logits right away. Without
differentiation (evaluation) only the loss is computed.

`token_nll` gives the per-position NLL instead, for losses that are not a weighted sum of it (DPO's
per-sequence log-probabilities); its backward computes each chunk's logits again.

Chunks run along the sequence, so a batch sharded over data stays sharded; the chunk's logits are
constrained like the model's (`batch`, `length`, `act_vocab`), so a vocabulary split over a tensor axis
stays split. `weights` (the loss mask and normalisation) get no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ernie_jax.parallel.sharding import constrain


def nll_sum(y: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array, *, chunk: int,
            vocab_major: bool, rules=None) -> jax.Array:
  """sum over positions of weights * NLL(softmax(y @ W.T), targets), fp32.

  y [B, S, H] (the final-normed hidden state, in the compute dtype); w: the head, [V, H] when
  `vocab_major` (tied embedding) else [H, V]; targets [B, S] int; weights [B, S]; chunk: positions
  per chunk (S need not be a multiple); rules: the model's logical sharding rules."""
  _check_chunk(chunk)
  return _nll_sum(y, w, targets, weights.astype(jnp.float32), chunk, vocab_major, rules)


def _check_chunk(chunk: int) -> None:
  if chunk < 1:
    raise ValueError(f"chunk must be a positive number of positions, got {chunk}")


def _chunks(a: jax.Array, c: int) -> jax.Array:
  """[B, S, ...] -> [n, B, c, ...], zero-padded to n * c positions."""
  b, s = a.shape[:2]
  n = -(-s // c)
  a = jnp.pad(a, [(0, 0), (0, n * c - s)] + [(0, 0)] * (a.ndim - 2))
  return jnp.moveaxis(a.reshape((b, n, c) + a.shape[2:]), 1, 0)


def _scan(y, w, targets, weights, chunk, vocab_major, rules, *, grads: bool, per_position: bool = False):
  """(sum of weights * NLL, per-position NLL [B, S] if per_position, (dy, dW) of that sum if grads)."""
  b, s, h = y.shape
  c = min(chunk, s)
  wd = w.astype(y.dtype)
  head = "th,vh->tv" if vocab_major else "th,hv->tv"

  def body(carry, xs):
    yc, tc, mc = xs
    y2 = yc.reshape(b * c, h)  # 2-D matmuls (faster weight gradients on XLA:CPU than over [B, c])
    logits = jnp.einsum(head, y2, wd, preferred_element_type=jnp.float32)
    logits = constrain(logits.reshape(b, c, -1), ("batch", "length", "act_vocab"), rules).reshape(b * c, -1)
    t, m = tc.reshape(-1), mc.reshape(-1)
    lse = jax.nn.logsumexp(logits, axis=-1)
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == t[:, None]
    nll = lse - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    out = {"nll": nll.reshape(b, c)} if per_position else {}
    carry = dict(carry, loss=carry["loss"] + jnp.sum(m * nll))
    if grads:
      d = ((jnp.exp(logits - lse[:, None]) - hit) * m[:, None]).astype(y.dtype)  # dNLL/dlogits, weighted
      dy = jnp.einsum("tv,vh->th" if vocab_major else "tv,hv->th", d, wd, preferred_element_type=jnp.float32)
      out["dy"] = dy.astype(y.dtype).reshape(b, c, h)
      carry["dw"] = carry["dw"] + (jnp.einsum("tv,th->vh", d, y2, preferred_element_type=jnp.float32) if vocab_major
                                   else jnp.einsum("th,tv->hv", y2, d, preferred_element_type=jnp.float32))
    return carry, out

  init = {"loss": jnp.zeros((), jnp.float32)}
  if grads:
    init["dw"] = jnp.zeros(w.shape, jnp.float32)
  carry, out = jax.lax.scan(body, init, (_chunks(y, c), _chunks(targets, c), _chunks(weights, c)))
  unchunk = lambda a: jnp.moveaxis(a, 0, 1).reshape((b, -1) + a.shape[3:])[:, :s]  # noqa: E731
  nll = unchunk(out["nll"]) if per_position else None
  return carry["loss"], nll, (unchunk(out["dy"]), carry["dw"].astype(w.dtype)) if grads else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _nll_sum(y, w, targets, weights, chunk, vocab_major, rules):
  return _scan(y, w, targets, weights, chunk, vocab_major, rules, grads=False)[0]


def _nll_sum_fwd(y, w, targets, weights, chunk, vocab_major, rules):
  loss, _, grads = _scan(y, w, targets, weights, chunk, vocab_major, rules, grads=True)
  return loss, grads


def _nll_sum_bwd(chunk, vocab_major, rules, res, g):
  dy, dw = res
  return (g * dy).astype(dy.dtype), (g * dw).astype(dw.dtype), None, None


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)


def token_nll(y: jax.Array, w: jax.Array, targets: jax.Array, *, chunk: int, vocab_major: bool,
              rules=None) -> jax.Array:
  """Per-position NLL [B, S] fp32 of the head on y (arguments as `nll_sum`), for losses that are not a
  weighted sum of it (DPO's per-sequence log-probabilities). Its backward computes each chunk's logits
  again (one more head matmul than `nll_sum`: the per-position cotangents are only known then)."""
  _check_chunk(chunk)
  return _token_nll(y, w, targets, chunk, vocab_major, rules)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _token_nll(y, w, targets, chunk, vocab_major, rules):
  ones = jnp.ones(targets.shape, jnp.float32)
  return _scan(y, w, targets, ones, chunk, vocab_major, rules, grads=False, per_position=True)[1]


def _token_nll_fwd(y, w, targets, chunk, vocab_major, rules):
  return _token_nll(y, w, targets, chunk, vocab_major, rules), (y, w, targets)


def _token_nll_bwd(chunk, vocab_major, rules, res, g):
  y, w, targets = res
  _, _, (dy, dw) = _scan(y, w, targets, g.astype(jnp.float32), chunk, vocab_major, rules, grads=True)
  return dy, dw, None


_token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)
