"""The training loop shared by pretraining (`experiments/pretrain.py`), fine-tuning
(`experiments/sft.py`) and preference optimisation (`experiments/dpo.py`).

`train(config, recipe)` runs or resumes a run in `config.workdir`:
  validate config -> tokenizer + data checks -> mesh -> train state (restored, `init_from`, or
  fresh; created directly in its sharded layout) -> for each step: batch -> jitted step ->
  non-finite check -> metrics -> (evaluation) -> checkpoint.
Starting in a workdir that holds checkpoints resumes from the latest one (parameters, optimizer,
step, RNG and data position); a damaged latest checkpoint is moved aside (`<step>.damaged-<time>`)
and the newest intact one is used. SIGTERM or Ctrl-C (SIGINT) saves a checkpoint and exits; a second
Ctrl-C aborts at once (exit 130, no save). The workdir is locked for the run's lifetime; a start that
fails before training leaves no workdir it created behind.

What differs between kinds of training is a `Recipe` (this module's `Pretraining`; fine-tuning in
`ernie_jax.train.sft`, DPO in `ernie_jax.train.dpo`): how the config is parsed, the tokenizer and data, the model (e.g. LoRA
adapters on a frozen base), which parameters train and with which optimizer groups, what a
checkpoint holds, and an optional evaluation. The loop itself is the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from ernie_jax.data import DataError, load_tokenizer_for, make_pipeline, resolve_eos, unigram_entropy
from ernie_jax.data.pipeline import VL_FIELDS, VL_SOURCES
from ernie_jax.data.shards import ShardedBatches, merge_states
from ernie_jax.data.sources import TokenWindows, expand_paths
from ernie_jax.data.tokenizers import TokenizerError
from ernie_jax.data.vl import text_only_bound
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.loading import from_pretrained
from ernie_jax.model import attention_kernels
from ernie_jax.model.moe import dispatch
from ernie_jax.parallel import distributed
from ernie_jax.train import config as config_lib
from ernie_jax.train import flops as flops_lib
from ernie_jax.train.checkpoint import Checkpointer
from ernie_jax.train.memory import check_step_fits
from ernie_jax.train.metrics import MetricWriter, summarize_expert_usage, truncate_jsonl
from ernie_jax.train.optimizer import make_optimizer
from ernie_jax.train.param_groups import make_grouped_optimizer, trained_filter
from ernie_jax.train.step import (abstract_train_state, all_finite, batch_sharding, build_mesh,
                                  create_train_state, make_train_step, put_batch)
from ernie_jax.train.tasks import task_for
from ernie_jax.train.workdir import WorkdirLock

# ModelConfig fields that may differ from the checkpoint being resumed / initialised from: they
# change how the model computes, not which parameters it has.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "scan_unroll", "attention_impl", "moe_impl", "moe_transport",
                  "moe_capacity_factor")
#: the data's reference losses a run's summary repeats from `Setup.info` (the unigram entropy of text data; the loss a
#: model that ignores the images cannot beat, for VL data)
SUMMARY_BOUNDS = ("unigram_entropy", "text_only_bound")
# FP8 fields: taken from the config for `init_from` (the FP8 scaling state starts fresh, or from the
# checkpoint's when it has one), but they must match a checkpoint being resumed (they add state).
FP8_FIELDS = ("fp8_recipe", "fp8_history_len", "fp8_margin")


class NonFiniteError(RuntimeError):
  pass


class Preemption:
  """SIGTERM or SIGINT (Ctrl-C) sets a flag; the loop saves a checkpoint at the end of the current step
  and exits. A second SIGINT aborts at once (exit 130; the previous checkpoint stays intact)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    for sig in self.SIGNALS:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      print("second Ctrl-C: aborting without saving", file=sys.stderr, flush=True)
      os._exit(130)
    self.requested = True
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


# ------------------------------------------------------------------------------------------------
# What a kind of training decides.
@dataclasses.dataclass
class Setup:
  """What a recipe's `setup` hands the loop for one run (the model comes from `model_config`)."""

  data: Any  # the training batch iterator (GrainIterator: get_state / set_state)
  eos_id: int
  info: dict[str, Any]  # extra run_info.json fields
  lines: list[str]  # extra start-up lines
  tokenizer: Any = None


