"""Shared by the benchmarks, so that every figure says how it was taken: how busy the machine is
(load average against the cores, before and after), the device peak measured from a large matmul
(and the vendor's datasheet peak where the device is known), the median and spread of repeated
timings, MFU that refuses to print a value above 100% as if it were plausible, peak device memory,
and the timed pretraining step itself (`TrainStepRunner`, `time_train_step`).

jax and ernie_jax are imported inside the functions that need them, so that a script can print
`machine_line()` (or a GPU suite parent process can run) without importing jax.
"""

from __future__ import annotations

import os
import statistics
import time

# Measured-peak matmul per backend: (n, dtype name, chained matmuls per timing). CPU: fp32 (what the
# CPU benchmarks compute in); accelerators: bf16, chained so the dispatch latency does not count.
PEAK_MATMUL = {"cpu": (2048, "float32", 1), "gpu": (8192, "bfloat16", 10), "tpu": (8192, "bfloat16", 10)}


def load_average() -> tuple[float, float, int] | None:
  """(1-min load, 5-min load, cores), or None where the OS has no load average."""
  try:
    load1, load5, _ = os.getloadavg()
  except OSError:
    return None
  return load1, load5, os.cpu_count() or 1


def is_busy(load: tuple[float, float, int] | None) -> bool:
  """More than half the cores already busy with other work."""
  return load is not None and load[0] > 0.5 * load[2]


def machine_line(label: str = "") -> str:
  """Cores and load average, with a warning when other work competes for the cores."""
  load = load_average()
  prefix = f"{label}: " if label else ""
  if load is None:
    return f"{prefix}{os.cpu_count() or 1} cores (load average unknown)"
  load1, load5, cores = load
  line = f"{prefix}{cores} cores, load average {load1:.2f} (1 min) {load5:.2f} (5 min)"
  if is_busy(load):
    line += (f"  WARNING: the machine is busy (load {load1:.1f} on {cores} cores): timings and MFU are not "
             "reliable; rerun on a quiet machine")
  return line


# --------------------------------------------------------------------------------------------------
# Repeated timings.
MIN_RUNS = 3


def timed(fn, iters: int) -> list[float]:
  """Seconds of each of `iters` calls of fn() (warm up first: the first call of a jitted function compiles)."""
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def summary(times: list[float]) -> dict:
  """{"median", "min", "max", "runs"} of step times in seconds (for JSON results)."""
  if not times:
    return {"median": None, "min": None, "max": None, "runs": 0}
  return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": len(times)}


def spread(times: list[float]) -> str:
  """"median over N runs (min..max, spread %)"; fewer than MIN_RUNS runs are flagged."""
  if not times:
    return "no runs"
  med = statistics.median(times)
  line = (f"median {med:.4f} s over {len(times)} runs (min {min(times):.4f}, max {max(times):.4f}, "
          f"spread {(max(times) - min(times)) / med:.0%})")
  if len(times) < MIN_RUNS:
    line += f"  (fewer than {MIN_RUNS} runs: the spread means little)"
  return line


def mfu_text(mfu: float | None) -> str:
  """An MFU as a percentage; above 100% it is not a figure but a sign that the peak is wrong."""
  if mfu is None or mfu != mfu:
    return "n/a"
  if mfu > 1.0:
    return f"{mfu:.0%} > 100%: peak is wrong"
  return f"{mfu:.1%}"


# --------------------------------------------------------------------------------------------------
# Device peak.
def measure_peak(backend: str | None = None, dtype: str | None = None, n: int | None = None) -> tuple[float, str]:
  """(FLOP/s, description) of the backend's large matmul (`PEAK_MATMUL`), on the default device."""
  import jax
  import jax.numpy as jnp

  from ernie_jax.train import flops

  backend = backend or jax.default_backend()
  n0, dtype0, chain = PEAK_MATMUL.get(backend, PEAK_MATMUL["gpu"])
  n, dtype = n or n0, dtype or dtype0
  value = flops.measure_matmul_flops(n, jnp.dtype(dtype), repeats=5, chain=chain)
  return value, f"measured {dtype} {n}x{n} matmul ({backend})"


def vendor_peaks(kind: str) -> dict[str, float | None]:
  """{"bf16", "fp8"}: the datasheet dense peaks of a jax device_kind (None where unknown)."""
  from ernie_jax.train import flops

  return {"bf16": flops.vendor_peak(kind), "fp8": flops.vendor_peak(kind, flops.PEAK_FP8_FLOPS)}


class DevicePeak:
  """The device's matmul peak measured once before and once after the timed runs (`finish`);
  `value` is the larger (a peak measured while the machine was busy would inflate MFU). `vendor` is
  the datasheet bf16 peak where the device is known (None on CPU)."""

  def __init__(self, n: int | None = None):
    import jax

    self.kind = jax.devices()[0].device_kind
    self._n = n
    self.before, self.source = measure_peak(n=n)
    self.after = None
    self.vendor = vendor_peaks(self.kind)["bf16"]

  @property
  def value(self) -> float:
    return max(self.before, self.after or 0.0)

  def finish(self) -> str:
    self.after, _ = measure_peak(n=self._n)
    drift = abs(self.after - self.before) / max(self.before, self.after)
    line = (f"peak ({self.source}): {self.before / 1e9:,.0f} GFLOP/s before, {self.after / 1e9:,.0f} after "
            "the runs")
    if drift > 0.2:
      line += f"  WARNING: they differ by {drift:.0%}: the load changed during the runs"
    return line


