"""DPO step time and memory by reference model: LoRA with the adapters switched off, full fine-tuning with a frozen
copy, and full fine-tuning with precomputed reference log-probs (and SimPO, reference-free), on the same model and
batch.

  python benchmarks/dpo_reference.py                        # dense ~100M-shape model, CPU
  python benchmarks/dpo_reference.py --model moe            # tiny MoE (LoRA on the routed experts too)
  python benchmarks/dpo_reference.py --batch 4 --seq 512 --steps 5
  python benchmarks/dpo_reference.py --only full:precomputed,full:none

Each configuration runs in its own subprocess, so `peak RSS` is that run's own high-water mark. Timed: one DPO
optimizer step (policy forward + backward, the reference forward where there is one, clipping, AdamW) on a fixed
batch of random preference pairs (2 pairs per row), after a warm-up / compile step. Also printed: the train state's
bytes on the devices (parameters, optimizer moments, the reference copy) and XLA's estimate of the step's memory
(`compiled.memory_analysis()`); for "precomputed" the one-off pass that computes the reference log-probs is timed
separately (it is a forward over every pair, once per run). The machine's load is printed and a busy machine is
flagged; timings are medians with their spread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_util import machine_line, spread  # noqa: E402
from lora_vs_full import model_config  # noqa: E402

RUNS = (("lora", "lora_base"), ("full", "copy"), ("full", "precomputed"), ("full", "none"))


def pair_batch(cfg, rows: int, seq: int):
  """Random preference rows: 2 pairs per row, each sequence seq / 4 tokens, the second half of it the answer."""
  import numpy as np

  rng = np.random.default_rng(0)
  quarter = seq // 4
  keys = {k: np.zeros((rows, seq), np.int32) for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
  ids = rng.integers(3, cfg.vocab_size, (rows, seq + 1)).astype(np.int32)
  keys["inputs"], keys["targets"] = ids[:, :-1], ids[:, 1:]
  for s in range(4):
    sl = slice(s * quarter, (s + 1) * quarter)
    keys["segment_ids"][:, sl] = s + 1
    keys["positions"][:, sl] = np.arange(quarter)
    keys["loss_mask"][:, s * quarter + quarter // 2:(s + 1) * quarter] = 1
  return keys


def run_one(args, method: str, reference: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from ernie_jax.config import LoraConfig
  from ernie_jax.model import lora_ops
  from ernie_jax.parallel import MeshConfig, make_mesh
  from ernie_jax.train import dpo_losses
  from ernie_jax.train.dpo import place_reference
  from ernie_jax.train.dpo_losses import DPOConfig
  from ernie_jax.train.dpo_task import Preference
  from ernie_jax.train.memory import step_bytes
  from ernie_jax.train.optimizer import OptimConfig
  from ernie_jax.train.param_groups import GroupsConfig, make_grouped_optimizer, trained_filter
  from ernie_jax.train.sft import AddLora
  from ernie_jax.train.step import abstract_train_state, batch_sharding, create_train_state, make_train_step, put_batch

  cfg = model_config(args.model)
  tx, schedule = make_grouped_optimizer(OptimConfig(lr=1e-5, warmup_steps=0), GroupsConfig(), 1000)
  wrt = trained_filter(method)
  adapt = AddLora(LoraConfig(rank=args.rank), 0) if method == "lora" else None
  copy = reference == "copy"
  mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  graphdef, state = create_train_state(cfg, tx, seed=0, mesh=mesh, wrt=wrt, adapt=adapt, reference=copy)
  _, shardings, _ = abstract_train_state(cfg, tx, 0, mesh, wrt=wrt, adapt=adapt, reference=copy)
  dpo = DPOConfig(loss_type="simpo" if reference == "none" else "sigmoid")
  task = Preference(dpo, reference, pairs_per_row=2)
  step = make_train_step(graphdef, shardings, None, schedule, wrt=wrt, task=task)
  batch = pair_batch(cfg, args.batch, args.seq)
  state_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))
  precompute_s = 0.0
  with jax.set_mesh(mesh):
    sharding = batch_sharding(mesh)
    if reference == "precomputed":  # the one-off reference pass, on the same rows laid out one pair per row
      mgdef, mstate = nnx.split(nnx.merge(graphdef, state).model)

      @jax.jit
      def ref_pass(ms, b):
        model = nnx.merge(mgdef, ms)
        with lora_ops.adapters_off():
          out = model(b["inputs"], b["positions"], b["segment_ids"])
        return dpo_losses.pair_logps(out.logits, b["targets"], b["loss_mask"], b["segment_ids"], 2)

      b0 = jax.tree.map(lambda v: v[0], put_batch(batch, 1, sharding))
      jax.block_until_ready(ref_pass(mstate, b0))
      t = time.perf_counter()
      lp = jax.device_get(ref_pass(mstate, b0))
      precompute_s = time.perf_counter() - t
      ref = np.zeros(batch["segment_ids"].shape, np.float32)
      for k in range(2):
        sub = {"segment_ids": np.where(np.isin(batch["segment_ids"], (2 * k + 1, 2 * k + 2)),
                                       batch["segment_ids"] - 2 * k, 0)}
        ref += place_reference(sub, np.stack([lp["chosen_logps"][:, k], lp["rejected_logps"][:, k]], 1))
      batch = dict(batch, ref_logps=ref)
    b = put_batch(batch, 1, sharding)
    compiled = step.lower(state, b).compile()
    xla = step_bytes(compiled)
    state, m = compiled(state, b)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
      t = time.perf_counter()
      state, m = compiled(state, b)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
  assert bool(m["finite"]) and bool(jnp.isfinite(m["loss"]))
  return {"times": times, "state_bytes": state_bytes, "xla_total": xla.get("total", 0), "precompute_s": precompute_s}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="dense", choices=("dense", "moe"))
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--only", default="", help='run only these, e.g. "full:precomputed,full:none"')
  p.add_argument("--one", default="", help=argparse.SUPPRESS)  # "method:reference" inside the subprocess
  args = p.parse_args()
  if args.one:
    method, reference = args.one.split(":")
    out = run_one(args, method, reference)
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out))
    return

  from ernie_jax.train import flops

  cfg = model_config(args.model)
  print(machine_line())
  print(f"model {args.model}: {flops.total_params(cfg) / 1e6:.1f}M parameters; {args.batch} rows x {args.seq} tokens "
        f"(2 pairs a row); LoRA rank {args.rank}")
  print(f"{'method':6} {'reference':12} {'state':>9} {'XLA est.':>9} {'peak RSS':>9} {'pairs/s':>8}  step time")
  for method, reference in RUNS:
    if args.only and f"{method}:{reference}" not in args.only.split(","):
      continue
    cmd = [sys.executable, os.path.abspath(__file__), f"--one={method}:{reference}"] + [
      f"--{k}={v}" for k, v in (("model", args.model), ("rank", args.rank), ("batch", args.batch),
                                ("seq", args.seq), ("steps", args.steps))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
      print(f"{method:6} {reference:12} failed:\n{proc.stderr[-2000:]}")
      continue
    r = json.loads(line[len("RESULT "):])
    med = sorted(r["times"])[len(r["times"]) // 2]
    extra = f"; reference pass {r['precompute_s']:.3f} s for these {2 * args.batch} pairs" if r["precompute_s"] else ""
    print(f"{method:6} {reference:12} {r['state_bytes'] / 2**20:7.1f}MB {r['xla_total'] / 2**30:7.2f}GB "
          f"{r['peak_rss'] / 2**30:7.2f}GB {2 * args.batch / med:8.2f}  {spread(r['times'])}{extra}", flush=True)
  print(machine_line())


if __name__ == "__main__":
  main()
