r"""Plan a training run's layout before booking the devices: per-device memory of parameters, gradients,
optimizer state and activations, and the meshes / remat policies / micro-batches that fit, ranked by the
communication one step needs.

  python -m ernie_jax.plan --config=experiments/configs/ernie45_21b_a3b.py --devices=64 --device-memory=95GB
  python -m ernie_jax.plan --config=experiments/configs/sft_ernie45_0p3b.py --devices=1 --device-memory=16GB \
      --config.data.seq_len=4096 --top=5

--config: any pretraining / SFT / DPO config (experiments/configs/*.py), with --config.x=y overrides as for the
entry points; data files and tokenizers are not read; the architecture is `init_from`'s when that directory
exists. --devices: the device count. --device-memory: per device, with a unit (GB / GiB / MB / MiB / TB / TiB).
--margin: the fraction of the device memory a layout may use (default 0.9: XLA's own workspace, fragmentation
and the estimate's error). --remat: the policies to consider (default all). --top: meshes listed. --compile:
also compile the chosen layout on the devices this process sees (their number must be --devices; nothing is
allocated) and print XLA's memory analysis next to the estimate, e.g. on the booked cluster before the run.

Printed: the run; for the config's own mesh, the per-device parameters / gradients / optimizer state and, by
remat policy (rows) and grad_accum_steps (columns), activations / total with a fit mark; the candidates that
fit, best first; the chosen layout as config overrides. The memory and communication models, their formulas
and measured error: `ernie_jax/train/memory_model.py`, `ernie_jax/train/plan.py`.
Exit status: 0, 1 (nothing fits / a config problem: one line saying what to change), 2 (bad flags).
"""

from __future__ import annotations

import re
import sys

import jax

from ernie_jax.cli.train_main import root_message
from ernie_jax.config.base import REMATS
from ernie_jax.parallel import MESH_AXES, ShardingError
from ernie_jax.train.config import TrainConfigError
from ernie_jax.train.memory_model import Layout, Memory
from ernie_jax.train.plan import Candidate, Planner, PlanError

UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
MAX_COLUMNS = 6  # grad_accum_steps columns of the config mesh's table
SCRIPTS = {"pretrain": "experiments/pretrain.py", "sft": "experiments/sft.py", "dpo": "experiments/dpo.py"}


def parse_memory(text: str) -> tuple[float, str, float]:
  """'95GB' -> (bytes, unit, bytes per unit); the report prints in the unit given (B, KB, MB, GB, TB decimal;
  KiB, MiB, GiB, TiB binary; any case)."""
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text or "")
  if not m or m.group(2).lower() not in UNITS or float(m.group(1)) <= 0:
    unit = m.group(2) if m else ""
    why = f"unknown unit {unit!r}" if m and unit else "needs a positive number with a unit"
    raise PlanError(f"--device-memory={text!r}: {why}; use e.g. 95GB, 80GiB or 16000MB")
  unit = m.group(2).lower()
  label = unit.upper().replace("IB", "iB")
  return float(m.group(1)) * UNITS[unit], label, float(UNITS[unit])


def plural(n: int, word: str) -> str:
  return f"{n} {word}" + ("" if n == 1 else "s")


