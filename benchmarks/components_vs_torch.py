"""Where a train step's time goes: forward + backward of each part of the model, JAX vs PyTorch, same shapes, fp32.

  python benchmarks/components_vs_torch.py                      # ERNIE-4.5-0.3B widths, 2 x 512 tokens
  python benchmarks/components_vs_torch.py --hidden 512 --inter 1408 --vocab 32000 --tokens 2048

Parts (each timed as value-and-grad of a scalar, median of --iters after a warm-up, min/max spread):
  mlp        SwiGLU down(silu(x gate) * (x up)), ernie_jax.model.layers.swiglu vs the same in torch
  attention  causal GQA attention with RoPE-free q/k/v (ernie_jax.model.attention.causal_attend vs
             torch.nn.functional.scaled_dot_product_attention(is_causal=True))
  lm_loss    tied LM head + cross-entropy over the vocabulary (ernie_jax.train.losses.lm_loss_sum vs
             torch.nn.functional.cross_entropy)
  lm_fused   the same loss through the fused head + cross-entropy (ernie_jax.train.linear_ce, one chunk of
             --seq positions; what `loss.lm_chunk` runs) vs torch's plain one
  matmul     a plain [tokens, hidden] x [hidden, inter] matmul forward + backward (the backend's own rate)
  rows       forward-only [M, hidden] x [hidden, inter] matmuls for M = 64 .. 2048 (the sizes of attention
             blocks and MoE expert groups), fastest-tenth and median GFLOP/s of 200 calls each
Prints ms per part for each framework, their ratio (torch time / jax time: > 1 means JAX is faster) and the
achieved GFLOP/s. The load average is printed before and after (a busy machine is flagged).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_util import MIN_RUNS, machine_line, timed  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", type=int, default=1024, help="rows x sequence (attention: --seq per row)")
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--inter", type=int, default=3072)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--vocab", type=int, default=103424)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--parts", default="matmul,mlp,attention,lm_loss,lm_fused,rows")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from ernie_jax.model.attention import causal_attend
  from ernie_jax.model.layers import swiglu
  from ernie_jax.train import linear_ce
  from ernie_jax.train.losses import lm_loss_sum

  print(machine_line("before"))
  rng = np.random.default_rng(0)
  t, h, i, v = args.tokens, args.hidden, args.inter, args.vocab
  b, s = t // args.seq, args.seq
  n, kv, d = args.heads, args.kv_heads, args.head_dim

  def arr(*shape, scale=0.02):
    return (rng.standard_normal(shape) * scale).astype(np.float32)

  def time_jax(f, inputs):
    g = jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(inputs)))))
    jax.block_until_ready(g(*inputs))  # compile
    return timed(lambda: jax.block_until_ready(g(*inputs)), args.iters)

  def time_torch(f, inputs):
    ts = [torch.tensor(x, requires_grad=True) for x in inputs]

    def once():
      for x in ts:
        x.grad = None
      f(*ts).backward()

    once()  # warm-up
    return timed(once, args.iters)

  x, gate, up, down = arr(t, h, scale=1.0), arr(h, i), arr(h, i), arr(i, h)
  q, k, vv = arr(b, s, n, d, scale=1.0), arr(b, s, kv, d, scale=1.0), arr(b, s, kv, d, scale=1.0)
  emb = arr(v, h)
  targets = rng.integers(0, v, (t,))
  parts = {
    "matmul": (2 * 3 * t * h * i,
               lambda x, w: jnp.sum(x @ w), lambda x, w: (x @ w).sum(), (x, gate)),
    "mlp": (3 * 2 * 3 * t * h * i,
            lambda x, g, u, w: jnp.sum(swiglu(x, g, u, w)),
            lambda x, g, u, w: ((torch.nn.functional.silu(x @ g) * (x @ u)) @ w).sum(), (x, gate, up, down)),
    "attention": (3 * 2 * 2 * b * n * s * s * d // 2,
                  lambda q, k, v: jnp.sum(causal_attend(q, k, v, jnp.ones((b, s), jnp.int32))),
                  lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                    enable_gqa=True).sum(), (q, k, vv)),
    "lm_loss": (3 * 2 * t * h * v,
                lambda x, e: lm_loss_sum((x @ e.T)[None], jnp.asarray(targets)[None], jnp.ones((1, t)))[0] / t,
                lambda x, e: torch.nn.functional.cross_entropy(x @ e.T, torch.as_tensor(targets)), (x, emb)),
    "lm_fused": (3 * 2 * t * h * v,
                 lambda x, e: linear_ce.nll_sum(x.reshape(b, s, h), e, jnp.asarray(targets).reshape(b, s),
                                                jnp.ones((b, s)), chunk=s, vocab_major=True) / t,
                 lambda x, e: torch.nn.functional.cross_entropy(x @ e.T, torch.as_tensor(targets)), (x, emb)),
  }
  def ms(times):
    return f"{np.median(times) * 1e3:8.1f} ({min(times) * 1e3:.0f}-{max(times) * 1e3:.0f})"

  if args.iters < MIN_RUNS:
    print(f"note: --iters {args.iters} < {MIN_RUNS}: the spreads mean little")
  print(f"{'part':10} {'jax ms (min-max)':>20} {'torch ms (min-max)':>20} {'torch/jax':>9} {'jax GFLOP/s':>11} "
        f"{'torch GFLOP/s':>13}")
  names = args.parts.split(",")
  for name in names:
    if name == "rows":
      continue
    flops, fj, ft, inputs = parts[name]
    tj, tt = time_jax(fj, inputs), time_torch(ft, inputs)
    mj, mt = float(np.median(tj)), float(np.median(tt))
    print(f"{name:10} {ms(tj):>20} {ms(tt):>20} {mt / mj:9.2f} "
          f"{flops / mj / 1e9:11.1f} {flops / mt / 1e9:13.1f}")
  if "rows" in names:
    print(f"forward [M, {h}] x [{h}, {i}] GFLOP/s, fastest tenth / median of 200 calls (one jitted dot per call):")
    print(f"{'M':>6} {'jax':>11} {'torch':>11} {'torch/jax':>9}")
    for m in (64, 128, 256, 512, 1024, 2048):
      a, w = arr(m, h, scale=1.0), arr(h, i)
      ja, jw, ta, tw = jnp.asarray(a), jnp.asarray(w), torch.tensor(a), torch.tensor(w)
      f = jax.jit(lambda a, w: a @ w)
      rates = []
      for call in (lambda: f(ja, jw).block_until_ready(), lambda: ta @ tw):
        timed(call, 5)  # warm-up (the first jax call compiles)
        times = sorted(timed(call, 200))
        rates.append((2 * m * h * i / times[len(times) // 10] / 1e9, 2 * m * h * i / times[len(times) // 2] / 1e9))
      (jf, jm), (tf, tm) = rates
      print(f"{m:6d} {jf:5.0f} / {jm:3.0f} {tf:5.0f} / {tm:3.0f} {tm / jm:9.2f}")
  print(machine_line("after"))


if __name__ == "__main__":
  main()
