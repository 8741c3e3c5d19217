"""Extra forward / forward+backward time of LoRA (all targets, incl. routed experts) on a small MoE vs
the same model without LoRA, on the current backend. Not a test; prints a table.

  PYTHONPATH=$PWD python benchmarks/lora_overhead.py [--preset tiny_moe] [--batch 4] [--seq 128] [--rank 8]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax import ErnieForCausalLM, ModelConfig
from ernie_jax.config import LoraConfig
from ernie_jax.model import lora


def _time(f, *args, n: int):
  jax.block_until_ready(f(*args))  # compile
  ts = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="tiny_moe")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--iters", type=int, default=20)
  a = p.parse_args()
  cfg = ModelConfig.preset(a.preset)
  tokens = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, (a.batch, a.seq)), jnp.int32)
  loss = lambda m, t: jnp.mean(jax.nn.logsumexp(m(t).logits, -1))
  fwd = nnx.jit(lambda m, t: m(t).logits)

  def grad_fn(wrt):
    return nnx.jit(lambda m, t: nnx.value_and_grad(loss, argnums=nnx.DiffState(0, wrt))(m, t))

  base = ErnieForCausalLM(cfg, rngs=nnx.Rngs(0))
  with_lora = lora.apply_lora(ErnieForCausalLM(cfg, rngs=nnx.Rngs(0)), LoraConfig(rank=a.rank), rngs=nnx.Rngs(1))
  rows = [
    ("forward, no LoRA", _time(fwd, base, tokens, n=a.iters)),
    ("forward, LoRA", _time(fwd, with_lora, tokens, n=a.iters)),
    ("fwd+bwd, no LoRA (grads of all Params)", _time(grad_fn(nnx.Param), base, tokens, n=a.iters)),
    ("fwd+bwd, LoRA (grads of LoRAParams)", _time(grad_fn(nnx.LoRAParam), with_lora, tokens, n=a.iters)),
  ]
  print(f"{a.preset} batch {a.batch} x seq {a.seq}, rank {a.rank}, impl {cfg.moe_impl}, backend {jax.default_backend()}")
  for name, t in rows:
    print(f"  {name:42s} {t * 1e3:8.2f} ms")


if __name__ == "__main__":
  main()
