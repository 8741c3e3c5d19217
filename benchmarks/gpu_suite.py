"""The prepared GPU benchmark: one command on an H100 / H200 (jax >= 0.11, Python 3.12) that prints
every speed figure the project quotes, each with its median and spread.

  python benchmarks/gpu_suite.py                       # full: at most 8 min (--budget 480)
  python benchmarks/gpu_suite.py --quick               # at most 3 min: smaller batch, 3 timed steps, FP8 delayed only
  python benchmarks/gpu_suite.py --out results.json    # also write every figure as JSON
  python benchmarks/gpu_suite.py --smoke               # CPU, tiny shapes, 1-3 min (tests/benchmarks runs it)
  python benchmarks/gpu_suite.py --preflight           # any host (CPU ~40 s), before a GPU session: nothing
                                                       # runs; every case's step is lowered at its real shape and
                                                       # its memory per GPU modelled (--device-memory, --devices)

Cases, in this order (each in its own process, so that a crash, an out-of-memory or a hang in one
prints one line and the others still run, and so that peak memory is that case's own):
  peak            the device's matmul peak measured once (GPU: bf16 8192^2, 10 chained; also FP8 E4M3;
                  CPU: fp32), beside the vendor's dense datasheet peak for known GPUs (H100 SXM / H200:
                  bf16 989, fp8 1979 TFLOP/s; H100 PCIe 756 / 1513);
  dense_bf16      a ~1B dense model: the ERNIE-4.5-0.3B architecture (18 layers, 16 q / 2 kv heads of 128,
                  vocab 103424, tied) with hidden 1024 -> 2048 and FFN 3072 -> 6144 = 1.06B parameters;
  moe_ragged_dot  an ERNIE-4.5-21B-A3B-shaped MoE at its real widths (hidden 2560, 64 experts top-6 of
  moe_blocked     width 1536, 2 shared experts, vocab 103424) with 3 layers (1 dense + 2 MoE): the
                  grouped matmul as jax.lax.ragged_dot vs the block-padded form (`moe_impl`);
  moe_save_dots_experts  moe_ragged_dot with `remat=save_dots_experts` (the routed experts' gate/up and
                  outputs kept, so the backward pass does not redo the experts' forward): step time and peak
                  memory against moe_ragged_dot (remat save_dots);
  dense_bf16_lm_chunk  the same with the LM head fused into the cross-entropy, 1024 positions at a time
                  (`loss.lm_chunk`): peak memory and step time against dense_bf16;
  dense_bf16_cudnn  the same with cuDNN flash attention (`model.attention_impl=cudnn`; dense_bf16 runs the
                  XLA query-block attention): step time against dense_bf16 (GPU only);
  fp8_delayed     the dense ~1B model with FP8 matmuls (`fp8_recipe`), step time against dense_bf16;
  fp8_current
  ep_all_to_all   with > 1 device: the MoE over an `expert` mesh axis of every device, capacity-padded
  ep_ragged_all_to_all  all_to_all vs dropless ragged_all_to_all (`moe_transport`). On one device
                  there are no tokens to exchange: skipped, and said so.
Every training case times the real pretraining step (`ernie_jax.train.step`: forward + backward, global-
norm clip, AdamW, non-finite guard; bf16 compute with fp32 master weights, remat `save_dots`) on a fixed
random batch: warm-up steps (the first compiles), then >= 3 timed steps; it prints tokens/s, the median
step time with min/max, MFU against the measured and the vendor peak (model FLOPs of
`ernie_jax.train.flops`: 6 x ACTIVE matmul parameters + causal attention per token; an MFU above 100%
is printed as "peak is wrong"), and the device's peak memory. The load average is printed before and
after (a busy host is flagged). A total time budget (--budget) is shared by the cases: a case that
would not fit is skipped with a line saying so, a case that overruns its share is stopped. (The budgets
were sized from estimates, not yet from a GPU run: if cases are skipped or stopped, raise --budget.)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bench_util import (is_busy, load_average, lower_train_step, machine_line, measure_peak, mfu_text,  # noqa: E402
                        optimizer, peak_memory_bytes, random_batch, summary, time_train_step, vendor_peaks)

RESULT_TAG = "@@result "


@dataclasses.dataclass(frozen=True)
class Mode:
  """Shapes and time limits of one way of running the suite."""

  name: str
  rows: int
  seq: int
  steps: int  # timed steps per case
  warmup: int  # untimed steps before them (the first compiles)
  budget_s: float  # default --budget
  case_cap_s: float  # the most one case may take
  case_min_s: float  # a case is not started with less time than this left
  fp8_recipes: tuple[str, ...]
  peak_n: int | None = None  # matmul size of the measured peak (None: bench_util.PEAK_MATMUL)


MODES = {
  "full": Mode("full", rows=8, seq=2048, steps=5, warmup=2, budget_s=480, case_cap_s=150, case_min_s=35,
               fp8_recipes=("delayed", "current")),
  "quick": Mode("quick", rows=4, seq=1024, steps=3, warmup=2, budget_s=180, case_cap_s=75, case_min_s=20,
                fp8_recipes=("delayed",)),
  # smoke: every code path once, cheaply (FP8 "current" shares all of "delayed"'s plumbing; its numerics
  # are tested in tests/train/test_fp8_train.py)
  "smoke": Mode("smoke", rows=2, seq=32, steps=3, warmup=1, budget_s=420, case_cap_s=120, case_min_s=5,
                fp8_recipes=("delayed",), peak_n=512),
}


# --------------------------------------------------------------------------------------------------
# The models.
def dense_config(mode: Mode):
  """The ~1B dense model (smoke: the tiny dense preset), bf16 compute."""
  from ernie_jax import ModelConfig

  if mode.name == "smoke":
    return ModelConfig.tiny_dense(dtype="bfloat16")
  return ModelConfig.ernie45_0p3b(hidden_size=2048, intermediate_size=6144, dtype="bfloat16", remat="save_dots")


def moe_config(mode: Mode, **kw):
  """The A3B-shaped MoE with 3 layers (smoke: the tiny MoE preset), bf16 compute."""
  from ernie_jax import ModelConfig

  if mode.name == "smoke":
    return ModelConfig.tiny_moe(dtype="bfloat16", **kw)
  return ModelConfig.ernie45_21b_a3b(num_hidden_layers=3, moe_layer_end_index=2, dtype="bfloat16",
                                     remat="save_dots", **kw)


CASES = ("peak", "dense_bf16", "dense_bf16_lm_chunk", "dense_bf16_cudnn", "moe_ragged_dot", "moe_blocked",
         "moe_save_dots_experts", "fp8_delayed", "fp8_current", "ep_all_to_all", "ep_ragged_all_to_all")


def skip_reason(name: str, mode: Mode, peak: dict | None) -> str | None:
  """Why a case does not run in this mode / on these devices (None: it runs)."""
  if name.startswith("fp8_") and name[len("fp8_"):] not in mode.fp8_recipes:
    return f"not run in --{mode.name} (the full suite runs it)"
  if name == "dense_bf16_cudnn":
    if peak is None:
      return "backend unknown (the peak case did not succeed)"
    if peak.get("backend", "gpu") != "gpu":  # (the budget planner asks with a dict of the device count only)
      return f"cuDNN attention needs an NVIDIA GPU (backend {peak['backend']})"
  if name.startswith("ep_"):
    if peak is None:
      return "device count unknown (the peak case did not succeed)"
    if peak["devices"] < 2:
      return ("1 device visible: the transports exchange tokens between devices, so on one device they "
              "measure nothing")
  return None


# --------------------------------------------------------------------------------------------------
# One case (child process).
def run_peak(mode: Mode) -> dict:
  import jax

  dev = jax.devices()[0]
  value, source = measure_peak(n=mode.peak_n)
  out = {"measured": value, "measured_source": source, "vendor": vendor_peaks(dev.device_kind),
         "backend": jax.default_backend(), "device_kind": dev.device_kind, "devices": jax.device_count(),
         "versions": {p: _version(p) for p in ("jax", "jaxlib", "flax", "optax")}}
  if jax.default_backend() != "cpu":
    try:  # FP8 GEMMs exist on Hopper-class GPUs only; elsewhere XLA may upcast, or refuse
      out["measured_fp8"], out["measured_fp8_source"] = measure_peak(dtype="float8_e4m3fn", n=mode.peak_n)
    except Exception as e:  # reported, the bf16 peak stands
      out["measured_fp8_error"] = _one_line(e)
  return out


@dataclasses.dataclass(frozen=True)
class Setup:
  """What one training case runs (the same for the run and for `--preflight`)."""

  cfg: Any  # the ModelConfig
  loss: Any  # a LossConfig (None: the library's)
  rows: int  # rows per step
  expert: int  # the expert mesh axis over every device (1: one device, no mesh)
  note: str = ""


def case_setup(name: str, mode: Mode, devices: int, backend: str) -> Setup:
  """The model, loss settings, rows and expert-axis size of training case `name` on `devices` devices."""
  from ernie_jax.train.losses import LossConfig

  rows, expert, note, loss = mode.rows, 1, "", None
  if name == "dense_bf16":
    cfg = dense_config(mode)
  elif name == "dense_bf16_lm_chunk":
    cfg, loss = dense_config(mode), LossConfig(lm_chunk=min(1024, mode.seq))
  elif name == "dense_bf16_cudnn":
    cfg = dense_config(mode).replace(attention_impl="cudnn")
  elif name == "moe_save_dots_experts":
    cfg = moe_config(mode, moe_impl="ragged_dot").replace(remat="save_dots_experts")
  elif name.startswith("moe_"):
    cfg = moe_config(mode, moe_impl=name[len("moe_"):])
  elif name.startswith("fp8_"):
    cfg = dense_config(mode).replace(fp8_recipe=name[len("fp8_"):])
  elif name.startswith("ep_"):
    cfg = moe_config(mode, moe_transport=name[len("ep_"):])
    if cfg.moe_num_experts % devices:
      raise ValueError(f"{cfg.moe_num_experts} experts do not split over {devices} devices: run with "
                       "CUDA_VISIBLE_DEVICES naming 2, 4 or 8 of them")
    expert = devices
    rows = -(-max(rows, devices) // devices) * devices  # the rows split over the devices
    if backend == "cpu" and cfg.moe_transport == "ragged_all_to_all":
      note = "XLA:CPU has no ragged-all-to-all: this is the repo's CPU emulation, not the real transport"
    if cfg.moe_transport == "all_to_all":
      note = f"capacity factor {cfg.moe_capacity_factor} (tokens over capacity are dropped)"
  else:
    raise ValueError(f"unknown case {name!r}; known: {CASES}")
  return Setup(cfg, loss, rows, expert, note)


def run_train(name: str, mode: Mode, deadline: float) -> dict:
  import jax

  from ernie_jax.model.moe import dispatch
  from ernie_jax.parallel import MeshConfig, make_mesh
  from ernie_jax.train import flops

  s = case_setup(name, mode, jax.device_count(), jax.default_backend())
  cfg, rows, loss, note = s.cfg, s.rows, s.loss, s.note
  mesh = make_mesh(MeshConfig(data=1, expert=s.expert)) if s.expert > 1 else None
  if cfg.is_moe:  # as the trainer: ragged_dot through jax's Pallas-Triton kernels where this jax has them
    note = "; ".join(filter(None, (note, dispatch.use_gpu_grouped_matmul_kernel(cfg.moe_impl))))
  devices = 1 if mesh is None else mesh.devices.size
  batch = random_batch(rows, mode.seq, cfg.vocab_size)
  r = time_train_step(cfg, batch, mode.steps, warmup=mode.warmup, mesh=mesh, loss=loss, deadline=deadline)
  fig = flops.figures(cfg, mode.seq, rows)
  return {"times": r["times"], "first_step_s": r["first_step_s"], "rows": rows, "seq": mode.seq,
          "tokens": rows * mode.seq, "devices": devices, "flops_per_step": fig["flops_per_step"],
          "model_params": fig["model_params"], "active_params": fig["active_params"],
          "peak_bytes": peak_memory_bytes(), "loss": float(r["metrics"]["loss"]),
          "finite": bool(r["metrics"]["finite"]), "dtype": cfg.dtype, "remat": cfg.remat, "note": note}


def child(name: str, mode: Mode, deadline: float, xla_cache: str) -> None:
  """Runs one case and prints its result as one tagged JSON line (an exception becomes its error)."""
  if xla_cache:
    import jax

    jax.config.update("jax_compilation_cache_dir", xla_cache)
  try:
    result = run_peak(mode) if name == "peak" else run_train(name, mode, deadline)
    result["status"] = "ok"
  except Exception as e:  # the parent prints it as the case's one line and goes on
    result = {"status": "error", "error": _one_line(e)}
  print(RESULT_TAG + json.dumps(result), flush=True)


def _one_line(e: BaseException) -> str:
  lines = [x for x in str(e).splitlines() if x.strip()]
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


# --------------------------------------------------------------------------------------------------
# The suite (parent process: starts one child per case, never imports jax itself).
def run_case(name: str, mode: Mode, timeout: float, xla_cache: str) -> dict:
  """The child's result dict; a crash or timeout becomes {"status": "error", "error": one line}."""
  cmd = [sys.executable, os.path.abspath(__file__), "--case", name, "--mode", mode.name,
         "--deadline", f"{time.time() + 0.8 * timeout:.1f}"]
  if xla_cache:
    cmd += ["--xla-cache", xla_cache]
  t0 = time.perf_counter()
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"status": "error", "error": f"stopped after {timeout:.0f} s (its share of --budget)",
            "wall_s": time.perf_counter() - t0}
  for line in p.stdout.splitlines()[::-1]:
    if line.startswith(RESULT_TAG):
      return dict(json.loads(line[len(RESULT_TAG):]), wall_s=time.perf_counter() - t0)
  tail = [x for x in (p.stderr or p.stdout).splitlines() if x.strip()]
  return {"status": "error", "error": f"exit {p.returncode}: {tail[-1][:300] if tail else 'no output'}",
          "wall_s": time.perf_counter() - t0}


