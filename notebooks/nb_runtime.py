"""What the notebooks share: install the project on a fresh Colab / Kaggle runtime, find out which
devices are there and pick run sizes for them, load the experiment configs with overrides, and plot
a run's metrics. Not part of the `ernie_jax` package: it only calls its public entry points.

  rt = setup(fake_cpu_devices=4)                # before anything imports jax
  rt.pick(tiny=..., cpu=..., accel=...)          # the run size for this runtime
  c = load_config("tiny", **{"steps": 20, "model.hidden_size": 64})
  plot_metrics(read_metrics(workdir), ["loss", "lm_loss"])

The one size switch is the environment variable ERNIE_JAX_NOTEBOOK_SIZE: "tiny" gives the CI settings
(tiny models, a handful of steps, CPU), "full" (the default) sizes the runs for the devices found:
"accel" on a TPU or GPU, "cpu" otherwise. ERNIE_JAX_NOTEBOOK_WORKDIR moves the run directories.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository checkout
SIZES = ("tiny", "full")
FAKE_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def on_colab() -> bool:
  return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def on_kaggle() -> bool:
  return "KAGGLE_KERNEL_RUN_TYPE" in os.environ


def accelerator_hint() -> str:
  """"tpu", "gpu" or "" from the machine, without importing jax (which decides once, at import)."""
  if (any(k in os.environ for k in ("TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR", "TPU_NAME"))
      or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")  # (v2-v4 / v5e, v6e TPU VMs)
      or importlib.util.find_spec("libtpu") is not None):
    return "tpu"
  if shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0"):
    return "gpu"
  return ""


def install() -> None:
  """pip-install this checkout (editable, with the tokenizer, image and notebook extras) when `ernie_jax` is
  not importable yet, plus the jax build for the accelerator; then make it importable in this kernel."""
  if importlib.util.find_spec("ernie_jax") is None:
    jax_build = {"tpu": ["jax[tpu]"], "gpu": ["jax[cuda12]"]}.get(accelerator_hint(), [])
    cmd = [sys.executable, "-m", "pip", "install", "-q", "-e", f"{ROOT}[tokenizers,vl,notebooks]", *jax_build]
    print("installing:", " ".join(cmd[4:]), flush=True)
    subprocess.run(cmd, check=True)
  if ROOT not in sys.path:  # (an editable install's .pth is only read when Python starts)
    sys.path.insert(0, ROOT)
  importlib.invalidate_caches()


@dataclasses.dataclass(frozen=True)
class Runtime:
  """The devices a notebook found and the sizes that follow from them."""

  size: str  # "tiny" (CI), "cpu" or "accel"
  backend: str  # "cpu" | "tpu" | "gpu"
  device_kind: str  # e.g. "TPU v5 lite", "cpu"
  devices: int
  workroot: str  # run directories go under it

  @property
  def tiny(self) -> bool:
    return self.size == "tiny"

  @property
  def dtype(self) -> str:
    """The compute dtype: bf16 on TPU / GPU, fp32 on CPU."""
    return "float32" if self.backend == "cpu" else "bfloat16"

  @property
  def precision(self) -> str:
    """`train.precision` for the training configs."""
    return "fp32" if self.backend == "cpu" else "bf16"

  @property
  def compilation_cache(self) -> str:
    """`compilation_cache_dir` of the runs: none on CPU (executables read back from the persistent cache
    deadlocked in their collectives on fake CPU devices with jax 0.10.2), else one under the workroot."""
    return "" if self.backend == "cpu" else os.path.join(self.workroot, "xla_cache")

  def pick(self, **sizes: Any) -> Any:
    """The value for this runtime's size: pick(tiny=..., cpu=..., accel=...)."""
    missing = {"tiny", "cpu", "accel"} - set(sizes)
    if missing:
      raise TypeError(f"pick() needs a value for every size; missing {sorted(missing)}")
    return sizes[self.size]

  def batch(self, rows: int) -> int:
    """`rows` rounded up to a multiple of the device count (every device gets whole rows)."""
    return -(-rows // self.devices) * self.devices

  def workdir(self, name: str, fresh: bool = True) -> str:
    """A run directory under the workroot; `fresh` removes an earlier run's (a run in a directory with
    checkpoints resumes from them)."""
    path = os.path.join(self.workroot, name)
    if fresh and os.path.isdir(path):
      shutil.rmtree(path)
    return path


def _default_workroot() -> str:
  if "ERNIE_JAX_NOTEBOOK_WORKDIR" in os.environ:
    return os.environ["ERNIE_JAX_NOTEBOOK_WORKDIR"]
  if on_colab():
    return "/content/ernie_jax_runs"
  if on_kaggle():
    return "/kaggle/working/ernie_jax_runs"
  return "/tmp/ernie_jax_notebooks"


def setup(fake_cpu_devices: int = 0) -> Runtime:
  """Install if needed, start jax and describe the runtime. `fake_cpu_devices`: without an accelerator,
  split the host CPU into this many jax devices (so a mesh has several devices, e.g. in CI); it has to
  happen before jax is imported."""
  size = os.environ.get("ERNIE_JAX_NOTEBOOK_SIZE", "full")
  if size not in SIZES:
    raise ValueError(f"ERNIE_JAX_NOTEBOOK_SIZE must be one of {SIZES}, got {size!r}")
  install()
  cpu_only = os.environ.get("JAX_PLATFORMS", "") == "cpu" or not accelerator_hint()
  if fake_cpu_devices > 1 and cpu_only:
    if "jax" in sys.modules:
      print(f"note: jax is already imported; {FAKE_DEVICES_FLAG}={fake_cpu_devices} needs a kernel restart")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(FAKE_DEVICES_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"{FAKE_DEVICES_FLAG}={fake_cpu_devices}"])
  import jax

  devices = jax.devices()
  backend = jax.default_backend()
  if size == "tiny":
    kind = "tiny"
  else:
    kind = "cpu" if backend == "cpu" else "accel"
  rt = Runtime(size=kind, backend=backend, device_kind=devices[0].device_kind, devices=len(devices),
               workroot=_default_workroot())
  os.makedirs(rt.workroot, exist_ok=True)
  where = "Colab" if on_colab() else "Kaggle" if on_kaggle() else "local"
  print(f"runtime: {where}, {rt.devices} x {rt.device_kind} ({backend}); size {rt.size}; dtype {rt.dtype}; "
        f"runs under {rt.workroot}")
  if kind == "cpu":
    print("note: no TPU / GPU found: the runs are sized for a CPU (Colab: Runtime > Change runtime type > TPU)")
  return rt