class Report:
  """Formats the plan in the user's memory unit."""

  def __init__(self, planner: Planner, memory: float, margin: float, unit: str, scale: float):
    self.p, self.memory, self.margin, self.unit, self.scale = planner, memory, margin, unit, scale
    self.usable = margin * memory

  def g(self, n: float) -> str:
    return f"{n / self.scale:.2f}"

  def header(self, config_path: str) -> list[str]:
    p, m = self.p, self.p.model_cfg
    kind = "MoE" if m.is_moe else "dense"
    arch = f"{m.num_hidden_layers} layers, hidden {m.hidden_size}"
    if m.is_moe:
      arch += (f", {m.moe_num_experts} experts top-{m.moe_k}, {m.moe_num_shared_experts} shared, "
               f"moe_transport {m.moe_transport}")
    arch += f", {m.num_mtp_layers} MTP" if m.num_mtp_layers else ""
    count = f"{p.param_count / 1e9:.2f}B" if p.param_count >= 1e9 else f"{p.param_count / 1e6:.2f}M"
    return [f"plan: {config_path} ({p.recipe.name}), ERNIE 4.5 {kind} ({arch}); {count} parameters "
            f"({m.param_dtype}), compute {m.dtype}; architecture from {p.arch_source}",
            f"  {p.global_batch} rows x {p.seq} tokens per step; {plural(p.devices, 'device')} x "
            f"{self.memory / self.scale:g} "
            f"{self.unit}, usable {self.g(self.usable)} {self.unit} (margin {self.margin:g})"]

  def mesh_table(self, sizes: dict[str, int], remats) -> list[str]:
    """The config mesh's breakdown: state, then activations / total by remat x grad_accum."""
    p = self.p
    mesh = " ".join(f"{a}={sizes[a]}" for a in MESH_AXES)
    try:
      table = p.table(sizes, remats)
    except ShardingError as e:
      return [f"the config's mesh {mesh}: not valid for this model ({e})"]
    if not table:
      return [f"the config's mesh {mesh}: no grad_accum_steps splits {p.global_batch} rows over its batch shards"]
    any_mem = next(iter(table.values()))
    s = any_mem.state
    lines = [f"the config's mesh {mesh}, per device ({self.unit}): parameters {self.g(s.params)}, gradients "
             f"{self.g(s.trained)} (x2 with grad_accum > 1), optimizer {self.g(s.optimizer)}, buffers "
             f"{self.g(s.buffers)}" + (f", reference copy {self.g(s.reference)}" if s.reference else ""),
             f"  activations / total ({self.unit}) by remat policy and grad_accum_steps (rows per device per "
             "micro-batch); * = fits"]
    accums = sorted({a for _, a in table})
    if len(accums) > MAX_COLUMNS:  # a window from two columns before the first that fits
      fits = [i for i, a in enumerate(accums) if any(table[r, a].total <= self.usable for r, b in table if b == a)]
      start = max(0, min(fits[0] - 2 if fits else len(accums), len(accums) - MAX_COLUMNS))
      shown = accums[start:start + MAX_COLUMNS]
      lines[-1] += f"; grad_accum_steps {shown[0]}..{shown[-1]} of {accums[0]}..{accums[-1]} shown"
      accums = shown
    width = 20
    lines.append("  " + "remat".ljust(18) + "".join(
      f"{a} ({table[next(r for r, b in table if b == a), a].micro_rows} rows)".rjust(width) for a in accums))
    for remat in dict.fromkeys(r for r, _ in table):
      cells = []
      for a in accums:
        mem = table[remat, a]
        mark = "*" if mem.total <= self.usable else " "
        cells.append(f"{self.g(mem.activations)} / {self.g(mem.total)}{mark}".rjust(width))
      lines.append("  " + remat.ljust(18) + "".join(cells))
    return lines

  def candidates(self, cands: list[Candidate], top: int) -> list[str]:
    n = len(cands)
    lines = [f"{n} mesh{' fits' if n == 1 else 'es fit'}; the best {min(top, len(cands))}, each with its best remat "
             "policy and "
             "grad_accum_steps, by communication per step (GB received per device: fsdp gathers + "
             "reduce-scatters, data all-reduces, tensor all-reduces, expert exchanges):",
             "    #  data fsdp tensor expert  remat              accum  rows  memory  " + "comm".rjust(8)
             + "     fsdp     data   tensor   expert"]
    for i, c in enumerate(cands[:top], 1):
      lay, mem = c.layout, c.memory
      lines.append(f"  {i:3d}  {lay.data:4d} {lay.fsdp:4d} {lay.tensor:6d} {lay.expert:6d}  {lay.remat:<18} "
                   f"{lay.grad_accum:5d} {mem.micro_rows:5d} {self.g(mem.total):>7}  {c.comm_total / 1e9:8.1f} "
                   + " ".join(f"{c.comm[k] / 1e9:8.1f}" for k in ("fsdp", "data", "tensor", "expert")))
    return lines

  def chosen(self, cand: Candidate, config_path: str) -> list[str]:
    lay, mem = cand.layout, cand.memory
    return [f"chosen: {self.breakdown(mem)}",
            f"  python {SCRIPTS.get(self.p.recipe.name, 'experiments/pretrain.py')} --config={config_path} "
            + lay.overrides()]

  def breakdown(self, mem: Memory) -> str:
    lay, s = mem.layout, mem.state
    return (f"data={lay.data} fsdp={lay.fsdp} tensor={lay.tensor} expert={lay.expert}, remat {lay.remat}, "
            f"grad_accum_steps {lay.grad_accum} ({mem.micro_rows} rows per device per micro-batch): parameters "
            f"{self.g(s.params)} + gradients {self.g(mem.grads)} + optimizer {self.g(s.optimizer)} + activations "
            f"{self.g(mem.activations)} = {self.g(mem.total)} {self.unit} per device"
            + (" (the optimizer update's peak)" if mem.update > mem.grads + mem.activations else ""))


