"""Fault injection for training runs (issue 14): the workdir lock (two runs on one workdir), Ctrl-C saves
and exits cleanly, a damaged latest checkpoint falls back to the newest intact one, a failed start leaves
no workdir behind, a missing --config / typo'd field / missing config file is one line, --help lists
the config fields, changing `steps` on resume is reported."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.train import config as config_lib
from ernie_jax.train import workdir as workdir_lib
from ernie_jax.train.checkpoint import Checkpointer
from ernie_jax.train.optimizer import make_optimizer
from ernie_jax.train.step import create_train_state
from ernie_jax.train.workdir import WorkdirLock, WorkdirLockedError
from tests.train.test_pretrain import MICRO, PRETRAIN, _config, _env, _last_step, _start_and_wait, pretrain


# ---------------------------------------------------------------------------------------------------- lock

def test_second_run_on_a_locked_workdir_is_refused_before_compiling(tmp_path, xla_cache):
  cfg = _config(tmp_path, xla_cache, **MICRO, steps=1, **{"checkpoint.every_steps": 0})
  with WorkdirLock(str(tmp_path)):
    body = json.load(open(tmp_path / ".lock"))
    assert body["pid"] == os.getpid() and body["host"] == socket.gethostname()
    with pytest.raises(WorkdirLockedError, match=rf"in use by another run: pid {os.getpid()} on host "
                                                 rf"{socket.gethostname()} .*use another --config.workdir") as e:
      pretrain.train(cfg)
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "checkpoints")  # refused before anything else
  summary = pretrain.train(cfg)  # released: the run proceeds
  assert summary["step"] == 1 and summary["last_checkpoint"] == 1


def test_lock_fallback_without_flock_detects_stale_locks(tmp_path, monkeypatch):
  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(workdir_lib.fcntl, "flock", no_flock)
  path = tmp_path / ".lock"
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  path.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "x"}))
  with WorkdirLock(str(tmp_path)):  # the holder is gone: stale, taken over
    assert json.load(open(path))["pid"] == os.getpid()
    with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
      WorkdirLock(str(tmp_path)).acquire()
  assert not path.exists()  # removed on release
  path.write_text(json.dumps({"pid": 1, "host": "another-host", "started": "x"}))
  with pytest.raises(WorkdirLockedError, match="pid 1 on host another-host"):
    WorkdirLock(str(tmp_path)).acquire()


def test_failed_start_leaves_no_workdir(tmp_path, xla_cache):
  new = tmp_path / "new"
  with pytest.raises(pretrain.DataError, match="no file matches"):
    pretrain.train(_config(new, xla_cache, **{"data.source": "text", "data.paths": str(tmp_path / "nope*.txt")}))
  assert not new.exists()
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(config_lib.TrainConfigError, match="exists and is not a directory"):
    pretrain.train(_config(afile, xla_cache))


def test_missing_config_is_one_line():
  out = subprocess.run([sys.executable, PRETRAIN], env=_env(), capture_output=True, text=True)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "--config is required" in out.stderr


@pytest.mark.parametrize("args, expect", [
  (["--config=experiments/configs/tiny.py", "--config.optim.lrr=1"], 'Did you mean "lr"'),
  (["--config=experiments/configs/nope.py"], "No such file or directory"),
  (["--config=experiments/configs/tiny.py", "--config.steps=abc"], "--config.steps=abc"),
])
def test_bad_config_flags_are_one_line(args, expect):
  """A typo'd field, a missing config file or a bad value: one line naming it (no 50-line trace)."""
  out = subprocess.run([sys.executable, PRETRAIN, *args], env=_env(), capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(PRETRAIN)))
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.strip().splitlines() == [out.stderr.strip()] and expect in out.stderr, out.stderr


def test_help_lists_the_config_fields():
  out = subprocess.run([sys.executable, PRETRAIN, "--help"], env=_env(), capture_output=True, text=True)
  assert out.returncode == 0
  for field in ("--config.optim.lr=", "--config.data.seq_len=", "--config.mesh.expert=", "--config.steps="):
    assert field in out.stdout, field


# ---------------------------------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_saves_and_exits_cleanly(tmp_path, xla_cache):
  cmd = [sys.executable, PRETRAIN, f"--config={pretrain.__file__.replace('pretrain.py', 'configs/tiny.py')}",
         f"--config.workdir={tmp_path}", f"--config.compilation_cache_dir={xla_cache}"]
  cmd += [f"--config.{k}={v}" for k, v in {**MICRO, "steps": 100000, "checkpoint.every_steps": 0}.items()]
  proc = _start_and_wait(cmd, tmp_path, until_step=2)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "SIGINT: saving a checkpoint" in out and "Traceback" not in out and "KeyboardInterrupt" not in out
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert saved == [_last_step(tmp_path)], (saved, out)


