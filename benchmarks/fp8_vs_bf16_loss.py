"""FP8 vs bf16 training quality on the README's tiny config (the long run moved out of the test suite).

  python benchmarks/fp8_vs_bf16_loss.py               # 60 steps of experiments/configs/tiny.py, one CPU device
  python benchmarks/fp8_vs_bf16_loss.py --steps 300   # the config's full run

Runs experiments/pretrain.py with the tiny config (MoE + MTP, bytes of the Python stdlib) twice, with
train.precision=bf16 and =fp8, and compares the final LM loss (the mean over the last logging interval
of 10 steps): the FP8 run should end within --tolerance (relative, default 2%) of the bf16 run, and both
should have learned (final < 0.6 x first). Exits 1 when either fails. The test suite checks the same
property on a micro model (tests/train/test_fp8_train.py::test_fp8_training_ends_within_2_percent_of_bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_util import machine_line  # noqa: E402


def run(precision: str, steps: int, workdir: str, cache: str) -> list[dict]:
  args = [sys.executable, os.path.join(ROOT, "experiments", "pretrain.py"),
          f"--config={os.path.join(ROOT, 'experiments', 'configs', 'tiny.py')}", f"--config.workdir={workdir}",
          f"--config.compilation_cache_dir={cache}", f"--config.train.precision={precision}",
          f"--config.steps={steps}", "--config.metrics.log_every=10", "--config.metrics.progress_bar=False",
          "--config.metrics.tensorboard=False", "--config.checkpoint.every_steps=0"]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  subprocess.run(args, env=env, check=True)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--tolerance", type=float, default=0.02, help="relative gap allowed between the final losses")
  p.add_argument("--workdir", default="", help="where the two runs go (default: a temporary directory)")
  args = p.parse_args()
  print(machine_line())
  base = args.workdir or tempfile.mkdtemp(prefix="fp8_vs_bf16_")
  final, ok = {}, True
  for precision in ("bf16", "fp8"):
    start = time.time()
    records = [r for r in run(precision, args.steps, os.path.join(base, precision), os.path.join(base, "xla_cache"))
               if "lm_loss" in r]
    final[precision] = records[-1]["lm_loss"]
    learned = records[-1]["lm_loss"] < 0.6 * records[0]["lm_loss"]
    ok &= learned and records[-1]["step"] == args.steps
    print(f"{precision}: lm_loss {records[0]['lm_loss']:.4f} (step {records[0]['step']}) -> {final[precision]:.4f} "
          f"(step {records[-1]['step']}), {time.time() - start:.0f} s{'' if learned else '  DID NOT LEARN'}")
  gap = abs(final["fp8"] - final["bf16"]) / final["bf16"]
  ok &= gap <= args.tolerance
  print(f"fp8 vs bf16: relative gap {gap:.4%} (tolerance {args.tolerance:.0%}): {'OK' if ok else 'FAIL'}")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
