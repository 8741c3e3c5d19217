"""FP8 vs bf16 training-step time and MFU, on the real pretraining step.

  python benchmarks/fp8_step.py                       # CPU: small dense + MoE (FP8 is emulated: slow)
  python benchmarks/fp8_step.py --preset gpu          # >= 1B dense and an A3B-shaped MoE (reduced depth)
  python benchmarks/fp8_step.py --preset gpu --recipes delayed,current --steps 10

What is timed: one optimizer step of `ernie_jax.train.step` (the step experiments/pretrain.py runs:
LM + MoE losses, global-norm clipping, AdamW, the FP8 scale / amax-history overwrite, the
correction-bias update, the non-finite guard) on a fixed random batch, one device, after one
compile step; median of --steps. bf16 = `train.precision=bf16` (bf16 matmuls, fp32 master
weights); fp8 = `train.precision=fp8` (E4M3 operands, E5M2 gradients in attention, MLPs and experts).
MFU = model FLOPs (ernie_jax.train.flops) / (time x the device's dense bf16 peak): the same
denominator for both, so the FP8 figure shows the speed-up against the bf16 peak.

On H100/H200 XLA rewrites the quantise-dequantise + dot pattern into FP8 GEMMs (cuBLASLt); on CPU
only correctness is meaningful (the figures show the emulation overhead).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def configs(preset: str):
  """{name: (ModelConfig, rows, seq)}."""
  from ernie_jax import ModelConfig

  if preset == "gpu":
    dense = ModelConfig(vocab_size=32768, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                        num_key_value_heads=4, head_dim=128, intermediate_size=8192, remat="save_dots")  # ~1.2B
    moe = ModelConfig.ernie45_21b_a3b(num_hidden_layers=6, moe_layer_end_index=5, vocab_size=32768,
                                      remat="save_dots")
    return {"dense ~1.2B": (dense, 8, 2048), "MoE A3B-shaped (6 layers)": (moe, 8, 2048)}
  dense = ModelConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, intermediate_size=1024)
  moe = ModelConfig.tiny_moe(vocab_size=4096, hidden_size=256, num_hidden_layers=4, head_dim=64,
                             moe_intermediate_size=256, moe_num_experts=8, moe_k=2)
  return {"dense small": (dense, 8, 256), "MoE small": (moe, 8, 256)}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
  p.add_argument("--steps", type=int, default=3, help="timed steps (after one compile step)")
  p.add_argument("--recipes", default="delayed", help="comma-separated FP8 recipes: delayed, current")
  args = p.parse_args()

  import jax

  from ernie_jax.train import flops
  from ernie_jax.train.config import apply_precision, default_config, parse
  from train_throughput import random_batch, time_jax

  peak, source = flops.peak_flops_per_device()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; peak {peak / 1e12:.1f} TFLOP/s ({source})")
  print(f"{'config':28} {'precision':14} {'step ms':>9} {'tokens/s':>10} {'MFU':>7} {'vs bf16':>8} {'loss':>7}")
  for name, (base, rows, seq) in configs(args.preset).items():
    batch = random_batch(rows, seq, base.vocab_size)
    bf16_time = None
    for precision in ["bf16"] + [f"fp8/{r}" for r in args.recipes.split(",")]:
      kind, _, recipe = precision.partition("/")
      model_cfg = apply_precision(kind, base.replace(fp8_recipe=recipe or "none") if recipe else base)
      c = default_config(model_cfg)
      c.data.tokenizer, c.optim.warmup_steps = "bytes", 0
      train_cfg = parse(c)
      times, metrics = time_jax(train_cfg, model_cfg, batch, args.steps, return_metrics=True)
      t = statistics.median(times)
      bf16_time = bf16_time or t
      tokens = rows * seq
      mfu = flops.train_flops_per_token(model_cfg, seq) * tokens / t / peak
      print(f"{name:28} {precision:14} {t * 1e3:9.1f} {tokens / t:10,.0f} {mfu:7.1%} {bf16_time / t:7.2f}x "
            f"{float(metrics['loss']):7.3f}", flush=True)


if __name__ == "__main__":
  main()