class Pretraining:
  """The recipe of `experiments/pretrain.py`: all Params train with one AdamW; the checkpoint holds
  the whole train state; no evaluation."""

  name = "pretrain"

  def parse(self, config):
    return config_lib.parse(config)

  def tokenizer(self, cfg, workdir):
    return load_tokenizer_for(cfg.data, workdir)

  def model_config(self, cfg, ckpt, latest, mesh):
    return model_config(cfg, ckpt, latest, mesh)

  def setup(self, cfg, tokenizer, model_cfg) -> Setup:
    eos_id = resolve_eos(cfg.data, tokenizer, model_cfg.eos_token_id)
    check_vocab(cfg.data, tokenizer, model_cfg, eos_id)
    data = shard_data(cfg, lambda i, n, rows: make_pipeline(cfg.data, tokenizer, model_cfg, batch_size=rows,
                                                            eos_id=eos_id, shard_index=i, shard_count=n))
    entropy = unigram_entropy(cfg.data, tokenizer, eos_id, model_cfg.vocab_size, 1_000_000)
    info = {"documents": data.num_documents, "tokenizer": getattr(tokenizer, "path", "pre-tokenized"),
            "unigram_entropy": entropy}
    line = (f"data: {cfg.data.source} ({data.num_documents} documents in this process's {len(data.indices)} of "
            f"{cfg.run.data_shards} shards), tokenizer "
            f"{info['tokenizer']}, {cfg.run.global_batch_size * cfg.data.seq_len} tokens/step; unigram entropy "
            f"{entropy:.3f} nats/token")
    if cfg.data.source == "shapes":  # the best caption loss without looking at the images
      info["text_only_bound"] = text_only_bound(tokenizer)
      line += f"; text-only bound {info['text_only_bound']:.3f} nats/caption token"
    return Setup(data, eos_id, info, [line], tokenizer)

  def task(self, cfg, model_cfg):
    return task_for(model_cfg, cfg.data, cfg.loss)  # text LM, or VL (image grid from data.image_size)

  def optimizer(self, cfg, model_cfg):
    """(optax transformation, schedule): one AdamW, or per-group AdamWs with `groups` ratios."""
    if cfg.groups.is_default:
      return make_optimizer(cfg.optim, cfg.run.steps)
    return make_grouped_optimizer(cfg.optim, cfg.groups, cfg.run.steps)

  def wrt(self, cfg, model_cfg):
    """The filter of the trained variables (None: the train step's default, every Param)."""
    if cfg.groups.freeze_router or cfg.groups.freeze_vision:
      return trained_filter("full", cfg.groups)
    return None

  def reference_copy(self, cfg) -> bool:
    """Whether the train state holds a frozen copy of the initial model (`TrainState.reference`)."""
    return False

  def adapt(self, cfg, model_cfg) -> Callable | None:
    """A function applied to a freshly built model before the train state is made (e.g. adding LoRA
    adapters), or None."""
    return None

  def saved(self, cfg, state):
    """The part of the train state a checkpoint holds (all of it)."""
    return state

  def restore(self, cfg, state_or_none, restored):
    """The full train state from a restored `saved` part (with pretraining: the part is the whole)."""
    return restored

  def meta(self, cfg) -> dict[str, Any]:
    """Extra JSON saved with every checkpoint."""
    return {}

  def check_resume(self, cfg, meta: dict[str, Any], ckpt) -> None:
    """Refuse a checkpoint this run cannot continue (beyond the data stream check)."""

  def data_stream(self, cfg) -> dict[str, Any]:
    """The settings that define the sequence of batches (a saved data position is only valid for them)."""
    d = dataclasses.asdict(cfg.data)
    unused = () if d["source"] in VL_SOURCES else VL_FIELDS  # (text checkpoints predate the VL fields)
    for k in ("read_threads", "worker_processes", "bpe_train_documents", "bad_rows") + unused:  # (no effect on order)
      d.pop(k)
    return {**d, **batch_stream(cfg)}

  def evaluator(self, cfg, setup: Setup, graphdef, mesh):
    """f(state) -> dict of evaluation metrics (host floats), run every `evaluate_every(cfg)` steps and
    at the end; None for none."""
    return None

  def evaluate_every(self, cfg) -> int:
    return 0

  def finish(self, cfg, setup: Setup, graphdef, state, summary: dict[str, Any], writer) -> None:
    """After the last step (e.g. a sample generation); may add to `summary`."""