def plan(config, config_path: str, devices: int, device_memory: str, margin: float = 0.9, top: int = 10,
         remats: str = "", compile_here: bool = False) -> list[str]:
  """The report lines; raises PlanError / TrainConfigError / ShardingError with a one-line message.
  compile_here: also compile the chosen layout on this process's devices and print XLA's figures."""
  if not 0 < margin <= 1:
    raise PlanError(f"--margin must be in (0, 1], got {margin}")
  if top < 1:
    raise PlanError(f"--top must be >= 1, got {top}")
  memory, unit, scale = parse_memory(device_memory)
  chosen_remats = tuple(r.strip() for r in remats.split(",") if r.strip()) or REMATS
  bad = [r for r in chosen_remats if r not in REMATS]
  if bad:
    raise PlanError(f"--remat: unknown policy {bad[0]!r}; choose from {', '.join(REMATS)}")
  planner = Planner(config, devices)
  rep = Report(planner, memory, margin, unit, scale)
  lines = rep.header(config_path) + [""]
  own = planner.config_layout()
  if own is None:
    lines.append(f"the config's mesh {planner.cfg.mesh} does not fit {plural(devices, 'device')} (its fixed axes do "
                 "not divide "
                 "them): see the candidates")
  else:
    lines += rep.mesh_table(own, chosen_remats)
  lines.append("")
  if not planner.meshes():
    raise PlanError(f"no mesh of {plural(devices, 'device')} divides both the model's sharded dimensions and the "
                    f"{planner.global_batch} rows of a step: change --devices or global_batch_size")
  cands, smallest = planner.candidates(rep.usable, chosen_remats, per_mesh=True)
  if not cands:
    raise PlanError(f"nothing fits {plural(devices, 'device')} x {memory / scale:g} {unit} (usable "
                    f"{rep.g(rep.usable)} {unit}): "
                    f"the smallest layout needs {rep.breakdown(smallest)}; use more or larger devices, a smaller "
                    "global_batch_size or data.seq_len, or LoRA (finetune.method=lora)")
  lines += rep.candidates(cands, top) + [""] + rep.chosen(cands[0], config_path)
  if compile_here:
    if jax.device_count() != devices:
      raise PlanError(f"--compile compiles the chosen layout on the devices this process sees: "
                      f"{jax.device_count()} {jax.default_backend()} devices, not --devices={devices}")
    x = planner.compiled_step_bytes(cands[0].layout)
    est = cands[0].memory
    lines.append(f"XLA ({jax.default_backend()}, compiled here): arguments {rep.g(x['arguments'])} + temporaries "
                 f"{rep.g(x['temporaries'])} = {rep.g(x['total'])} {unit} per device; estimated "
                 f"{rep.g(est.arguments)} + {rep.g(est.temporaries)} = {rep.g(est.total)}")
  return lines


def main(argv=None) -> None:
  from absl import flags
  from ml_collections import config_flags

  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file("config", None, "training config file (experiments/configs/*.py)",
                                                flag_values=fv, sys_argv=argv)
  flags.DEFINE_integer("devices", None, "number of devices", flag_values=fv)
  flags.DEFINE_string("device-memory", None, "memory per device with a unit, e.g. 95GB or 80GiB", flag_values=fv)
  flags.DEFINE_float("margin", 0.9, "fraction of the device memory a layout may use", flag_values=fv)
  flags.DEFINE_integer("top", 10, "candidates listed", flag_values=fv)
  flags.DEFINE_string("remat", "", "comma-separated remat policies to consider (default: all)", flag_values=fv)
  flags.DEFINE_bool("compile", False, "also compile the chosen layout here (needs --devices devices) and print "
                    "XLA's memory analysis next to the estimate", flag_values=fv)
  if any(a in ("--help", "-h", "--helpshort") for a in argv[1:]):
    print(__doc__.strip())
    sys.exit(0)
  try:
    fv(argv)
    config = config_flag.value
    if config is None or fv.devices is None or fv["device-memory"].value is None:
      raise PlanError("--config, --devices and --device-memory are required (see --help)")
    config.keys()  # (a config file that failed to load is reported when read)
  except PlanError as e:
    _fail(str(e), 2)
  except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as e:
    _fail(f"{root_message(e)} (see --help)", 2)
  try:
    lines = plan(config, fv["config"].config_filename, fv.devices, fv["device-memory"].value, fv.margin, fv.top,
                 fv.remat, fv.compile)
  except PlanError as e:
    _fail(str(e), 2 if str(e).startswith("--") else 1)
  except (TrainConfigError, ShardingError, ValueError) as e:
    _fail(str(e), 1)
  print("\n".join(lines), flush=True)


def _fail(message: str, status: int) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


__all__ = ["Layout", "main", "parse_memory", "plan"]
