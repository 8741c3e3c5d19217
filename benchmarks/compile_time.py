"""Compile time of the train step against depth: the layer loop is one scanned body, so compiling 28 layers
should cost about what 4 do; `model.scan_unroll` trades that for speed.

  python benchmarks/compile_time.py                                  # 0.3B widths, 4 vs 28 layers, scan vs unrolled
  python benchmarks/compile_time.py --config tiny --layers 2,8,32 --unroll 1

What is timed: lowering + XLA compilation of the jitted train step (forward, backward, AdamW; the trainer's
step, one device, 1 x 512 tokens by default) on abstract arrays: nothing is allocated, so any depth fits.
Each figure is the median of --runs fresh compilations (the in-memory caches are cleared between runs; no
persistent cache). The load average is printed before and after (a busy machine is flagged).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_util import machine_line, spread  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="ernie45_0p3b", help="a ModelConfig preset: ernie45_0p3b, tiny_dense, tiny_moe")
  p.add_argument("--layers", default="4,28", help="comma-separated depths")
  p.add_argument("--unroll", default="1,all", help="comma-separated model.scan_unroll values ('all': every layer)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--runs", type=int, default=3)
  args = p.parse_args()

  import jax
  import jax.numpy as jnp

  from ernie_jax import ModelConfig
  from ernie_jax.parallel import MeshConfig, make_mesh
  from ernie_jax.train.optimizer import OptimConfig, make_optimizer
  from ernie_jax.train.step import abstract_train_state, batch_sharding, make_train_step

  print(machine_line("before"))
  print(f"jax {jax.__version__} on {jax.default_backend()}; {args.config}, {args.batch}x{args.seq} tokens, fp32")
  mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
  base = getattr(ModelConfig, args.config)(dtype="float32", param_dtype="float32", remat="none")
  tx, schedule = make_optimizer(OptimConfig(lr=1e-4, warmup_steps=0), 10)
  batch = {k: jax.ShapeDtypeStruct((1, args.batch, args.seq), jnp.int32, sharding=batch_sharding(mesh))
           for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
  print(f"{'layers':>6} {'scan_unroll':>11} {'compile s':>10}")
  for layers in (int(x) for x in args.layers.split(",")):
    for u in args.unroll.split(","):
      cfg = base.replace(num_hidden_layers=layers, scan_unroll=layers if u == "all" else int(u))
      times = []
      for _ in range(args.runs):
        jax.clear_caches()
        t0 = time.perf_counter()
        graphdef, shardings, target = abstract_train_state(cfg, tx, 0, mesh)
        step = make_train_step(graphdef, shardings, None, schedule, grad_accum=1)
        with jax.set_mesh(mesh):
          step.lower(target, batch).compile()
        times.append(time.perf_counter() - t0)
      print(f"{layers:>6} {u:>11} {statistics.median(times):10.1f}  {spread(times)}", flush=True)
  print(machine_line("after"))


if __name__ == "__main__":
  main()