# ------------------------------------------------------------------------------------------------
# Experiment configs
def load_config(name: str, **overrides: Any):
  """`experiments/configs/<name>.py`'s get_config() with `overrides` given as dotted field names
  ({"steps": 20, "model.hidden_size": 64}; see `python experiments/pretrain.py --help` for the fields)."""
  path = os.path.join(ROOT, "experiments", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"experiment_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return override(module.get_config(), **overrides)


def override(config, **overrides: Any):
  """Set dotted fields of an ml-collections config (an unknown field is an error naming it)."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"config has no field {key!r}")
    node[leaf] = value
  return config


# ------------------------------------------------------------------------------------------------
# Metrics and plots
def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `<workdir>/metrics.jsonl` (one per logged step; see ernie_jax.train.metrics)."""
  from ernie_jax.train.metrics import read_jsonl

  return read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def read_run_info(workdir: str) -> dict[str, Any]:
  """`<workdir>/run_info.json`: model size, mesh, data figures (unigram entropy, the VL text-only bound)."""
  import json

  with open(os.path.join(workdir, "run_info.json")) as f:
    return json.load(f)


def series(records, key: str):
  """(steps, values) of the records that have `key`."""
  rows = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
  return [s for s, _ in rows], [v for _, v in rows]


def plot_metrics(records, keys, *, title: str = "", ax=None, hlines: dict[str, float] | None = None,
                 ylabel: str = ""):
  """One line per metric key against the step; `hlines` {label: y} draws reference levels."""
  import matplotlib.pyplot as plt

  if ax is None:
    _, ax = plt.subplots(figsize=(6, 3.5))
  for key in keys:
    steps, values = series(records, key)
    if steps:
      ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=key)
  for label, y in (hlines or {}).items():
    ax.axhline(y, ls="--", lw=1, color="gray")
    ax.annotate(label, (ax.get_xlim()[0], y), fontsize=8, color="gray", va="bottom")
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  return ax


def plot_expert_load(records, key: str = "expert_usage", *, title: str = "expert load"):
  """Heatmaps of the per-layer expert load over training: for each MoE layer, the fraction of its routed
  tokens each expert received (rows: experts, columns: logged steps). Balanced = 1 / experts."""
  import matplotlib.pyplot as plt
  import numpy as np

  rows = [r for r in records if key in r]
  if not rows:
    raise ValueError(f"no {key!r} in the metrics (a dense model, or no logged step yet)")
  usage = np.asarray([r[key] for r in rows], np.float64)  # [time, layers, experts]
  steps = [r["step"] for r in rows]
  layers, experts = usage.shape[1], usage.shape[2]
  fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers + 1, 3), squeeze=False, sharey=True)
  vmax = max(float(usage.max()), 2.0 / experts)
  for i, ax in enumerate(axes[0]):
    im = ax.imshow(usage[:, i].T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=vmax,
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, experts - 0.5), interpolation="nearest")
    ax.set_title(f"MoE layer {i}", fontsize=9)
    ax.set_xlabel("step")
  axes[0][0].set_ylabel("expert")
  fig.colorbar(im, ax=axes[0].tolist(), label=f"share of tokens (balanced = {1 / experts:.3f})")
  fig.suptitle(title, fontsize=10, y=1.04)
  return fig


def show_images(images, titles, *, cols: int = 6, size: float = 1.6, width: int = 18):
  """A grid of images, each with a title (wrapped at `width` characters, at most two lines)."""
  import textwrap

  import matplotlib.pyplot as plt

  rows = -(-len(images) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(size * cols, (size + 0.6) * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, img, t in zip(axes.flat, images, titles):
    ax.imshow(img)
    ax.set_title("\n".join(textwrap.wrap(t, width)[:2]), fontsize=8)
  fig.tight_layout()
  return fig
