"""Training throughput (tokens/s) and MFU of the pretraining step, JAX vs transformers' PyTorch.

  python benchmarks/train_throughput.py                       # tiny and ~100M configs, CPU
  python benchmarks/train_throughput.py --configs tiny --steps 10
  python benchmarks/train_throughput.py --configs 100m --batch 4 --seq 512 --no-torch
  python benchmarks/train_throughput.py --configs ernie45_0p3b --batch 2 --seq 512 --scan_unroll 1,all
  python benchmarks/train_throughput.py --configs moe512     # issue 15's MoE row: H512, 16 experts top-4, 4x512
  python benchmarks/train_throughput.py --configs ernie45_0p3b --batch 2 --seq 512 --lm_chunk 0,512 --no-torch
  python benchmarks/train_throughput.py --configs ernie45_0p3b --batch 2 --seq 512 --remat none,save_dots

What is timed: one optimizer step on a fixed batch of random tokens (data loading excluded) =
forward + backward + global-norm clip + AdamW, fp32, for
  * jax:   the jitted `ernie_jax.train.step` step (LM loss + MoE losses + MTP when the config has
           it, correction-bias update, non-finite guard), on one device;
  * jax (no MTP): the same model without the MTP layer, as transformers has none;
  * jax unroll=N: with model.scan_unroll=N (`--scan_unroll`: N layers per iteration of the layer loop);
  * jax lm_chunk=N: with loss.lm_chunk=N (`--lm_chunk`: the LM head fused into the cross-entropy);
  * jax remat=P: with model.remat=P (`--remat`: the layers' rematerialisation policy; default none, as
           torch runs; on a CPU `save_dots` is faster for dense layers: it recomputes the cheap elementwise
           values in the backward pass instead of storing and reloading them);
  * torch: transformers' Ernie4_5(_Moe)ForCausalLM with the same shapes, loss from `labels`,
           `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW.step()` (no MTP, no MoE aux loss).
The variants run one after the other, one alive at a time. (Timing them round-robin in one process was
tried and is not neutral: after a torch step its threads slow the next JAX step, 8.7 -> 15.5 s at 100M.)
MFU = model FLOPs (ernie_jax.train.flops: 6 x active matmul params + causal attention, per token)
/ (time x peak). The peak is the measured FLOP/s of a large matmul on this device (CPU: fp32 2048^2;
GPU/TPU: bf16 8192^2), measured before and after the runs (the larger is used; a difference is
flagged); on a known accelerator the MFU against the vendor's dense bf16 peak is printed too, and an
MFU above 100% is printed as "peak is wrong". The load average is printed
(a busy machine is flagged) and each row gives the median step time with its spread over the runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_util import (DevicePeak, TrainStepRunner, machine_line, mfu_text, random_batch, spread,  # noqa: E402
                        time_train_step)

DEFAULT_SHAPES = {"tiny": (8, 256), "100m": (4, 512), "moe512": (4, 512)}
CONFIG_FILES = {"tiny": "tiny", "100m": "ernie45_100m", "moe512": "tiny"}
# moe512: the MoE of issue 15's first row and of forward_vs_transformers.py (hidden 512, 8 layers: 1 dense + 7 MoE
# of 16 experts top-4 of width 256 and 1 shared expert, vocab 32000), on the tiny config's training settings
MODELS = {"moe512": dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=64, intermediate_size=2048, moe_num_experts=16, moe_k=4,
                         moe_intermediate_size=256, moe_num_shared_experts=1, moe_layer_start_index=1,
                         num_mtp_layers=0)}


def model_config(name: str):
  import importlib

  from ernie_jax.train.config import parse

  c = importlib.import_module(f"configs.{CONFIG_FILES.get(name, name)}").get_config()
  c.model.update(MODELS.get(name, {}))
  c.data.paths, c.data.tokenizer = "unused", "bytes"
  return parse(c)


def time_jax(cfg, model_cfg, batch, steps: int, return_metrics: bool = False):
  """Step times in seconds (and the last step's metrics with return_metrics=True) of the jitted step
  on one device, with the optimizer and loss of the training config `cfg`."""
  r = time_train_step(model_cfg, batch, steps, optim=cfg.optim, loss=cfg.loss)
  return (r["times"], r["metrics"]) if return_metrics else r["times"]


def hf_model(model_cfg):
  import transformers

  c = model_cfg
  common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
                rope_theta=c.rope_theta, use_bias=False)
  if c.is_moe:
    hf = transformers.Ernie4_5_MoeConfig(**common, moe_num_experts=c.moe_num_experts, moe_k=c.moe_k,
                                         moe_intermediate_size=c.moe_intermediate_size,
                                         moe_num_shared_experts=c.moe_num_shared_experts,
                                         moe_layer_start_index=c.moe_layer_start_index,
                                         moe_layer_end_index=c.moe_layer_end_index,
                                         moe_layer_interval=c.moe_layer_interval)
    return transformers.Ernie4_5_MoeForCausalLM(hf)
  return transformers.Ernie4_5ForCausalLM(transformers.Ernie4_5Config(**common))


def jax_runner(cfg, model_cfg, batch):
  """One timed step of the jitted step (seconds per call), built and warmed up."""
  return TrainStepRunner(model_cfg, batch, optim=cfg.optim, loss=cfg.loss).step


def torch_runner(cfg, model_cfg, batch):
  """One timed step of transformers' model + AdamW (seconds per call), built and warmed up."""
  import torch

  torch.manual_seed(0)
  model = hf_model(model_cfg).train()
  o = cfg.optim
  opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
  inputs = torch.as_tensor(batch["inputs"], dtype=torch.long)
  labels = torch.as_tensor(batch["targets"], dtype=torch.long)

  def step():
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  def timed_step() -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t

  step()  # warm-up
  return timed_step


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", default="tiny,100m", help="comma-separated: tiny, 100m, moe512, or an experiments/configs name")
  p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up / compile step)")
  p.add_argument("--batch", type=int, default=0, help="rows per step (default per config)")
  p.add_argument("--seq", type=int, default=0, help="tokens per row (default per config)")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--as-configured", action="store_true",
                 help="keep the config's dtype and remat policy (default: fp32, no remat, as torch runs)")
  p.add_argument("--scan_unroll", default="1",
                 help="comma-separated model.scan_unroll values to time (an int, or 'all' for every layer unrolled)")
  p.add_argument("--remat", default="",
                 help="comma-separated model.remat policies to time (default: none, or the config's with "
                      "--as-configured)")
  p.add_argument("--lm_chunk", default="0",
                 help="comma-separated loss.lm_chunk values to time (0: whole logits; N: the fused head, N positions "
                      "at a time)")
  args = p.parse_args()

  import jax

  from ernie_jax.train import flops

  print(machine_line("before"))
  measured = DevicePeak()
  peak, source = measured.value, measured.source
  try:
    import torch
    torch_info = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
  except ImportError:
    torch_info, args.no_torch = "torch not installed", True
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); {torch_info}; "
        f"peak {peak / 1e9:,.0f} GFLOP/s ({source})"
        + (f"; vendor peak {measured.vendor / 1e12:.0f} TFLOP/s (dense bf16)" if measured.vendor else ""))
  print(f"{'config':8} {'impl':24} {'params':>8} {'batch':>9} {'step s':>8} {'tokens/s':>10} {'MFU':>7}")
  for name in args.configs.split(","):
    cfg = model_config(name)
    rows, seq = DEFAULT_SHAPES.get(name, (cfg.run.global_batch_size, cfg.data.seq_len))
    rows, seq = args.batch or rows, args.seq or seq
    batch = random_batch(rows, seq, cfg.model.vocab_size)
    model = cfg.model if args.as_configured else cfg.model.replace(dtype="float32", param_dtype="float32",
                                                                     remat="none")
    runs = []
    for remat in args.remat.split(",") if args.remat else [model.remat]:
      for u in args.scan_unroll.split(","):
        unroll = model.num_hidden_layers if u == "all" else int(u)
        for chunk in (int(c) for c in args.lm_chunk.split(",")):
          label = ("jax" + ("" if remat == model.remat else f" remat={remat}") + ("" if unroll == 1 else f" unroll={u}")
                   + (f" lm_chunk={chunk}" if chunk else ""))
          runs.append((label, model.replace(scan_unroll=unroll, remat=remat), chunk))
    if cfg.model.num_mtp_layers:
      runs.append(("jax (no MTP)", model.replace(num_mtp_layers=0), 0))
    if not args.no_torch:
      runs.append(("torch", model.replace(num_mtp_layers=0), 0))

    def runner(impl, mcfg, chunk):
      run_cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, lm_chunk=chunk)) if chunk else cfg
      return (torch_runner if impl == "torch" else jax_runner)(run_cfg, mcfg, batch)

    for impl, mcfg, chunk in runs:
      step = runner(impl, mcfg, chunk)
      times = [step() for _ in range(args.steps)]
      del step
      t = statistics.median(times)
      tokens = rows * seq
      per_s = flops.train_flops_per_token(mcfg, seq) * tokens / t
      vendor = f" (vendor peak: {mfu_text(per_s / measured.vendor)})" if measured.vendor else ""
      print(f"{name:8} {impl:24} {flops.total_params(mcfg) / 1e6:7.1f}M {rows:>4}x{seq:<4} {t:8.3f} "
            f"{tokens / t:10,.0f} {mfu_text(per_s / peak):>7}{vendor}  {spread(times)}", flush=True)
  print(measured.finish())
  if measured.value > peak:
    print(f"(MFU above uses {peak / 1e9:,.0f} GFLOP/s; with the larger peak it is x {peak / measured.value:.2f})")
  print(machine_line("after"))


if __name__ == "__main__":
  main()
