"""Training checkpoints with Orbax: `<workdir>/checkpoints/<step>/` holds

  state         the model's variables (Params + Buffers such as the MoE correction bias) as a
                nested dict keyed by the names of `nnx.state(model)` (list indices as strings);
  model_config  JSON {"format": "ernie_jax", "version": 1, "model_config": cfg.to_dict(), "source": ...}
                plus "architecture": "ernie4_5_vl_moe" for a VL model;
                these two items are the layout of `ernie_jax.interop.orbax_io` (item names, format,
                version and architecture tag come from there), so
                `ernie_jax.from_pretrained("<workdir>/checkpoints")` loads the latest trained model;
  train         the rest of the train state: optimizer moments and step count, RNG key;
  meta          JSON: step, data iterator position, the full training config.

Saves are asynchronous (the device->host copy blocks, the write runs in the background) and every
step directory is committed atomically, so a run killed mid-save resumes from the previous one. A save
is reported only once it has committed (`poll` / `wait` return the committed steps); a background
save that fails (e.g. the disk is full) raises `CheckpointError` at the next `poll` in one line naming
the step, the directory and the cause (orbax's own traceback of the failed write thread is dropped).
Restoring takes target shardings, so a checkpoint loads onto any mesh. A checkpoint that does not fit
this run's train state raises `CheckpointError` (`ernie_jax.interop.safetensors_io`, the one checkpoint
error of the package).

Damaged checkpoints (an item directory missing, an unreadable JSON item, a truncated or garbled array
file): `latest_intact_step` skips the steps whose structure or JSON items are damaged and
`restore_intact` falls back from a step whose arrays do not read to the previous one; each damaged
step directory is moved aside to `<step>.damaged-<time>` (kept, not deleted) and reported in one
line; when no step is intact the error is one line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ernie_jax.config import ModelConfig
from ernie_jax.interop.orbax_io import CONFIG_ITEM, STATE_ITEM as MODEL_ITEM, info_for
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.config import VLConfig


def model_info(model_config: ModelConfig | VLConfig, step: int) -> dict[str, Any]:
  """The `model_config` item: what `ernie_jax.interop.orbax_io.read_info` reads back."""
  return info_for(model_config, {"source": {"kind": "pretrain", "step": step}})


def _str_keys(tree):
  return {str(k): _str_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _like(tree, reference):
  """`tree` with the keys of `reference` (undo _str_keys)."""
  if not isinstance(reference, dict):
    return tree
  return {k: _like(tree[str(k)], v) for k, v in reference.items()}


ITEMS = (MODEL_ITEM, CONFIG_ITEM, "train", "meta")


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:300]}" + ("..." if len(text) > 300 else "")


def _os_reason(e: BaseException) -> str:
  """"<OS error text> (" + ... for a tensorstore write error that carries one (e.g. "No space left on
  device"), so the cause leads the one-line message; "" otherwise."""
  m = re.search(r":\s*([^:\[\]]+?)\s*\[os_error_code", str(e))
  return f"{m.group(1)} -- " if m else ""


def _quiet_closed_loop_errors() -> None:
  """After a restore fails on damaged data, tensorstore still completes the other reads and calls back
  into orbax's closed asyncio loop, which prints one "Event loop is closed" traceback per array; those
  are noise (the failure is reported in one line), so drop exactly them."""
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    if isinstance(e, ImportError) and "sys.meta_path is None" in str(e):  # orbax writes cut off at exit
      return
    previous(unraisable)

  hook._drops_closed_loop = True
  sys.unraisablehook = hook


class _DropOrbaxThreadTracebacks(logging.Filter):
  """Orbax logs a failed background save as ERRORs with long tracebacks (write thread, commit thread,
  finalize thread); the Checkpointer reports the same failure in one line, so those records are dropped."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and record.levelno >= logging.ERROR and "orbax" in record.pathname)


_ORBAX_FILTER = _DropOrbaxThreadTracebacks()


def _split(pure: dict) -> tuple[dict, dict]:
  return _str_keys(pure["model"]), {k: v for k, v in pure.items() if k != "model"}


class Checkpointer:
  def __init__(self, workdir: str, *, every_steps: int, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
      save_interval_steps=max(every_steps, 1))
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.pending: list[int] = []  # saved steps not yet known to be committed
    logging.getLogger("absl").addFilter(_ORBAX_FILTER)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state, meta: dict[str, Any], model_config: ModelConfig | VLConfig, *,
           force: bool = False) -> bool:
    """Start saving the train state (an nnx.State of TrainState) of a `model_config` model at `step`;
    returns whether a save started (it is committed when `poll` / `wait` return the step)."""
    model, train = _split(nnx.to_pure_dict(state))
    args = ocp.args.Composite(**{MODEL_ITEM: ocp.args.StandardSave(model),
                                 CONFIG_ITEM: ocp.args.JsonSave(model_info(model_config, step)),
                                 "train": ocp.args.StandardSave(train), "meta": ocp.args.JsonSave(meta)})
    try:
      started = self.manager.save(step, args=args, force=force)
    except Exception as e:  # noqa: BLE001 -- a failure of an earlier background save surfaces here too
      raise self._failed(self.pending + [step], e) from e
    if started:
      self.pending.append(step)
    return started

  def _failed(self, steps: list[int], e: BaseException) -> CheckpointError:
    self.pending = []
    _quiet_closed_loop_errors()
    cause = e.__cause__ or e
    where = f"{self.directory}/{steps[-1]}" if len(steps) == 1 else f"{self.directory} (steps {steps})"
    return CheckpointError(f"checkpoint step {steps[-1]} was NOT saved to {where}: {_os_reason(cause)}"
                           f"{_one_line(cause)}")

  def poll(self) -> list[int]:
    """The steps whose saves have committed since the last call (without waiting for one in
    progress); a failed save raises CheckpointError (one line: step, directory, cause)."""
    if not self.pending or self.manager.is_saving_in_progress():
      return []
    return self.wait()

  def wait(self) -> list[int]:
    """Wait for the saves in progress; the steps committed since the last call, or CheckpointError."""
    steps, self.pending = self.pending, []
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 -- orbax / tensorstore errors of any type
      raise self._failed(steps, e) from e
    return steps

  def restore(self, step: int, target) -> tuple[Any, dict[str, Any]]:
    """Restore into `target` (an nnx.State of ShapeDtypeStructs with shardings); returns
    (state with arrays placed per the target shardings, meta)."""
    pure = nnx.to_pure_dict(target)
    t_model, t_train = _split(pure)
    args = ocp.args.Composite(**{MODEL_ITEM: ocp.args.StandardRestore(t_model),
                                 "train": ocp.args.StandardRestore(t_train), "meta": ocp.args.JsonRestore()})
    try:
      out = self.manager.restore(step, args=args)
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"cannot restore {self.directory}/{step} into this run's train state "
                            f"(was it written with another model or optimizer config? use a new workdir): "
                            f"{_one_line(e)}") from e
    state = jax.tree.map(lambda x: x, target)  # a copy to fill
    nnx.replace_by_pure_dict(state, {"model": _like(out[MODEL_ITEM], pure["model"]), **out["train"]})
    return state, dict(out["meta"])

  def restore_model(self, step: int, target) -> Any:
    """Only the model variables of a checkpoint, into `target` (an nnx.State of the model, or of the
    part of it a checkpoint holds, with ShapeDtypeStructs or arrays as values); returns a filled copy."""
    pure = _str_keys(nnx.to_pure_dict(target))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            pure)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.StandardRestore(abstract)}))
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"cannot restore the model of {self.directory}/{step}: {_one_line(e)}") from e
    state = jax.tree.map(lambda x: x, target)
    nnx.replace_by_pure_dict(state, _like(out[MODEL_ITEM], nnx.to_pure_dict(target)))
    return state

  def read_json(self, step: int, item: str = "meta") -> dict[str, Any]:
    """A JSON item of a checkpoint ("meta" or "model_config") without restoring arrays."""
    out = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
    return dict(out[item])

  def damage(self, step: int) -> str | None:
    """Why the step directory is damaged (an item missing, a JSON item unreadable), or None."""
    path = os.path.join(self.directory, str(step))
    missing = [item for item in ITEMS if not os.path.isdir(os.path.join(path, item))]
    if missing:
      return f"missing {', '.join(missing)}"
    for item in ("meta", CONFIG_ITEM):
      try:
        self.read_json(step, item)
      except Exception as e:  # orbax / tensorstore / json errors alike
        return f"{item} unreadable ({_one_line(e)})"
    return None

  def set_aside(self, step: int, why: str, warn: Callable[[str], None] = print) -> str:
    """Move a damaged step directory aside (`<step>.damaged-<time>`, kept) and report it in one line."""
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.damaged-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    if jax.process_index() == 0:  # (with several processes on a shared filesystem, process 0 moves it)
      os.rename(src, dst)
    self.manager.reload()
    warn(f"warning: checkpoint step {step} is damaged ({why}); moved it to {dst} and using the previous one")
    return dst

  def latest_intact_step(self, warn: Callable[[str], None] = print) -> int | None:
    """The newest step whose items are all present and whose JSON items read; damaged newer steps are
    moved aside."""
    for step in sorted(self.all_steps(), reverse=True):
      why = self.damage(step)
      if why is None:
        return step
      self.set_aside(step, why, warn)
    return None

  def restore_intact(self, step: int, target, warn: Callable[[str], None] = print) -> tuple[Any, dict[str, Any]]:
    """`restore(step, target)`, falling back to earlier steps when the arrays of a step do not read
    (moving it aside). A step that fails like every earlier one is not damaged but does not fit this
    run: its error is raised (one line) and nothing is moved."""
    steps = [s for s in sorted(self.all_steps(), reverse=True) if s <= step]
    errors = []
    for s in steps:
      try:
        out = self.restore(s, target)
      except Exception as e:  # noqa: BLE001 -- damaged data raises orbax / tensorstore errors of any type
        _quiet_closed_loop_errors()
        errors.append((s, e.__cause__ or e))
        continue
      for bad, e in errors:  # a later step failed where this one restores: it is damaged
        self.set_aside(bad, _one_line(e), warn)
      return out
    bad, e = errors[0]
    raise CheckpointError(f"cannot restore {self.directory}/{bad}: it is damaged, or it does not fit this run's "
                          f"train state (another model or optimizer config?), and no earlier step restores: "
                          f"{_one_line(e)}; move it aside or use a new workdir") from e

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    try:
      self.close()
    except CheckpointError:
      if exc_type is None:  # (do not hide the error that is already propagating)
        raise

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()