# Kept for scripts written against the CPU-only helper.
CpuPeak = DevicePeak


def peak_memory_bytes(device=None) -> int | None:
  """The device's peak bytes in use since the process started (None where the backend keeps no
  statistics, e.g. CPU). Cumulative: measure one configuration per process for a per-run figure."""
  import jax

  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # backends without the statistics raise or return None
    return None
  return (stats or {}).get("peak_bytes_in_use")


# --------------------------------------------------------------------------------------------------
# The timed step.
def random_batch(rows: int, seq: int, vocab: int, seed: int = 0):
  """A text batch of random tokens in the layout `ernie_jax.train.step.put_batch` takes."""
  import numpy as np

  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (rows, seq + 1)).astype(np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=np.ones((rows, seq), np.int32),
              positions=np.tile(np.arange(seq, dtype=np.int32), (rows, 1)), loss_mask=np.ones((rows, seq), np.int32))


class TrainStepRunner:
  """The jitted pretraining step (`ernie_jax.train.step`) on a fixed batch, built and warmed up
  (`warmup` steps, the first compiles); `step()` runs one more optimizer step and returns its seconds.
  mesh: default one device. optim / loss: an `OptimConfig` / `LossConfig` (defaults: the library's,
  without LR warm-up)."""

  def __init__(self, model_cfg, batch, *, warmup: int = 1, optim=None, loss=None, mesh=None):
    import jax

    from ernie_jax.parallel import MeshConfig, make_mesh
    from ernie_jax.train.losses import LossConfig
    from ernie_jax.train.step import abstract_train_state, batch_sharding, create_train_state, make_train_step, put_batch

    self.mesh = mesh or make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    tx, schedule = optimizer(optim)
    graphdef, self.state = create_train_state(model_cfg, tx, seed=0, mesh=self.mesh)
    _, shardings, _ = abstract_train_state(model_cfg, tx, 0, self.mesh)
    self._step = make_train_step(graphdef, shardings, loss or LossConfig(), schedule)
    with jax.set_mesh(self.mesh):
      self.batch = put_batch(batch, 1, batch_sharding(self.mesh))
    self.metrics = None
    self.first_step_s = self.step()
    for _ in range(max(warmup, 1) - 1):
      self.step()

  def step(self) -> float:
    import jax

    with jax.set_mesh(self.mesh):
      t = time.perf_counter()
      self.state, m = self._step(self.state, self.batch)
      jax.block_until_ready(m)
      seconds = time.perf_counter() - t
    self.metrics = m
    return seconds


def optimizer(optim):
  """(tx, schedule) of the timed steps: `optim` (an OptimConfig) or the library's AdamW without LR warm-up."""
  from ernie_jax.train.optimizer import OptimConfig, make_optimizer

  return make_optimizer(optim or OptimConfig(warmup_steps=0), 1000)


def lower_train_step(model_cfg, rows: int, seq: int, *, optim=None, loss=None, mesh):
  """`TrainStepRunner`'s step lowered for abstract arguments of its shapes (a [rows, seq] `random_batch`):
  no state is allocated and nothing runs. Returns the jax `Lowered`."""
  import jax

  from ernie_jax.train.losses import LossConfig
  from ernie_jax.train.step import abstract_train_state, batch_sharding, make_train_step

  tx, schedule = optimizer(optim)
  graphdef, shardings, target = abstract_train_state(model_cfg, tx, 0, mesh)
  step = make_train_step(graphdef, shardings, loss or LossConfig(), schedule)
  sharding = batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((1,) + v.shape, v.dtype, sharding=sharding)  # put_batch's [A=1, rows, seq]
           for k, v in random_batch(rows, seq, model_cfg.vocab_size).items()}
  with jax.set_mesh(mesh):
    return step.lower(target, batch)


def time_train_step(model_cfg, batch, steps: int, *, warmup: int = 1, optim=None, loss=None, mesh=None,
                    deadline: float | None = None) -> dict:
  """Times `steps` optimizer steps of a `TrainStepRunner` after its `warmup` steps (the first compiles).
  deadline: a `time.time()` after which no further timed step starts (at least one always runs).
  Returns {"times": [s], "first_step_s": compile + first step, "metrics": the last step's, host}."""
  import jax

  r = TrainStepRunner(model_cfg, batch, warmup=warmup, optim=optim, loss=loss, mesh=mesh)
  times = []
  for _ in range(steps):
    if times and deadline is not None and time.time() > deadline:
      break
    times.append(r.step())
  return {"times": times, "first_step_s": r.first_step_s, "metrics": jax.device_get(r.metrics)}
