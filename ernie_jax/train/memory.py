"""Will the compiled train step fit? XLA's memory analysis of the compiled step against the memory
of the devices, checked before the first step runs.

On TPU / GPU the limit is each device's `bytes_limit`; on CPU every device of this process shares the
host's RAM, so the per-device need is multiplied by the local device count and compared with the
available host memory (`MemAvailable` of /proc/meminfo). A step that cannot fit raises
`TrainConfigError` naming `global_batch_size` with what to change, instead of an out-of-memory crash
(or a machine swapping to a halt) minutes later.
"""

from __future__ import annotations

import os

import jax

from ernie_jax.train.config import TrainConfigError

GiB = 1024 ** 3


def step_bytes(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled function: arguments, outputs (not aliased to donated arguments),
  temporaries, and their sum `total` (an upper estimate of the peak)."""
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  args, out, alias, temp = (int(getattr(ma, k, 0) or 0) for k in (
    "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes"))
  return {"arguments": args, "outputs": max(out - alias, 0), "temporaries": temp,
          "total": args + max(out - alias, 0) + temp}


def _host_available() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def available_bytes() -> tuple[int | None, int, str]:
  """(bytes available to the step's per-device need x multiplier, multiplier, where the figure comes from)."""
  dev = jax.local_devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), 1, f"{dev.platform} device memory"
  return _host_available(), jax.local_device_count(), "available host memory"


def check_step_fits(compiled, margin: float = 0.9) -> str:
  """A one-line description of the step's memory; raises TrainConfigError when it cannot fit in
  `margin` x the available memory."""
  need = step_bytes(compiled)
  if not need:
    return "memory: no estimate from this backend"
  have, mult, where = available_bytes()
  total = need["total"] * mult
  line = (f"memory: the step needs ~{total / GiB:.2f} GiB (per device: arguments {need['arguments'] / GiB:.2f}, "
          f"temporaries {need['temporaries'] / GiB:.2f}, outputs {need['outputs'] / GiB:.2f} GiB"
          + (f", x {mult} devices sharing the host" if mult > 1 else "") + ")"
          + (f"; {where}: {have / GiB:.2f} GiB" if have else ""))
  if have and total > margin * have:
    raise TrainConfigError("global_batch_size", line + ". It does not fit: raise grad_accum_steps (smaller "
                           "micro-batches), lower global_batch_size or data.seq_len, set model.remat='full', "
                           "or shard over more devices")
  return line
