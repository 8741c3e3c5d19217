"""Streaming conversion: wall time, throughput and peak RSS for synthetic MoE checkpoints of two sizes.

  python benchmarks/convert_streaming.py                    # ~1 GB and ~4 GB (bf16, 500 MB shards)
  python benchmarks/convert_streaming.py --sizes-gb 0.5 2 8 --block-mb 64

For each size it writes a synthetic MoE-shaped HF checkpoint (hidden 1024, 32 experts of width
512 + 1 shared, GQA 8/2 heads of 128, vocab 32000; the layer count sets the size) into a temporary
directory, then, each in a fresh subprocess, converts it HF -> Orbax (hf_to_orbax) and exports it
back Orbax -> HF (orbax_to_hf), reporting wall time, throughput and the subprocess's peak RSS
(ru_maxrss) next to its RSS right after the imports. With streaming, the peak is set by the
block budget (64 MiB) and the largest tensor (here the 65 MB embedding), not by the checkpoint, so
both sizes should show about the same peak. Like the CLIs, the children lower glibc's mmap
threshold (`--default-malloc` to compare without).
Everything is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_attention_heads=8,
             num_key_value_heads=2, head_dim=128, moe_num_experts=32, moe_k=4,
             moe_intermediate_size=512, moe_num_shared_experts=1, moe_layer_start_index=1)


def _layer_tensors(cfg: dict, i: int):
  h, d = cfg["hidden_size"], cfg["head_dim"]
  q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
  p = f"model.layers.{i}."
  out = [(p + "input_layernorm.weight", "BF16", (h,)), (p + "post_attention_layernorm.weight", "BF16", (h,)),
         (p + "self_attn.q_proj.weight", "BF16", (q, h)), (p + "self_attn.k_proj.weight", "BF16", (kv, h)),
         (p + "self_attn.v_proj.weight", "BF16", (kv, h)), (p + "self_attn.o_proj.weight", "BF16", (h, q))]
  if i < cfg["moe_layer_start_index"]:
    inter = cfg["intermediate_size"]
    return out + [(p + "mlp.gate_proj.weight", "BF16", (inter, h)), (p + "mlp.up_proj.weight", "BF16", (inter, h)),
                  (p + "mlp.down_proj.weight", "BF16", (h, inter))]
  e, im = cfg["moe_num_experts"], cfg["moe_intermediate_size"]
  sh = im * cfg["moe_num_shared_experts"]
  out += [(p + "mlp.gate.weight", "F32", (e, h)), (p + "mlp.moe_statics.e_score_correction_bias", "F32", (1, e))]
  for j in range(e):
    q_ = f"{p}mlp.experts.{j}."
    out += [(q_ + "gate_proj.weight", "BF16", (im, h)), (q_ + "up_proj.weight", "BF16", (im, h)),
            (q_ + "down_proj.weight", "BF16", (h, im))]
  return out + [(p + "mlp.shared_experts.gate_proj.weight", "BF16", (sh, h)),
                (p + "mlp.shared_experts.up_proj.weight", "BF16", (sh, h)),
                (p + "mlp.shared_experts.down_proj.weight", "BF16", (h, sh))]


def make_checkpoint(directory: str, target_bytes: float, shard_bytes: int) -> tuple[dict, int]:
  """A synthetic HF MoE checkpoint of about target_bytes, written tensor by tensor."""
  import numpy as np

  from ernie_jax.interop import safetensors_writer as stw

  per_layer = sum(stw.TensorSpec(*t).nbytes for t in _layer_tensors({**SHAPE}, 1))
  fixed = SHAPE["vocab_size"] * SHAPE["hidden_size"] * 2 + sum(stw.TensorSpec(*t).nbytes for t in _layer_tensors(SHAPE, 0))
  layers = max(2, round((target_bytes - fixed) / per_layer) + 1)
  cfg = {**SHAPE, "num_hidden_layers": layers, "model_type": "ernie4_5_moe",
         "architectures": ["Ernie4_5_MoeForCausalLM"], "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
         "tie_word_embeddings": True, "dtype": "bfloat16"}
  specs = [stw.TensorSpec("model.embed_tokens.weight", "BF16", (SHAPE["vocab_size"], SHAPE["hidden_size"])),
           stw.TensorSpec("model.norm.weight", "BF16", (SHAPE["hidden_size"],))]
  for i in range(layers):
    specs += [stw.TensorSpec(*t) for t in _layer_tensors(cfg, i)]
  rng = np.random.default_rng(0)

  def fetch(name):
    s = by_name[name]
    if s.dtype == "F32":
      return rng.standard_normal(s.shape, np.float32) * 0.02
    bits = rng.integers(0x3C00, 0x3D00, size=s.shape, dtype=np.uint16)  # bf16 in [0.0078, 0.031)
    return bits.view(stw.DTYPES["BF16"])

  by_name = {s.name: s for s in specs}
  os.makedirs(directory)
  stw.write_checkpoint(directory, specs, fetch, shard_bytes)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f)
  return cfg, sum(s.nbytes for s in specs)


def _child(args) -> None:
  """Runs in a fresh process: one conversion, then prints a JSON line with the measurements."""
  import resource
  import time

  from ernie_jax.cli.convert import limit_heap_retention
  from ernie_jax.interop import convert

  if not args.default_malloc:
    limit_heap_retention()  # as the CLIs do
  rss_after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  t0 = time.perf_counter()
  if args.child == "to_orbax":
    r = convert.convert_to_orbax(args.src, args.dst, block_bytes=int(args.block_mb * 2**20))
    nbytes = r.bytes_read
  else:
    r = convert.export_hf(args.src, args.dst)
    nbytes = r["bytes"]
  wall = time.perf_counter() - t0
  print(json.dumps({"wall_s": wall, "bytes": nbytes, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    "rss_after_imports": rss_after_imports}))


def _run_child(kind, src, dst, block_mb, default_malloc) -> dict:
  p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, "--src", src, "--dst", dst,
                      "--block-mb", str(block_mb)] + (["--default-malloc"] if default_malloc else []),
                     capture_output=True, text=True)
  if p.returncode:
    raise SystemExit(f"{kind} failed:\n{p.stderr[-4000:]}")
  return json.loads(p.stdout.strip().splitlines()[-1])


def _du(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 4.0], help="checkpoint sizes (GB)")
  p.add_argument("--shard-mb", type=float, default=500, help="source shard size (MB)")
  p.add_argument("--block-mb", type=float, default=64, help="conversion block budget (MiB)")
  p.add_argument("--dir", default=None, help="where to put the temporary files (default: system tmp)")
  p.add_argument("--default-malloc", action="store_true",
                 help="leave glibc's malloc settings alone (the CLIs lower M_MMAP_THRESHOLD to 1 MiB "
                      "so freed blocks go back to the OS; see ernie_jax.cli.convert.limit_heap_retention)")
  p.add_argument("--child", choices=["to_orbax", "to_hf"], help=argparse.SUPPRESS)
  p.add_argument("--src", help=argparse.SUPPRESS)
  p.add_argument("--dst", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    return _child(args)

  rows = []
  for size in args.sizes_gb:
    work = tempfile.mkdtemp(prefix="convert-bench-", dir=args.dir)
    try:
      src, orbax, back = (os.path.join(work, n) for n in ("hf", "orbax", "hf_back"))
      cfg, nbytes = make_checkpoint(src, size * 1e9, int(args.shard_mb * 1e6))
      files = len([f for f in os.listdir(src) if f.endswith(".safetensors")])
      print(f"{nbytes / 1e9:.2f} GB synthetic checkpoint: {cfg['num_hidden_layers']} layers, "
            f"{cfg['moe_num_experts']} experts, {files} shards", flush=True)
      for kind, a, b in (("to_orbax", src, orbax), ("to_hf", orbax, back)):
        m = _run_child(kind, a, b, args.block_mb, args.default_malloc)
        rows.append((f"{nbytes / 1e9:.2f} GB", "HF -> Orbax" if kind == "to_orbax" else "Orbax -> HF",
                     m["wall_s"], m["bytes"] / m["wall_s"] / 1e9, m["rss_after_imports"] / 2**20,
                     m["peak_rss"] / 2**20))
        print("  {:12s} {:7.1f} s  {:5.2f} GB/s  RSS after imports {:6.0f} MiB  peak RSS {:6.0f} MiB".format(
          *rows[-1][1:]), flush=True)
      print(f"  orbax checkpoint on disk: {_du(orbax) / 1e9:.2f} GB", flush=True)
    finally:
      shutil.rmtree(work, ignore_errors=True)
  print("\n| checkpoint | direction | wall (s) | throughput (GB/s) | RSS after imports (MiB) | peak RSS (MiB) |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.2f} | {r[4]:.0f} | {r[5]:.0f} |")


if __name__ == "__main__":
  main()
