"""FP8 vs bf16 training-step time and MFU (forward + backward + AdamW, FP8 state via Optax).

  python benchmarks/fp8_step.py                       # CPU: small dense + MoE (FP8 is emulated: slow)
  python benchmarks/fp8_step.py --preset gpu          # >= 1B dense and an A3B-shaped MoE (reduced depth)

On H100/H200 XLA turns the quantise-dequantise + dot pattern into FP8 GEMMs; on CPU only
correctness is meaningful (the figures show the emulation overhead).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def configs(preset: str):
  from ernie_jax import ModelConfig

  if preset == "gpu":
    dense = ModelConfig(vocab_size=32768, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                        num_key_value_heads=4, head_dim=128, intermediate_size=8192)  # ~1.2B
    moe = ModelConfig.ernie45_21b_a3b(num_hidden_layers=6, moe_layer_end_index=5, vocab_size=32768)
    return {"dense ~1.2B": (dense, 8, 2048), "MoE A3B-shaped (6 layers)": (moe, 8, 2048)}
  dense = ModelConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, intermediate_size=1024)
  moe = ModelConfig.tiny_moe(vocab_size=4096, hidden_size=256, num_hidden_layers=4, head_dim=64,
                             moe_intermediate_size=256, moe_num_experts=8, moe_k=2)
  return {"dense small": (dense, 8, 256), "MoE small": (moe, 8, 256)}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
  p.add_argument("--iters", type=int, default=3)
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from ernie_jax import ErnieForCausalLM
  from ernie_jax.train import flops, fp8_optim

  peak, source = flops.peak_flops_per_device()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; peak {peak / 1e12:.1f} TFLOP/s ({source})")
  for name, (base, batch, seq) in configs(args.preset).items():
    for precision in ("bf16", "fp8"):
      cfg = base.replace(dtype="bfloat16", fp8_recipe="delayed" if precision == "fp8" else "none")
      model = ErnieForCausalLM(cfg, rngs=nnx.Rngs(0))
      wrt = fp8_optim.FP8_WRT if precision == "fp8" else nnx.Param
      opt = fp8_optim.Fp8Optimizer(model, fp8_optim.with_fp8_overwrite(optax.adamw(1e-4)), wrt=wrt)

      @nnx.jit
      def step(model, opt, tokens):
        def loss(m):
          logits = m(tokens).logits
          return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, wrt))(model)
        opt.update(model, grads)
        return value

      tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, cfg.vocab_size)
      t0 = time.perf_counter()
      step(model, opt, tokens).block_until_ready()
      compile_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      for _ in range(args.iters):
        loss = step(model, opt, tokens)
      loss.block_until_ready()
      dt = (time.perf_counter() - t0) / args.iters
      tok_s = batch * seq / dt
      mfu = tok_s * flops.train_flops_per_token(cfg, seq) / peak
      print(f"{name:28s} {precision}: {dt * 1e3:8.1f} ms/step  {tok_s:9.0f} tokens/s  MFU {mfu:6.1%}  "
            f"(compile {compile_s:.1f} s, loss {float(loss):.3f})")


if __name__ == "__main__":
  main()
