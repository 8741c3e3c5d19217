"""benchmarks/gpu_suite.py runs end to end on CPU (`--smoke`: tiny shapes) and every case prints its
figures; its guards (a failing case, a case over its time, a spent budget) report one line and let the
suite go on; the MFU / spread helpers flag what must not be read as a figure."""

import json
import os
import subprocess
import sys

from tests import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_util  # noqa: E402
import gpu_suite  # noqa: E402

TRAIN_CASES = ("dense_bf16", "dense_bf16_lm_chunk", "moe_ragged_dot", "moe_blocked", "moe_save_dots_experts",
               "fp8_delayed", "ep_all_to_all", "ep_ragged_all_to_all")


def _env(devices: int):
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))


def _sections(stdout: str) -> dict[str, str]:
  """The text printed under each "[case]" header."""
  out, name = {}, None
  for line in stdout.splitlines():
    if line.startswith("[") and line.endswith("]"):
      name = line[1:-1]
      out[name] = ""
    elif name:
      out[name] += line + "\n"
  return out


def test_smoke_every_case_prints_its_figures(tmp_path):
  """2 fake devices, so that the expert-parallel transports run too."""
  out = tmp_path / "results.json"
  p = subprocess.run([sys.executable, SUITE, "--smoke", "--out", str(out)], env=_env(2), capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stdout + p.stderr
  printed = _sections(p.stdout)
  assert list(printed) == list(gpu_suite.CASES), p.stdout
  results = json.loads(out.read_text())
  cases = results["cases"]
  assert cases["peak"]["status"] == "ok" and cases["peak"]["measured"] > 0 and cases["peak"]["devices"] == 2
  assert "measured peak:" in printed["peak"]
  for name in TRAIN_CASES:
    r = cases[name]
    assert r["status"] == "ok", (name, r)
    assert len(r["times"]) >= 3 and min(r["times"]) > 0 and r["finite"], (name, r)
    assert r["tokens"] == r["rows"] * r["seq"] and r["flops_per_step"] > 0
    assert "tokens/s; step median" in printed[name] and "MFU (active params):" in printed[name], printed[name]
  assert cases["moe_ragged_dot"]["active_params"] < cases["moe_ragged_dot"]["model_params"]
  assert cases["ep_all_to_all"]["devices"] == 2 and cases["dense_bf16"]["devices"] == 1
  assert "vs moe_ragged_dot: x" in printed["moe_blocked"] and "vs moe_ragged_dot: x" in printed["moe_save_dots_experts"]
  assert "vs dense_bf16: x" in printed["fp8_delayed"]
  assert "CPU emulation" in printed["ep_ragged_all_to_all"]
  # cuDNN attention needs a GPU; FP8 "current" is left to the full suite; each says so
  assert cases["dense_bf16_cudnn"]["status"] == "skipped" and "needs an NVIDIA GPU" in printed["dense_bf16_cudnn"]
  assert cases["fp8_current"]["status"] == "skipped" and "skipped: not run in --smoke" in printed["fp8_current"]
  assert results["meta"]["versions"]["jax"] and "load_after" in results["meta"]


def test_one_device_skips_the_transports_and_a_spent_budget_skips_everything():
  """Without starting jax: the parent decides what runs."""
  smoke = gpu_suite.MODES["smoke"]
  assert "1 device visible" in gpu_suite.skip_reason("ep_all_to_all", smoke, {"devices": 1})
  assert gpu_suite.skip_reason("ep_all_to_all", smoke, {"devices": 2}) is None
  assert "peak case did not succeed" in gpu_suite.skip_reason("ep_ragged_all_to_all", smoke, None)
  assert gpu_suite.skip_reason("dense_bf16_cudnn", smoke, {"backend": "gpu", "devices": 1}) is None
  assert "--quick" in gpu_suite.skip_reason("fp8_current", gpu_suite.MODES["quick"], {"devices": 1})
  p = subprocess.run([sys.executable, SUITE, "--smoke", "--budget", "1"], env=_env(1), capture_output=True, text=True,
                     timeout=60)
  assert p.returncode == 0, p.stderr
  # every case but fp8_current, dense_bf16_cudnn and the two ep ones (which give their own reasons)
  assert p.stdout.count("skipped: --budget spent") == len(gpu_suite.CASES) - 4, p.stdout


def test_a_failing_or_overrunning_case_is_one_line():
  smoke = gpu_suite.MODES["smoke"]
  r = gpu_suite.run_case("no_such_case", smoke, timeout=120, xla_cache="")
  assert r["status"] == "error" and r["error"].startswith("ValueError: unknown case 'no_such_case'"), r
  r = gpu_suite.run_case("dense_bf16", smoke, timeout=0.5, xla_cache="")
  assert r["status"] == "error" and r["error"].startswith("stopped after"), r


def test_preflight_lowers_every_full_size_case_and_each_fits_an_h100(capsys):
  """--preflight at the real shapes on 2 of the test's fake devices (so the expert-parallel cases lower too):
  the step of every case lowers and its modelled memory fits 80 GB."""
  assert gpu_suite.preflight(gpu_suite.MODES["full"], devices=2, device_memory="80GB") == 0
  printed = _sections(capsys.readouterr().out)
  assert list(printed) == list(gpu_suite.CASES[1:])
  for name in TRAIN_CASES:
    assert "lowered in" in printed[name] and "tokens/step on" in printed[name], printed[name]
    assert "modelled memory per device:" in printed[name] and "DOES NOT FIT" not in printed[name], printed[name]
  assert "8x2048 tokens/step on 2 device(s)" in printed["ep_ragged_all_to_all"]
  assert "not lowered here (cuDNN" in printed["dense_bf16_cudnn"] and "modelled memory" in printed["dense_bf16_cudnn"]
  assert "1.06B params" in printed["dense_bf16"]  # the ~1B dense model the docstring promises


def test_preflight_says_which_case_does_not_fit_or_build(capsys):
  smoke = gpu_suite.MODES["smoke"]
  assert gpu_suite.preflight(smoke, devices=1, device_memory="1MB") == 1
  printed = _sections(capsys.readouterr().out)
  assert "DOES NOT FIT" in printed["dense_bf16"] and "DOES NOT FIT" in printed["moe_ragged_dot"], printed
  assert "skipped: 1 device visible" in printed["ep_all_to_all"]
  assert gpu_suite.preflight(smoke, devices=3, device_memory="80GB") == 1  # 3 does not divide the experts
  printed = _sections(capsys.readouterr().out)
  assert "FAILED: ValueError:" in printed["ep_all_to_all"] and "do not split over 3 devices" in printed["ep_all_to_all"]
  assert "lowered in" in printed["dense_bf16"] and "DOES NOT FIT" not in printed["dense_bf16"]


def test_preflight_refuses_bad_flags_in_one_line():
  for flags, says in ((["--device-memory", "lots"], "--device-memory='lots'"), (["--devices", "0"], "--devices must be")):
    p = subprocess.run([sys.executable, SUITE, "--preflight", *flags], env=_env(1), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_mfu_above_100_percent_and_short_spreads_are_flagged():
  assert bench_util.mfu_text(0.4321) == "43.2%"
  assert "peak is wrong" in bench_util.mfu_text(1.3)
  assert bench_util.mfu_text(float("nan")) == "n/a"
  assert "fewer than 3 runs" in bench_util.spread([0.1, 0.2])
  three = bench_util.spread([0.1, 0.2, 0.3])
  assert "fewer than" not in three and "median 0.2000 s over 3 runs" in three
  assert bench_util.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": 3}


def test_vendor_peaks_match_the_device_kind_in_order():
  """jax's device_kind strings; "H100 PCIe" must not be read as an SXM part."""
  assert bench_util.vendor_peaks("NVIDIA H100 80GB HBM3") == {"bf16": 989e12, "fp8": 1979e12}
  assert bench_util.vendor_peaks("NVIDIA H200") == {"bf16": 989e12, "fp8": 1979e12}
  assert bench_util.vendor_peaks("NVIDIA H100 PCIe") == {"bf16": 756e12, "fp8": 1513e12}
  assert bench_util.vendor_peaks("cpu") == {"bf16": None, "fp8": None}