PRETRAINING = Pretraining()


def shard_data(cfg, make) -> ShardedBatches:
  """This process's part of every global batch, from its `run.data_shards` shards (`ernie_jax.data.shards`);
  make(shard_index, shard_count, rows) builds one shard's pipeline."""
  r = cfg.run
  return ShardedBatches(make, shards=r.data_shards, global_batch=r.global_batch_size, grad_accum=r.grad_accum_steps,
                        process_index=jax.process_index(), process_count=jax.process_count())


def batch_stream(cfg) -> dict[str, Any]:
  """The run fields of every recipe's `data_stream`: the rows per step and the shards they come from (not the
  process count: the batches do not depend on it)."""
  return {"global_batch_size": cfg.run.global_batch_size, "data_shards": cfg.run.data_shards}


def same_stream(saved: dict[str, Any], current: dict[str, Any]) -> bool:
  """Whether a checkpoint's data stream is this run's. Checkpoints from before data shards name the process
  count instead: one process read one shard."""
  saved = dict(saved)
  if "processes" in saved and "data_shards" not in saved:
    saved["data_shards"] = saved.pop("processes")
  return saved == current


def check_vocab(data_cfg, tokenizer, model_cfg, eos_id: int) -> None:
  """Tokenizer / data ids must fit the model's embedding (before anything compiles)."""
  v = model_cfg.vocab_size
  if tokenizer is not None and tokenizer.vocab_size > v:
    raise TokenizerError(f"tokenizer {tokenizer.path!r} has {tokenizer.vocab_size} ids but "
                         f"model.vocab_size is {v}: use a model vocabulary >= {tokenizer.vocab_size}")
  if not 0 <= eos_id < v:
    raise TokenizerError(f"EOS id {eos_id} is outside the model vocabulary [0, {v})")
  if getattr(data_cfg, "source", None) == "tokens":
    top = TokenWindows(expand_paths(data_cfg.paths), data_cfg.seq_len, eos_id, data_cfg.token_dtype).max_token_id()
    if top >= v:
      raise DataError(f"pre-tokenized data {data_cfg.paths!r} holds token id {top} >= model.vocab_size {v}")


def model_config(cfg, ckpt: Checkpointer, latest: int | None, mesh):
  """(model config, pretrained model or None): from the checkpoint being resumed, else from
  `init_from`, else from the config; runtime fields always come from the config."""
  runtime = {k: getattr(cfg.model, k) for k in RUNTIME_FIELDS}
  if latest is not None:
    saved_dict = ckpt.read_json(latest, "model_config")["model_config"]
    if config_lib.family_of(saved_dict) != cfg.run.model_family:
      raise CheckpointError(f"{ckpt.directory} holds a {config_lib.family_of(saved_dict)!r} model but the config "
                            f"has model_family={cfg.run.model_family!r}; use a new workdir")
    saved = config_lib.model_from_dict(saved_dict, cfg.run.model_family)
    if not cfg.run.init_from:
      arch = lambda c: {k: v for k, v in c.to_dict().items() if k not in RUNTIME_FIELDS}  # noqa: E731
      diff = {k: (v, arch(cfg.model)[k]) for k, v in arch(saved).items() if arch(cfg.model)[k] != v}
      if diff:
        hint = (" (to change precision, start a new workdir with --config.init_from="
                f"{ckpt.directory})") if set(diff) & set(FP8_FIELDS) else ""
        raise CheckpointError(f"{ckpt.directory} holds a model with other fields than config.model "
                              f"(checkpoint vs config: {diff}); use a new workdir{hint}")
    return saved.replace(**runtime), None
  if cfg.run.init_from:
    runtime.update({k: getattr(cfg.model, k) for k in FP8_FIELDS if hasattr(cfg.model, k)})  # VL: no FP8
    model = from_pretrained(cfg.run.init_from, mesh=mesh, **runtime)
    return model.config, model
  return cfg.model, None