def test_second_ctrl_c_aborts_at_once(monkeypatch):
  exits = []
  from ernie_jax.train import trainer

  monkeypatch.setattr(trainer.os, "_exit", lambda code: exits.append(code))
  before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
  with pretrain.Preemption() as p:
    os.kill(os.getpid(), signal.SIGINT)  # handled, no KeyboardInterrupt
    assert p.requested and p.signal_name == "SIGINT" and exits == []
    os.kill(os.getpid(), signal.SIGINT)
    assert exits == [130]
  assert signal.getsignal(signal.SIGINT) is before  # the handler from before the context is back


# ---------------------------------------------------------------------------------------------------- damage

@pytest.fixture(scope="module")
def tiny_state(xla_cache, mesh, tmp_path_factory):
  cfg = config_lib.parse(_config(tmp_path_factory.mktemp("unused"), xla_cache, **MICRO))
  tx, _ = make_optimizer(cfg.optim, 10)
  _, state = create_train_state(cfg.model, tx, seed=0, mesh=mesh)
  return cfg.model, state


def _save_steps(workdir, tiny_state, steps):
  model_cfg, state = tiny_state
  with Checkpointer(str(workdir), every_steps=1, keep=10, async_save=False) as ck:
    for s in steps:
      ck.save(s, state, {"step": s, "data": {"pos": s}}, model_cfg, force=True)


def _garble_arrays(step_dir):
  """Truncate every array data file of the step's `state` item."""
  n = 0
  for root, _, files in os.walk(step_dir / "state"):
    for f in files:
      p = os.path.join(root, f)
      if os.sep + "d" + os.sep in p + os.sep or os.path.basename(root) == "d":
        with open(p, "r+b") as fh:
          fh.truncate(max(os.path.getsize(p) // 2, 1))
        n += 1
  assert n, list(os.walk(step_dir / "state"))


def _target(state):
  import jax
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_state):
  _save_steps(tmp_path, tiny_state, [1, 2])
  _garble_arrays(tmp_path / "checkpoints" / "2")
  warnings = []
  with Checkpointer(str(tmp_path), every_steps=1, keep=10) as ck:
    latest = ck.latest_intact_step(warnings.append)
    assert latest == 2 and warnings == []  # structure and JSON items are fine
    state, meta = ck.restore_intact(latest, _target(tiny_state[1]), warnings.append)
    assert meta["step"] == 1 and ck.all_steps() == [1]
  assert len(warnings) == 1 and "checkpoint step 2 is damaged" in warnings[0] and "\n" not in warnings[0]
  aside = [d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("2.damaged-")]
  assert len(aside) == 1 and aside[0] in warnings[0]  # kept, not deleted
  import jax
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(tiny_state[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_what_a_kill_during_a_save_leaves_is_ignored_and_the_last_commit_restores(tmp_path, tiny_state):
  """A process killed while orbax writes step 3 leaves `3.orbax-checkpoint-tmp-<ts>` (here: a copy of a
  committed step with its arrays cut short, as a half-written save looks). The next run sees steps 1
  and 2 only, restores step 2 exactly, and the next save of step 3 commits normally."""
  import shutil

  import jax

  _save_steps(tmp_path, tiny_state, [1, 2])
  ckpts = tmp_path / "checkpoints"
  partial = ckpts / "3.orbax-checkpoint-tmp-1764672000"
  shutil.copytree(ckpts / "2", partial)
  (partial / "commit_success.txt").unlink(missing_ok=True)
  _garble_arrays(partial)
  warnings = []
  model_cfg, state0 = tiny_state
  with Checkpointer(str(tmp_path), every_steps=1, keep=10, async_save=True) as ck:
    assert ck.all_steps() == [1, 2] and ck.latest_intact_step(warnings.append) == 2
    state, meta = ck.restore_intact(2, _target(state0), warnings.append)
    assert meta["step"] == 2 and warnings == []
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state0)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ck.save(3, state, {"step": 3, "data": {"pos": 3}}, model_cfg, force=True)
    assert ck.wait() == [3] and ck.all_steps() == [1, 2, 3]


@pytest.mark.parametrize("item", ["state", "meta"])
def test_latest_checkpoint_missing_an_item_is_set_aside(tmp_path, tiny_state, item):
  import shutil
  _save_steps(tmp_path, tiny_state, [1, 2])
  shutil.rmtree(tmp_path / "checkpoints" / "2" / item)
  warnings = []
  with Checkpointer(str(tmp_path), every_steps=1, keep=10) as ck:
    assert ck.latest_intact_step(warnings.append) == 1
    _, meta = ck.restore_intact(1, _target(tiny_state[1]), warnings.append)
    assert meta["step"] == 1
  assert len(warnings) == 1 and f"step 2 is damaged (missing {item})" in warnings[0]


def test_no_intact_checkpoint_is_one_line_error(tmp_path, tiny_state):
  _save_steps(tmp_path, tiny_state, [1])
  _garble_arrays(tmp_path / "checkpoints" / "1")
  with Checkpointer(str(tmp_path), every_steps=1, keep=10) as ck:
    with pytest.raises(CheckpointError, match="cannot restore .*/1") as e:
      ck.restore_intact(1, _target(tiny_state[1]))
  assert "\n" not in str(e.value)
  assert os.path.isdir(tmp_path / "checkpoints" / "1")  # nothing moved when nothing restores


def test_resume_after_damaged_latest_checkpoint(tmp_path, xla_cache, capfd):
  """End to end: the run resumes from the newest intact step, with one warning line naming the damaged one."""
  over = {**MICRO, "checkpoint.every_steps": 1, "checkpoint.keep": 5}
  pretrain.train(_config(tmp_path, xla_cache, **over, steps=2))
  _garble_arrays(tmp_path / "checkpoints" / "2")
  capfd.readouterr()
  summary = pretrain.train(_config(tmp_path, xla_cache, **over, steps=3))
  err = capfd.readouterr().err
  assert summary["resumed_from"] == 1 and summary["step"] == 3, summary
  assert "warning: checkpoint step 2 is damaged" in err and "Traceback" not in err
  assert "note: steps changed from 2 (checkpoint) to 3" in err  # the LR schedule changes: say so
  assert any(d.startswith("2.damaged-") for d in os.listdir(tmp_path / "checkpoints"))


# --- a full disk during an asynchronous save --------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
  """A 256 KiB tmpfs (needs root and mount; skipped with the reason otherwise)."""
  path = tmp_path / "disk"
  path.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)], capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or proc.returncode}")
  yield path
  subprocess.run(["umount", str(path)], check=False)