def _gib(n: int | None) -> str:
  return "n/a (backend keeps no statistics)" if n is None else f"{n / 2 ** 30:.1f} GiB"


def _params(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_peak(r: dict) -> list[str]:
  v = r["vendor"]
  lines = [f"  device: {r['device_kind']} x{r['devices']} ({r['backend']}); jax {r['versions']['jax']}, "
           f"jaxlib {r['versions']['jaxlib']}, flax {r['versions']['flax']}",
           f"  measured peak: {r['measured'] / 1e12:,.1f} TFLOP/s ({r['measured_source']})"]
  if "measured_fp8" in r:
    lines.append(f"  measured fp8 peak: {r['measured_fp8'] / 1e12:,.1f} TFLOP/s ({r['measured_fp8_source']}; "
                 "if it is near the bf16 figure, XLA did not use FP8 tensor cores for the plain dot)")
  elif "measured_fp8_error" in r:
    lines.append(f"  measured fp8 peak: failed: {r['measured_fp8_error']}")
  if v["bf16"]:
    fp8 = f", fp8 {v['fp8'] / 1e12:,.0f}" if v["fp8"] else ""
    lines.append(f"  vendor dense peak: bf16 {v['bf16'] / 1e12:,.0f}{fp8} TFLOP/s (datasheet)")
    if r["measured"] > 1.05 * v["bf16"]:
      lines.append("  WARNING: the measured peak is above the datasheet's: the device table or the timing is wrong")
  else:
    lines.append("  vendor peak: none known for this device (MFU uses the measured peak only)")
  return lines


def format_train(name: str, r: dict, peak: dict | None, baseline: dict | None) -> list[str]:
  s = summary(r["times"])
  med = s["median"]
  tok_s = r["tokens"] / med
  flops_s = r["flops_per_step"] / med / r["devices"]  # per device
  mfu = []
  if peak and peak.get("measured"):
    mfu.append(f"{mfu_text(flops_s / peak['measured'])} of measured")
  if peak and peak["vendor"]["bf16"]:
    mfu.append(f"{mfu_text(flops_s / peak['vendor']['bf16'])} of vendor bf16")
  if name.startswith("fp8_") and peak and peak["vendor"]["fp8"]:
    mfu.append(f"{mfu_text(flops_s / peak['vendor']['fp8'])} of vendor fp8")
  active = "" if r["active_params"] == r["model_params"] else f", {_params(r['active_params'])} active"
  lines = [f"  {_params(r['model_params'])} params{active}; {r['rows']}x{r['seq']} tokens/step on {r['devices']} "
           f"device(s); {r['dtype']} compute, remat {r['remat']}",
           f"  {tok_s:,.0f} tokens/s; step median {med * 1e3:,.1f} ms (min {s['min'] * 1e3:,.1f}, max "
           f"{s['max'] * 1e3:,.1f}, {s['runs']} timed steps; compile + first step {r['first_step_s']:.1f} s)",
           f"  MFU (active params): {', '.join(mfu) or 'no peak'}; peak memory {_gib(r['peak_bytes'])}; "
           f"loss {r['loss']:.3f}{'' if r['finite'] else ' NOT FINITE'}"]
  if s["runs"] < 3:
    lines.append(f"  WARNING: only {s['runs']} timed step(s) fitted in the budget: no honest spread")
  if baseline and baseline.get("status") == "ok":
    ratio = statistics.median(baseline["times"]) / med
    lines.append(f"  vs {baseline['_name']}: x{ratio:.2f} ({'faster' if ratio > 1 else 'slower'}; "
                 "ratio of median step times)")
  if r.get("note"):
    lines.append(f"  note: {r['note']}")
  return lines


BASELINES = {"dense_bf16_lm_chunk": "dense_bf16", "dense_bf16_cudnn": "dense_bf16", "moe_blocked": "moe_ragged_dot",
             "moe_save_dots_experts": "moe_ragged_dot",
             "fp8_delayed": "dense_bf16", "fp8_current": "dense_bf16", "ep_ragged_all_to_all": "ep_all_to_all"}


def suite(mode: Mode, budget: float, out: str, xla_cache: str) -> int:
  """Runs every case within `budget` seconds; returns 1 if a case failed (skipped ones do not count)."""
  start = time.time()
  load0 = load_average()
  meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "mode": mode.name,
          "python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count(),
          "versions": {p: _version(p) for p in ("jax", "jaxlib", "flax", "optax", "torch", "transformers")},
          "load_before": load0, "budget_s": budget}
  results: dict[str, dict] = {}
  print(f"gpu_suite ({mode.name}): {meta['date']}, python {meta['python']}, budget {budget:.0f} s")
  print(machine_line("host before"), flush=True)
  failed = False
  for i, name in enumerate(CASES):
    peak = results.get("peak") if results.get("peak", {}).get("status") == "ok" else None
    print(f"[{name}]", flush=True)
    why = skip_reason(name, mode, peak) if name != "peak" else None
    if why:
      results[name] = {"status": "skipped", "reason": why}
      print(f"  skipped: {why}", flush=True)
      continue
    left = budget - (time.time() - start)
    others = sum(1 for n in CASES[i + 1:] if skip_reason(n, mode, peak or {"devices": 2}) is None)
    timeout = min(mode.case_cap_s, left - mode.case_min_s * others)
    if timeout < mode.case_min_s:
      results[name] = {"status": "skipped", "reason": f"--budget spent ({left:.0f} s left)"}
      print(f"  skipped: {results[name]['reason']}", flush=True)
      continue
    r = run_case(name, mode, timeout, xla_cache)
    results[name] = r
    if r["status"] != "ok":
      failed = True
      print(f"  FAILED ({r.get('wall_s', 0):.0f} s): {r['error']}", flush=True)
    elif name == "peak":
      print("\n".join(format_peak(r)), flush=True)
    else:
      base = results.get(BASELINES.get(name, ""))
      base = dict(base, _name=BASELINES[name]) if base else None
      print("\n".join(format_train(name, r, peak, base)), flush=True)
    _write(out, meta, results)
  meta["load_after"] = load_average()
  meta["busy"] = is_busy(load0) or is_busy(meta["load_after"])
  meta["wall_s"] = time.time() - start
  print(machine_line("host after"))
  print(f"total {meta['wall_s']:.0f} s" + (f"; results in {out}" if out else ""), flush=True)
  _write(out, meta, results)
  return 1 if failed else 0


