"""Shared by the benchmarks: how busy the machine is, the CPU peak measured around the runs, and the
spread of repeated timings, so a figure taken on a loaded machine says so."""

from __future__ import annotations

import os
import statistics


def machine_line() -> str:
  """Cores and load average, with a warning when other work competes for the cores."""
  cores = os.cpu_count() or 1
  try:
    load1, load5, _ = os.getloadavg()
  except OSError:
    return f"{cores} cores (load average unknown)"
  line = f"{cores} cores, load average {load1:.2f} (1 min) {load5:.2f} (5 min)"
  if load1 > 0.5 * cores:
    line += (f"  WARNING: the machine is busy (load {load1:.1f} on {cores} cores): timings and MFU are not "
             "reliable; rerun on a quiet machine")
  return line


def spread(times: list[float]) -> str:
  """"median over N runs (min..max, spread %)"."""
  if not times:
    return "no runs"
  med = statistics.median(times)
  return (f"median {med:.4f} s over {len(times)} runs (min {min(times):.4f}, max {max(times):.4f}, "
          f"spread {(max(times) - min(times)) / med:.0%})")


class CpuPeak:
  """The CPU matmul peak measured once before and once after the timed runs; `value` is the larger
  (a peak measured while the machine was busy would inflate MFU), `line()` reports both."""

  def __init__(self):
    from ernie_jax.train import flops

    self._measure = flops.measure_matmul_flops
    self.before = self._measure()
    self.after = None

  @property
  def value(self) -> float:
    return max(self.before, self.after or 0.0)

  def finish(self) -> str:
    self.after = self._measure()
    drift = abs(self.after - self.before) / max(self.before, self.after)
    line = f"CPU peak fp32 matmul: {self.before / 1e9:.0f} GFLOP/s before, {self.after / 1e9:.0f} after the runs"
    if drift > 0.2:
      line += f"  WARNING: they differ by {drift:.0%}: the load changed during the runs"
    return line