def test_disk_full_during_async_save_is_reported_once_in_one_line(tiny_disk, capfd):
  import time

  from ernie_jax.config import ModelConfig
  from ernie_jax.interop.safetensors_io import CheckpointError
  from ernie_jax.train.checkpoint import Checkpointer
  from ernie_jax.train.optimizer import OptimConfig, make_optimizer
  from ernie_jax.train.step import build_mesh, create_train_state

  cfg = ModelConfig.tiny_dense()
  _, state = create_train_state(cfg, make_optimizer(OptimConfig(), 10)[0], seed=0, mesh=build_mesh())
  ckpt = Checkpointer(str(tiny_disk / "run"), every_steps=1, keep=3, async_save=True)
  assert ckpt.save(1, state, {"step": 1}, cfg)  # started in the background: not reported as saved
  with pytest.raises(CheckpointError) as e:
    for _ in range(600):  # what the loop does after every step
      assert ckpt.poll() == [], "a save that cannot have committed was reported"
      time.sleep(0.05)
  msg = str(e.value)
  assert "\n" not in msg and "step 1 was NOT saved" in msg and str(tiny_disk) in msg, msg
  assert "No space left on device" in msg, msg
  ckpt.close()
  assert "Traceback" not in capfd.readouterr().err  # orbax's thread traceback is not printed
  assert 1 not in ckpt.all_steps()  # nothing committed


# --- a step that cannot fit in memory ------------------------------------------------------------
def test_a_step_that_does_not_fit_is_refused_before_it_runs(tmp_path, xla_cache, monkeypatch):
  from ernie_jax.train import memory

  monkeypatch.setattr(memory, "_host_available", lambda: 1 << 20)  # pretend 1 MiB of free RAM
  with pytest.raises(config_lib.TrainConfigError, match=r"global_batch_size.*the step needs ~.* GiB.*"
                                                        r"available host memory: 0\.00 GiB\. It does not fit") as e:
    pretrain.train(_config(tmp_path / "run", xla_cache, **MICRO, steps=2))
  assert "\n" not in str(e.value) and "grad_accum_steps" in str(e.value)
  assert not (tmp_path / "run").exists()  # refused before the first step: no workdir left behind