# --------------------------------------------------------------------------------------------------
# --preflight: the cases at their real shapes, checked on any host before a GPU session.
PREFLIGHT_MFU = 0.5  # the compute time printed per step assumes this fraction of the vendor bf16 peak
H100_BF16 = 989e12


def preflight(mode: Mode, devices: int, device_memory: str) -> int:
  """Each training case as the run builds it (`case_setup`) for `devices` GPUs: its step lowered on this
  host for abstract arguments (nothing is allocated or run; cuDNN attention cannot lower without a GPU and
  is modelled only) and its per-device memory modelled (`ernie_jax.train.memory_model`) against
  `device_memory`. On a CPU host the MoE cases lower the portable grouped matmul (the GPU run may route
  ragged_dot through jax's Pallas-Triton kernels instead). Returns 1 if a case fails to build or lower, or
  does not fit."""
  import jax

  from ernie_jax.cli.plan import parse_memory
  from ernie_jax.parallel import MeshConfig, make_mesh
  from ernie_jax.train import flops
  from ernie_jax.train.memory_model import Layout, StateModel, estimate

  memory, unit, scale = parse_memory(device_memory)
  tx, _ = optimizer(None)  # the cases' optimizer (the library's AdamW), for the state's bytes
  print(f"gpu_suite --preflight ({mode.name}): every training case at its shape for {devices} GPU(s) of "
        f"{device_memory}, lowered on this host ({jax.default_backend()}, jax {jax.__version__})")
  failed = False
  for name in CASES[1:]:
    print(f"[{name}]", flush=True)
    why = skip_reason(name, mode, {"devices": devices, "backend": "gpu"})
    if why:
      print(f"  skipped: {why}")
      continue
    t0 = time.perf_counter()
    try:
      s = case_setup(name, mode, devices, "gpu")
      layout = Layout(data=1, fsdp=1, tensor=1, expert=s.expert, remat=s.cfg.remat, grad_accum=1)
      if s.expert > len(jax.devices()):
        raise ValueError(f"lowering needs {s.expert} devices on this host, {len(jax.devices())} visible "
                         f"(CPU: XLA_FLAGS=--xla_force_host_platform_device_count={s.expert})")
      mesh = make_mesh(MeshConfig(data=1, expert=s.expert), devices=jax.devices()[:s.expert])
      if s.cfg.attention_impl == "cudnn":
        lowered = "not lowered here (cuDNN attention needs an NVIDIA GPU)"
      else:
        lower_train_step(s.cfg, s.rows, mode.seq, loss=s.loss, mesh=mesh)
        lowered = f"lowered in {time.perf_counter() - t0:.1f} s"
      m = estimate(StateModel(s.cfg, tx), s.cfg, layout, seq=mode.seq, global_batch=s.rows,
                   lm_chunk=s.loss.lm_chunk if s.loss else 0)
    except Exception as e:  # one line per case; the others still run
      failed = True
      print(f"  FAILED: {_one_line(e)}", flush=True)
      continue
    fig = flops.figures(s.cfg, mode.seq, s.rows)
    step_s = fig["flops_per_step"] / s.expert / (PREFLIGHT_MFU * H100_BF16)
    fits = m.total <= memory
    failed |= not fits
    print(f"  {_params(fig['model_params'])} params ({_params(fig['active_params'])} active); {s.rows}x{mode.seq} "
          f"tokens/step on {s.expert} device(s); {lowered}")
    print(f"  modelled memory per device: {m.total / scale:,.1f} {unit} of {memory / scale:,.0f} {unit} (state and "
          f"batch {m.arguments / scale:,.1f}, temporaries {m.temporaries / scale:,.1f})"
          + ("" if fits else "  DOES NOT FIT: lower the case's rows or seq"))
    print(f"  compute {fig['flops_per_step'] / s.expert:.3g} FLOPs per device and step: {step_s * 1e3:,.0f} ms at "
          f"{PREFLIGHT_MFU:.0%} of an H100's bf16 peak; {mode.warmup + mode.steps} steps {(mode.warmup + mode.steps) * step_s:.1f} s "
          "+ compile", flush=True)
  return 1 if failed else 0


