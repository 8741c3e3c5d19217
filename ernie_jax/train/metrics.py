"""Training metrics to the console (progress bar with ETA + one line per logged step), TensorBoard
event files (`<workdir>/tensorboard/`) and `<workdir>/metrics.jsonl` (one JSON object per logged
step, always with `step` and `loss`). Only process 0 writes."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import numpy as np

# console short names, in display order
_CONSOLE = (("loss", "loss", "{:.4f}"), ("lm_loss", "lm", "{:.4f}"), ("mtp_loss", "mtp", "{:.4f}"),
            ("moe_aux_loss", "aux", "{:.4f}"), ("moe_z_loss", "z", "{:.3g}"),
            ("moe_orth_loss", "orth", "{:.3g}"), ("rewards/accuracies", "acc", "{:.3f}"),
            ("rewards/margins", "margin", "{:.3f}"), ("grad_norm", "gnorm", "{:.3f}"), ("lr", "lr", "{:.2e}"),
            ("tokens_per_sec", "tok/s", "{:,.0f}"), ("mfu", "MFU", "{:.2%}"), ("eval_loss", "eval", "{:.4f}"),
            ("eval_rewards/accuracies", "eval acc", "{:.3f}"))


def summarize_expert_usage(usage: np.ndarray) -> dict[str, Any]:
  """usage [L, E] token counts -> scalar balance summaries and per-layer fractions."""
  usage = np.asarray(usage, np.float64)
  frac = usage / np.maximum(usage.sum(-1, keepdims=True), 1.0)
  mean = np.maximum(usage.mean(-1), 1e-9)
  return {
    "moe_usage_max_over_mean": float(np.mean(usage.max(-1) / mean)),
    "moe_usage_min_over_mean": float(np.mean(usage.min(-1) / mean)),
    "expert_usage": np.round(frac, 4).tolist(),
  }


def truncate_jsonl(path: str, last_step: int) -> None:
  """Drop records after `last_step` (used on resume: those steps are about to be redone)."""
  if not os.path.isfile(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= last_step:
        keep.append(line)
    except (ValueError, KeyError):
      continue
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
  def __init__(self, workdir: str, *, total_steps: int, start_step: int, tensorboard: bool = True,
               progress_bar: bool = True, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._bar = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(self.jsonl_path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
    if progress_bar:
      from tqdm import tqdm

      # disable=None: no bar when stderr is not a terminal (logs stay clean)
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       disable=None, file=sys.stderr)
      if self._bar.disable:
        self._bar = None

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def print(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def write(self, step: int, scalars: dict[str, float], extra: dict[str, Any] | None = None) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _num(v) for k, v in scalars.items()}, **(extra or {})}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    parts = [f"step {step}"]
    for key, short, fmt in _CONSOLE:
      if key in scalars and scalars[key] is not None:
        parts.append(f"{short} {fmt.format(scalars[key])}")
    self.print(" | ".join(parts))
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}", refresh=False)

  def close(self) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    self._jsonl.close()


def _num(v):
  if isinstance(v, (np.floating, np.integer)):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no nan/inf
  return v
