"""LoRA vs full fine-tuning: step time and peak memory, ernie-jax and transformers + peft side by side.

  python benchmarks/lora_vs_full.py                          # dense ~100M-shape model, CPU
  python benchmarks/lora_vs_full.py --model moe --no-torch   # tiny MoE: LoRA on routed experts too
  python benchmarks/lora_vs_full.py --rank 16 --batch 4 --seq 256 --steps 5

Each (implementation, method) runs in its own subprocess, so `peak RSS` is that run's own high-water
mark (model, optimizer, activations, framework). What is timed: one optimizer step on a fixed random
batch (forward + backward + clipping + AdamW), after one warm-up / compile step:
  * jax full / LoRA: the jitted train step of `ernie_jax.train.step` with `finetune.method` full / lora
    (LoRA rank r, alpha 2r, on attention, MLP, shared and routed experts; base frozen, no moments);
  * torch full / LoRA: transformers' Ernie4_5(_Moe)ForCausalLM, `peft.get_peft_model` with the same rank,
    alpha and the targets q/k/v/o/gate/up/down_proj (peft does not reach the fused routed experts of
    transformers' MoE without `target_parameters`; the MoE torch LoRA row therefore has fewer adapters),
    `torch.optim.AdamW` over the trainable parameters.
Also printed: trainable parameters and optimizer-state bytes. The machine's load is printed and a
busy machine is flagged; timings are medians with their spread.
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

from bench_util import machine_line, spread, timed  # noqa: E402


def model_config(kind: str):
  from ernie_jax.config import ModelConfig

  if kind == "moe":
    return ModelConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, intermediate_size=1024, moe_num_experts=8, moe_k=2,
                       moe_intermediate_size=256, moe_num_shared_experts=1, moe_layer_start_index=1,
                       max_position_embeddings=4096, rope_theta=10000.0)
  return ModelConfig(vocab_size=8192, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     num_key_value_heads=4, head_dim=64, intermediate_size=2048, max_position_embeddings=4096,
                     rope_theta=10000.0)


def run_jax(args, method: str) -> dict:
  import jax
  import numpy as np
  from flax import nnx

  from ernie_jax.config import LoraConfig
  from ernie_jax.parallel import MeshConfig, make_mesh
  from ernie_jax.train.memory import step_bytes
  from ernie_jax.train.optimizer import OptimConfig
  from ernie_jax.train.param_groups import GroupsConfig, make_grouped_optimizer, optimizer_state_bytes, trained_filter
  from ernie_jax.train.sft import AddLora
  from ernie_jax.train.step import abstract_train_state, batch_sharding, create_train_state, make_train_step, put_batch

  cfg = model_config(args.model)
  tx, schedule = make_grouped_optimizer(OptimConfig(lr=1e-4, warmup_steps=0), GroupsConfig(), 1000)
  wrt = trained_filter(method)
  adapt = AddLora(LoraConfig(rank=args.rank), 0) if method == "lora" else None
  mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  graphdef, state = create_train_state(cfg, tx, seed=0, mesh=mesh, wrt=wrt, adapt=adapt)
  _, shardings, _ = abstract_train_state(cfg, tx, 0, mesh, wrt=wrt, adapt=adapt)
  step = make_train_step(graphdef, shardings, None, schedule, wrt=wrt)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
  batch = dict(inputs=ids[:, :-1], targets=ids[:, 1:], segment_ids=np.ones((args.batch, args.seq), np.int32),
               positions=np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1)),
               loss_mask=np.ones((args.batch, args.seq), np.int32))
  trainable = sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(state["model"]))) if method == "full" else sum(
    v.get_value().size for _, v in nnx.to_flat_state(state["model"]) if isinstance(v, nnx.LoRAParam))
  opt_bytes = optimizer_state_bytes(nnx.to_pure_dict(state))
  times = []
  with jax.set_mesh(mesh):
    b = put_batch(batch, 1, batch_sharding(mesh))
    compiled = step.lower(state, b).compile()
    xla = step_bytes(compiled)
    state, m = compiled(state, b)
    jax.block_until_ready(m)
    for _ in range(args.steps):
      t = time.perf_counter()
      state, m = compiled(state, b)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
  return {"times": times, "trainable": trainable, "opt_bytes": opt_bytes, "xla_total": xla.get("total", 0)}


def run_torch(args, method: str) -> dict:
  import numpy as np
  import torch

  from train_throughput import hf_model

  torch.manual_seed(0)
  model = hf_model(model_config(args.model)).train()
  if method == "lora":
    import peft

    lcfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(model, lcfg)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
  cfg = model_config(args.model)
  rng = np.random.default_rng(0)
  ids = torch.as_tensor(rng.integers(3, cfg.vocab_size, (args.batch, args.seq + 1)), dtype=torch.long)
  inputs, labels = ids[:, :-1], ids[:, 1:]

  def step():
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  step()  # warm-up
  times = timed(step, args.steps)
  opt_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
  return {"times": times, "trainable": sum(p.numel() for p in params), "opt_bytes": opt_bytes, "xla_total": 0}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="dense", choices=("dense", "moe"))
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--one", default="", help=argparse.SUPPRESS)  # "impl:method" inside the subprocess
  args = p.parse_args()
  if args.one:
    impl, method = args.one.split(":")
    if impl == "torch":
      import torch
      torch.set_num_threads(os.cpu_count() or 1)
    out = (run_torch if impl == "torch" else run_jax)(args, method)
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out))
    return

  from flax import nnx  # noqa: F401  (fail early without the deps)

  from ernie_jax.train import flops

  cfg = model_config(args.model)
  print(machine_line())
  print(f"model {args.model}: {flops.total_params(cfg) / 1e6:.1f}M parameters; batch {args.batch} x {args.seq}; "
        f"LoRA rank {args.rank}, alpha {2 * args.rank}")
  runs = [("jax", "full"), ("jax", "lora")] + ([] if args.no_torch else [("torch", "full"), ("torch", "lora")])
  print(f"{'impl':6} {'method':6} {'trainable':>11} {'opt state':>10} {'peak RSS':>9} {'XLA est.':>9} "
        f"{'tokens/s':>9}  step time")
  results = {}
  for impl, method in runs:
    cmd = [sys.executable, os.path.abspath(__file__), f"--one={impl}:{method}"] + [
      f"--{k}={v}" for k, v in (("model", args.model), ("rank", args.rank), ("batch", args.batch),
                                ("seq", args.seq), ("steps", args.steps))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
      print(f"{impl:6} {method:6} failed:\n{proc.stderr[-2000:]}")
      continue
    r = results[(impl, method)] = json.loads(line[len("RESULT "):])
    med = sorted(r["times"])[len(r["times"]) // 2]
    print(f"{impl:6} {method:6} {r['trainable'] / 1e6:10.2f}M {r['opt_bytes'] / 2**20:8.1f}MB "
          f"{r['peak_rss'] / 2**30:7.2f}GB {r['xla_total'] / 2**30:7.2f}GB {args.batch * args.seq / med:9,.0f}  "
          f"{spread(r['times'])}", flush=True)
  for impl in ("jax", "torch"):
    if (impl, "full") in results and (impl, "lora") in results:
      f, lo = results[(impl, "full")], results[(impl, "lora")]
      tf, tl = (sorted(x["times"])[len(x["times"]) // 2] for x in (f, lo))
      print(f"{impl}: LoRA step time {tl / tf:.2f}x full, optimizer state {lo['opt_bytes'] / f['opt_bytes']:.3f}x, "
            f"peak RSS {lo['peak_rss'] / f['peak_rss']:.2f}x")
  if ("jax", "lora") in results and ("torch", "lora") in results:
    tj, tt = (sorted(results[(i, "lora")]["times"])[args.steps // 2] for i in ("jax", "torch"))
    print(f"LoRA step: ernie-jax {tt / tj:.2f}x the speed of transformers + peft")
  print(machine_line())


if __name__ == "__main__":
  main()