def _write(out: str, meta: dict, results: dict) -> None:
  if out:
    with open(out, "w") as f:
      json.dump({"meta": meta, "cases": results}, f, indent=1)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--quick", action="store_true", help="smaller batch, fewer steps, FP8 delayed only (~3 min)")
  g.add_argument("--smoke", action="store_true", help="tiny shapes on any backend (CPU: seconds); checks the plumbing")
  p.add_argument("--out", default="", help="write every figure as JSON here")
  p.add_argument("--budget", type=float, default=0, help="total seconds for all cases (default per mode)")
  p.add_argument("--xla-cache", default="", help="persistent XLA compilation cache directory (faster reruns)")
  p.add_argument("--preflight", action="store_true",
                 help="on any host (CPU: ~1 min): lower every case of the mode at its shape and model its memory "
                      "per GPU; nothing runs. Exit 1 if a case does not lower or fit")
  p.add_argument("--devices", type=int, default=1, help="with --preflight: the GPUs the suite will see (default 1)")
  p.add_argument("--device-memory", default="80GB", help="with --preflight: memory per GPU (default 80GB: H100; H200 141GB)")
  p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (child process)
  p.add_argument("--mode", help=argparse.SUPPRESS)
  p.add_argument("--deadline", type=float, default=0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.case:
    child(args.case, MODES[args.mode], args.deadline or None, args.xla_cache)
    return 0
  mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
  if args.preflight:
    if args.devices < 1:
      p.error(f"--devices must be at least 1, got {args.devices}")
    from ernie_jax.cli.plan import parse_memory

    try:
      parse_memory(args.device_memory)
    except ValueError as e:  # (PlanError: one line naming the flag)
      p.error(str(e))
    return preflight(mode, args.devices, args.device_memory)
  return suite(mode, args.budget or mode.budget_s, args.out, args.xla_cache)


if __name__ == "__main__":
  sys.exit(main())