# ------------------------------------------------------------------------------------------------
def train(config, recipe: Pretraining = PRETRAINING) -> dict[str, Any]:
  """Run (or resume) a training run; returns a summary dict. `config`: an ml-collections ConfigDict."""
  # 1. Config, tokenizer and data checks: everything that can fail does so before compiling.
  cfg = recipe.parse(config)
  started = distributed.initialize(cfg.distributed)  # (before anything touches a device)
  run = cfg.run
  workdir = os.path.abspath(run.workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.TrainConfigError("workdir", f"{workdir} exists and is not a directory")
  try:
    mesh = build_mesh(cfg.mesh)
  except ValueError as e:
    raise config_lib.TrainConfigError("mesh", str(e)) from None
  config_lib.check_batch_layout(cfg, mesh, jax.process_count())  # (before any process makes the workdir)
  created = not os.path.exists(workdir)
  distributed.barrier("workdir-checked")  # process 0 looked before any process made it
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  lock = WorkdirLock(workdir) if is_main else contextlib.nullcontext()  # only process 0 locks
  try:
    with lock:
      summary = _start(config, cfg, recipe, workdir, is_main, started, mesh)
  except BaseException:
    if created and is_main and not _has_progress(workdir):  # a failed start leaves no workdir it created
      shutil.rmtree(workdir, ignore_errors=True)
    raise
  if is_main:
    print("done: " + json.dumps({k: v for k, v in summary.items() if v is not None}), flush=True)
  return summary


def _has_progress(workdir: str) -> bool:
  """Whether a run wrote checkpoints or metrics into `workdir`."""
  ckpts = os.path.join(workdir, "checkpoints")
  return os.path.exists(os.path.join(workdir, "metrics.jsonl")) or (os.path.isdir(ckpts) and bool(os.listdir(ckpts)))


def _start(config, cfg, recipe, workdir, is_main, started: str, mesh) -> dict[str, Any]:
  """`train` with the workdir locked (the mesh built and checked): tokenizer, checkpoints, then `_train`."""
  run = cfg.run
  if run.compilation_cache_dir and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(run.compilation_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  tokenizer = recipe.tokenizer(cfg, workdir)

  # 2. Checkpoints (the mesh is built and checked in `train`); the model config (resume > init_from > config).
  with Checkpointer(workdir, every_steps=cfg.checkpoint.every_steps, keep=cfg.checkpoint.keep,
                    async_save=cfg.checkpoint.async_save) as ckpt:  # closed (saves finished) on any exit
    return _train(config, cfg, recipe, ckpt, mesh, tokenizer, workdir, is_main, started)


def _train(config, cfg, recipe, ckpt, mesh, tokenizer, workdir, is_main, started) -> dict[str, Any]:
  """Steps 2 (cont.) to 5 of `train`, with the checkpoint manager open."""
  run = cfg.run
  warn = lambda msg: print(msg, file=sys.stderr, flush=True) if is_main else None  # noqa: E731
  latest = ckpt.latest_intact_step(warn)  # damaged newer steps are moved aside (by process 0)
  model_cfg, pretrained = recipe.model_config(cfg, ckpt, latest, mesh)
  # before anything compiles: the flag it may set changes how ragged_dot lowers
  grouped_matmul = dispatch.use_gpu_grouped_matmul_kernel(model_cfg.moe_impl) if model_cfg.is_moe else None
  # peak FLOP/s for MFU (on CPU measured now, before data threads compete for the cores)
  peak, peak_source = flops_lib.peak_flops_per_device(run.peak_tflops_per_device)
  peak_total = peak * (1 if jax.default_backend() == "cpu" else jax.device_count())  # CPU devices share cores
  setup = recipe.setup(cfg, tokenizer, model_cfg)
  data = setup.data

  # 3. Train state: restored from the latest checkpoint, or created in its sharded layout.
  tx, schedule = recipe.optimizer(cfg, model_cfg)
  wrt, adapt, ref = recipe.wrt(cfg, model_cfg), recipe.adapt(cfg, model_cfg), recipe.reference_copy(cfg)
  graphdef, shardings, target = abstract_train_state(model_cfg, tx, run.seed, mesh, wrt=wrt, adapt=adapt,
                                                     reference=ref)
  if latest is not None:
    meta_json = ckpt.read_json(latest)
    saved_stream = meta_json["data_stream"]
    if not same_stream(saved_stream, recipe.data_stream(cfg)):
      raise CheckpointError(f"{ckpt.directory} was written with another data stream (its data position "
                            f"would not apply): checkpoint {saved_stream} vs config {recipe.data_stream(cfg)}; "
                            "use a new workdir or restore those settings")
    recipe.check_resume(cfg, meta_json, ckpt)
    base = None
    if pretrained is not None:  # the part a checkpoint does not hold (e.g. a frozen base under LoRA)
      graphdef, base = create_train_state(model_cfg, tx, seed=run.seed, mesh=mesh, pretrained=pretrained, wrt=wrt,
                                          adapt=adapt, reference=ref)
    del pretrained
    restored, meta = ckpt.restore_intact(latest, recipe.saved(cfg, target), warn)  # (falls back when damaged)
    state = recipe.restore(cfg, base, restored)
    data.set_state(meta["data"])
    start_step = latest = int(meta["step"])
    saved_steps = (meta.get("config") or {}).get("steps")
    if saved_steps is not None and int(saved_steps) != run.steps:
      warn(f"note: steps changed from {saved_steps} (checkpoint) to {run.steps}: the learning-rate schedule "
           f"(warmup / decay) now runs over {run.steps} steps, so the LR from step {start_step} on differs")
  else:
    graphdef, state = create_train_state(model_cfg, tx, seed=run.seed, mesh=mesh, pretrained=pretrained,
                                         wrt=wrt, adapt=adapt, reference=ref)
    del pretrained
    start_step = 0
  if is_main:
    truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), start_step)
  task = recipe.task(cfg, model_cfg)
  train_step = make_train_step(graphdef, shardings, None, schedule, grad_accum=run.grad_accum_steps,
                               task=task, wrt=wrt)
  batch_sh = batch_sharding(mesh)
  evaluate = recipe.evaluator(cfg, setup, graphdef, mesh)
  eval_every = recipe.evaluate_every(cfg)

  # 4. What this run is; figures for throughput and MFU.
  seq = cfg.data.seq_len
  tokens_per_step = run.global_batch_size * seq
  figures = flops_lib.figures(model_cfg, seq, run.global_batch_size, image_grid=getattr(task, "image_grid", None),
                              images_per_row=getattr(cfg.data, "images_per_row", 0))
  flops_per_step = figures.pop("flops_per_step")
  info = {
    **figures, "kind": recipe.name, "model_family": run.model_family, "tokens_per_step": tokens_per_step,
    "mesh": dict(mesh.shape), "devices": jax.device_count(), "processes": jax.process_count(),
    "data_shards": run.data_shards,
    "backend": jax.default_backend(), "peak_flops": peak_total, "peak_flops_source": peak_source,
    **setup.info, "resumed_from": latest, "init_from": run.init_from or None, "model_config": model_cfg.to_dict(),
  }
  # compile ahead of the first step and check that it fits in memory (before anything is written)
  def next_batch():
    batch = put_batch(next(data), run.grad_accum_steps, batch_sh)
    return batch, data.get_state()  # the data position after this batch

  batch, data_state = next_batch()
  with jax.set_mesh(mesh):
    train_step = train_step.lower(state, batch).compile()
  memory_line = check_step_fits(train_step)

  writer = MetricWriter(workdir, total_steps=run.steps, start_step=start_step,
                        tensorboard=cfg.metrics.tensorboard, progress_bar=cfg.metrics.progress_bar,
                        enabled=is_main)
  if is_main:
    with open(os.path.join(workdir, "run_info.json"), "w") as f:
      json.dump(info, f, indent=1)
  writer.print(f"model: {info['model_params'] / 1e6:.2f}M parameters ({info['active_params'] / 1e6:.2f}M "
               f"active matmul), {describe(model_cfg)}, dtype {model_cfg.dtype} "
               f"(params {model_cfg.param_dtype}), remat {model_cfg.remat}, "
               f"attention {attention_kernels.resolve(model_cfg.attention_impl)}")
  if grouped_matmul is not None:
    writer.print(f"MoE grouped matmul: {grouped_matmul}")
  for line in setup.lines:
    writer.print(line)
  writer.print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} devices, {started}; "
               f"workdir {workdir}; "
               + (f"resumed from step {latest}" if latest is not None else
                  f"initialised from {run.init_from}" if run.init_from else "fresh start"))

  def save(step: int, state, data_state, *, force: bool) -> bool:
    if not all_finite(state):
      raise NonFiniteError(f"step {step}: the train state holds non-finite values; not saving a checkpoint")
    data_position = merge_states(distributed.gather_json(data_state))  # every process's shards
    meta = {"step": step, "data": data_position, "data_stream": recipe.data_stream(cfg), **recipe.meta(cfg),
            "config": config.to_dict() if hasattr(config, "to_dict") else dict(config)}
    saved = ckpt.save(step, recipe.saved(cfg, state), meta, model_cfg, force=force)
    if saved and force:  # the last / preemption save: wait until it has committed
      report(ckpt.wait())
    return saved

  def report(committed: list[int]) -> None:  # only saves that committed are reported
    nonlocal last_saved
    for s in committed:
      writer.print(f"checkpoint: step {s} -> {ckpt.directory}")
      last_saved = s

  # 5. The loop. Metrics are averaged over each logging interval.
  step, skipped, last_saved, preempted = start_step, 0, latest, False
  interval = Interval()
  last_log_time, last_log_step, last_metrics, last_eval, first_eval = None, start_step, {}, {}, {}
  try:
    with jax.set_mesh(mesh), Preemption() as preemption:
      if evaluate is not None and start_step == 0:  # the base model's figures
        last_eval = evaluate(state)
        first_eval = {f"{k}_at_start": v for k, v in last_eval.items()}
        writer.write(0, last_eval, {})
      writer.print(memory_line)
      while step < run.steps:
        state, metrics = train_step(state, batch)  # dispatched asynchronously
        step += 1
        step_data_state = data_state  # saved with this step's checkpoint
        if step < run.steps:
          batch, data_state = next_batch()  # overlaps with the device computing the step
        host = jax.device_get(metrics)  # waits for the step
        writer.advance()

        if not host["params_finite"]:  # a finite update that overflowed: nothing to roll back to
          report(ckpt.wait())
          raise NonFiniteError(f"step {step}: the update made the parameters non-finite (loss "
                               f"{float(host['loss'])}, gradient norm {float(host['grad_norm'])}); stopping, the last "
                               f"checkpoint is step {last_saved}. Lower optim.lr or enable optim.clip_norm.")
        if not host["finite"]:  # the update was not applied: the state is unchanged
          skipped += 1
          msg = (f"step {step}: non-finite loss ({float(host['loss'])}) or gradient norm "
                 f"({float(host['grad_norm'])}) or parameters; the update was not applied")
          if run.nonfinite == "stop" or skipped >= run.max_skipped_steps:
            why = "" if run.nonfinite == "stop" else f" ({skipped} consecutive skipped steps)"
            report(ckpt.wait())
            raise NonFiniteError(msg + f". Stopping{why}; the last checkpoint is step {last_saved}. "
                                 "Lower optim.lr, enable optim.clip_norm, or set nonfinite='skip'.")
          writer.print("warning: " + msg + "; skipping it")
        else:
          skipped = 0
          interval.add(host)

        if step % cfg.metrics.log_every == 0 or step == run.steps:
          now = time.perf_counter()
          scalars, usage = interval.mean()
          scalars.update(lr=float(host["lr"]), tokens_seen=step * tokens_per_step, skipped=skipped)
          n = step - last_log_step
          if last_log_time is not None and n > 0:  # throughput excludes the first step (compilation)
            scalars.update(tokens_per_sec=n * tokens_per_step / (now - last_log_time),
                           step_time=(now - last_log_time) / n,
                           mfu=n * flops_per_step / (now - last_log_time) / peak_total)
          extra = {}
          for key, u in usage.items():  # "expert_usage" (text), "expert_usage_text" / "_vision" (VL)
            summary_usage = summarize_expert_usage(u)
            extra[key] = summary_usage.pop("expert_usage")
            scalars.update({k + key[len("expert_usage"):]: v for k, v in summary_usage.items()})
          if evaluate is not None and ((eval_every and step % eval_every == 0) or step == run.steps):
            last_eval = evaluate(state)
            scalars.update(last_eval)
          writer.write(step, scalars, extra)
          interval, last_metrics = Interval(), scalars
          last_log_time, last_log_step = time.perf_counter(), step
        elif last_log_time is None:
          last_log_time, last_log_step = time.perf_counter(), step

        report(ckpt.poll())  # background saves that committed (a failed one raises here, in one line)
        if distributed.any_process(preemption.requested):  # (all processes stop at the same step)
          writer.print(f"{preemption.signal_name or 'a signal on another process'}: saving a checkpoint at step "
                       f"{step} and exiting")
          save(step, state, step_data_state, force=True)
          preempted = True
          break
        if ckpt.should_save(step) or step == run.steps:
          save(step, state, step_data_state, force=step == run.steps)
    summary = {"step": step, "preempted": preempted, "resumed_from": latest, "last_checkpoint": last_saved,
               "loss": last_metrics.get("loss"), "lm_loss": last_metrics.get("lm_loss"),
               "tokens_per_sec": last_metrics.get("tokens_per_sec"), "mfu": last_metrics.get("mfu"),
               **{k: v for k, v in setup.info.items() if k in SUMMARY_BOUNDS}, **first_eval, **last_eval,
               "workdir": workdir}
    if not preempted:
      with jax.set_mesh(mesh):
        recipe.finish(cfg, setup, graphdef, state, summary, writer)
  finally:
    writer.close()
  return summary


