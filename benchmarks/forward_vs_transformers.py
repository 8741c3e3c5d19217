"""Forward throughput of ernie_jax vs transformers on the same weights, same batch, on CPU.

  python benchmarks/forward_vs_transformers.py                 # small MoE: H512, 8 layers, 16x top-4
  python benchmarks/forward_vs_transformers.py --dense --iters 5

Prints tokens/s for each (median over --iters forwards, with min/max spread) and the ratio
(ours / transformers), plus the max |Δ logits| as a sanity check that both computed the same function.
The load average is printed before and after (a busy machine is flagged).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_util import machine_line, spread, timed  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--experts", type=int, default=16)
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--dense", action="store_true", help="benchmark a dense model instead of MoE")
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--iters", type=int, default=5, help="timed forwards per implementation (>= 3 for a spread)")
  p.add_argument("--impls", default="blocked,ragged_dot", help="MoE grouped-matmul implementations")
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from flax import nnx

  import ernie_jax
  from tests import hf_reference as ref

  if args.threads:
    torch.set_num_threads(args.threads)
  heads = args.hidden // 64
  common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=64,
                intermediate_size=4 * args.hidden)
  if args.dense:
    model = ref.build("dense", **common)
    impls = ["-"]
  else:
    model = ref.build("moe", moe_num_experts=args.experts, moe_k=args.k,
                      moe_intermediate_size=args.hidden // 2, moe_num_shared_experts=1,
                      moe_layer_start_index=1, **common)
    impls = args.impls.split(",")
  tokens = ref.random_tokens(common["vocab_size"], (args.batch, args.seq), seed=0)
  n_tok = args.batch * args.seq
  print(machine_line("before"))
  print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(f"model: {'dense' if args.dense else f'MoE {args.experts} experts top-{args.k}'}, "
        f"hidden {args.hidden}, {args.layers} layers; batch {args.batch} x {args.seq} tokens")

  tt = torch.as_tensor(tokens, dtype=torch.long)
  with torch.no_grad():
    ref_logits = model(tt).logits.numpy()
    hf_times = timed(lambda: model(tt), args.iters)
  t_hf = statistics.median(hf_times)
  print(f"transformers           {n_tok / t_hf:10.0f} tokens/s  ({t_hf * 1e3:.0f} ms/forward)  {spread(hf_times)}")

  with tempfile.TemporaryDirectory() as d:
    path = ref.save(model, d)
    for impl in impls:
      kw = {} if impl == "-" else {"moe_impl": impl}
      ours = ernie_jax.from_pretrained(path, **kw)
      graphdef, state = nnx.split(ours)
      fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)
      x = jnp.asarray(tokens)
      t0 = time.perf_counter()
      logits = fwd(state, x).block_until_ready()
      compile_s = time.perf_counter() - t0
      times = timed(lambda: fwd(state, x).block_until_ready(), args.iters)
      t_ours = statistics.median(times)
      err = float(np.abs(np.asarray(logits) - ref_logits).max() / np.abs(ref_logits).max())
      print(f"ernie_jax [{impl:10s}] {n_tok / t_ours:10.0f} tokens/s  ({t_ours * 1e3:.0f} ms/forward, "
            f"compile {compile_s:.1f} s)  ratio {t_hf / t_ours:.2f}x  max|Δlogits|/max|logits| {err:.1e}  "
            f"{spread(times)}")
  print(machine_line("after"))


if __name__ == "__main__":
  main()
