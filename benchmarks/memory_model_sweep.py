"""The planner's memory model (`ernie_jax/train/memory_model.py`) against XLA over a sweep of tiny fp32 configs on
8 fake CPU devices: the figures quoted in its docstring and in experiments/README.md.

  python benchmarks/memory_model_sweep.py            # 112 configs, ~15-25 min on 2 cores (one compile each)
  python benchmarks/memory_model_sweep.py --quick    # 16 of them

For every config the train step is built and compiled the way the trainer does (`Planner.compile_step`; nothing
is allocated) and XLA's `memory_analysis()` is compared with the estimate: the arguments must match exactly
(any mismatch is printed and counted), the temporaries' error is printed per config, then its distribution.
Configs: dense (H 256, 4 heads / 2 kv heads x 64, MLP 512, vocab 2048) and MoE (8 experts top-2, 1 shared,
all_to_all transport; 1 dense + 2 MoE layers, or 2 MoE layers), seq 256 (and 512), every remat policy, data /
fsdp / tensor / expert meshes, grad_accum 1-4, MTP, capacity factors 1 and 2, vocabularies to 16384.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from bench_util import machine_line  # noqa: E402

DENSE = dict(vocab_size=2048, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, intermediate_size=512)
MOE = dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=128, moe_num_shared_experts=1, moe_layer_start_index=1,
           num_hidden_layers=3, moe_transport="all_to_all")
ALL_MOE = dict(MOE, num_hidden_layers=2, moe_layer_start_index=0)


def case(model=None, remat="full", rows=8, seq=256, accum=1, mesh=None):
  m = dict(data=8, fsdp=1, tensor=1, expert=1)
  m.update(mesh or {})
  return dict(model=model or {}, remat=remat, rows=rows, seq=seq, accum=accum, mesh=m)


def sweep() -> list[dict]:
  out = []
  for remat in ("none", "full", "save_dots", "save_qkv_attn_out", "save_mlp"):
    out += [case(remat=remat, rows=r) for r in (8, 16, 32)]
    out += [case(remat=remat, seq=512), case(remat=remat, rows=16, model=dict(num_hidden_layers=4)),
            case(remat=remat, rows=16, model=dict(vocab_size=8192))]
  for remat in ("none", "full", "save_dots"):
    out += [case(remat=remat, rows=32, accum=2), case(remat=remat, rows=16, mesh=dict(data=2, fsdp=4)),
            case(remat=remat, rows=16, mesh=dict(data=4, tensor=2)),
            case(remat=remat, rows=16, model=MOE, mesh=dict(data=4, expert=2)),
            case(remat=remat, rows=32, model=MOE, mesh=dict(data=4, expert=2)),
            case(remat=remat, rows=16, model=MOE, mesh=dict(data=2, expert=4)),
            case(remat=remat, rows=16, model=dict(MOE, num_mtp_layers=1), mesh=dict(data=4, expert=2)),
            case(remat=remat, rows=16, model=dict(num_mtp_layers=1)),
            case(remat=remat, rows=16, model=MOE, mesh=dict(data=2, fsdp=2, expert=2)),
            case(remat=remat, rows=32, model=MOE, mesh=dict(data=1, fsdp=4, expert=2)),
            case(remat=remat, rows=32, model=dict(num_attention_heads=8, num_key_value_heads=4, head_dim=32),
                 mesh=dict(data=2, tensor=4)),
            case(remat=remat, rows=32, mesh=dict(data=4, tensor=2)),
            case(remat=remat, rows=32, mesh=dict(data=2, fsdp=2, tensor=2)),
            case(remat=remat, rows=32, model=dict(MOE, moe_capacity_factor=1.0), mesh=dict(data=4, expert=2)),
            case(remat=remat, rows=64, accum=4)]
    out += [case(remat=remat, rows=r, model=ALL_MOE, mesh=dict(data=4, expert=2)) for r in (16, 32)]
    out += [case(remat=remat, rows=16, model=dict(ALL_MOE, num_hidden_layers=4), mesh=dict(data=4, expert=2)),
            case(remat=remat, rows=16, model=dict(ALL_MOE, moe_capacity_factor=1.0), mesh=dict(data=4, expert=2)),
            case(remat=remat, rows=16, model=ALL_MOE, mesh=dict(data=2, expert=4)),
            case(remat=remat, rows=16, model=ALL_MOE, mesh=dict(data=2, fsdp=2, expert=2))]
  for remat in ("save_qkv", "save_attn_out"):
    out += [case(remat=remat, rows=16), case(remat=remat, rows=16, model=MOE, mesh=dict(data=4, expert=2))]
  for vocab in (2048, 8192, 16384):
    for layers in (2, 6):
      for mesh in (None, dict(data=1, fsdp=8)):
        out.append(case(rows=16, model=dict(vocab_size=vocab, num_hidden_layers=layers), mesh=mesh))
  out += [case(rows=r, mesh=dict(data=1, fsdp=8)) for r in (8, 32)] + [case(rows=32, model=dict(num_mtp_layers=1))]
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="every 7th config only")
  args = p.parse_args()

  from ernie_jax.config import ModelConfig
  from ernie_jax.train.config import default_config
  from ernie_jax.train.memory_model import Layout
  from ernie_jax.train.plan import Planner

  print(machine_line(), flush=True)
  cases = sweep()[::7] if args.quick else sweep()
  errors, bad_arguments, start = [], 0, time.perf_counter()
  for c in cases:
    config = default_config(ModelConfig(**{**DENSE, **c["model"]}))
    config.global_batch_size, config.data.seq_len = c["rows"], c["seq"]
    planner = Planner(config, 8)
    layout = Layout(**c["mesh"], remat=c["remat"], grad_accum=c["accum"])
    est = planner.estimate(layout)
    xla = planner.compiled_step_bytes(layout)
    bad_arguments += est.arguments != xla["arguments"]
    err = est.temporaries / xla["temporaries"] - 1
    errors.append(err)
    mesh = " ".join(f"{k}={v}" for k, v in c["mesh"].items() if v > 1)
    print(f"{err:+.3f}  arguments {'exact' if est.arguments == xla['arguments'] else 'DIFFER'}  temporaries "
          f"{xla['temporaries'] / 2**20:7.2f} MiB  {c['remat']:<17} rows {c['rows']:3d} seq {c['seq']} accum "
          f"{c['accum']} {mesh:<22} {c['model']}", flush=True)
  e = np.array(errors)
  print(f"{len(e)} configs in {time.perf_counter() - start:.0f} s: arguments exact for {len(e) - bad_arguments}; "
        f"temporaries error min {e.min():+.3f}, max {e.max():+.3f}, mean |error| {np.abs(e).mean():.3f}, "
        f"5%..95% {np.quantile(e, 0.05):+.3f}..{np.quantile(e, 0.95):+.3f}")


if __name__ == "__main__":
  main()