def describe(c) -> str:
  """Layers, MoE and vision tower of a ModelConfig / VLConfig, for the start-up line."""
  if c.is_vl:
    moe = (f"MoE {c.moe_num_experts} text + {c.moe_num_experts} vision experts top-{c.moe_k}" if c.is_moe
           else "dense")
    return (f"VL: {c.num_hidden_layers} layers, {moe}, ViT {c.vision.depth} x {c.vision.hidden_size} "
            f"(patch {c.vision.patch_size})")
  moe = f"MoE {c.moe_num_experts} experts top-{c.moe_k}" if c.is_moe else "dense"
  return f"{c.num_hidden_layers} layers, {moe}, {c.num_mtp_layers} MTP"


class Interval:
  """Host-side means of the step metrics over a logging interval (applied steps only)."""

  def __init__(self):
    self.sums: dict[str, float] = {}
    self.usage: dict[str, np.ndarray] = {}  # expert usage arrays by metric name
    self.count = 0

  def add(self, host: dict[str, Any]) -> None:
    self.count += 1
    for k, v in host.items():
      if k in ("finite", "params_finite", "lr", "tokens"):
        continue
      v = np.asarray(v, np.float64)
      if k.startswith("expert_usage"):
        self.usage[k] = v if k not in self.usage else self.usage[k] + v
      elif k == "mtp_loss":
        self.sums["mtp_loss"] = self.sums.get("mtp_loss", 0.0) + float(v.mean())
        if v.size > 1:
          for d, x in enumerate(v):
            self.sums[f"mtp_loss_{d}"] = self.sums.get(f"mtp_loss_{d}", 0.0) + float(x)
      else:
        self.sums[k] = self.sums.get(k, 0.0) + float(v)

  def mean(self) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    n = max(self.count, 1)
    return {k: v / n for k, v in self.sums.items()}, self.usage
