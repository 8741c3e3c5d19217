"""Two processes x 4 CPU devices (`python -m ernie_jax.launch`, gloo collectives on localhost) against one process x
8 devices: pretraining of a micro MoE with expert parallelism over all 8 devices (all_to_all transport, so tokens
cross the process boundary) gives the same per-step losses; SIGTERM to one process saves one checkpoint at the same
step on both and exits cleanly; SIGKILL of one process stops the other instead of hanging; restarting resumes
exactly, also on another process count (the final per-step losses equal the uninterrupted one-process run's); an
error on every process is reported by every process."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import xla_flags
from tests.helpers import REPO_ROOT
from ernie_jax.train.metrics import read_jsonl

PRETRAIN = os.path.join(REPO_ROOT, "experiments", "pretrain.py")
TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.py")
STEPS = 24
OVERRIDES = {
  "model.hidden_size": 32, "model.num_hidden_layers": 2, "model.num_attention_heads": 2,
  "model.num_key_value_heads": 2, "model.head_dim": 16, "model.intermediate_size": 64,
  "model.moe_num_experts": 8, "model.moe_k": 2, "model.moe_intermediate_size": 32,
  "model.moe_transport": "all_to_all", "mesh.data": 1, "mesh.expert": 8,
  "data.seq_len": 32, "data.max_documents": 300, "global_batch_size": 8, "data_shards": 2,
  "steps": STEPS, "checkpoint.every_steps": 2, "metrics.log_every": 1, "metrics.progress_bar": False,
  "metrics.tensorboard": False, "optim.warmup_steps": 2, "compilation_cache_dir": "",
  "distributed.heartbeat_timeout": 10,
}


def _args(workdir):
  return [PRETRAIN, f"--config={TINY}", f"--config.workdir={workdir}"] + [
    f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def _env(devices):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  return env


def _launch(workdir, log, *extra, grace=5):
  """The launcher with 2 processes x 4 devices, output to the file `log` (so a full pipe never blocks it)."""
  out = open(log, "w")
  cmd = [sys.executable, "-m", "ernie_jax.launch", "--num_processes", "2", "--cpu_devices", "4", "--grace", str(grace),
         "--", *_args(workdir), *extra]
  return subprocess.Popen(cmd, env=_env(4), stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT), out


def _one_process(workdir, log):
  """One process x 8 devices (no launcher), output to `log`."""
  out = open(log, "w")
  return subprocess.Popen([sys.executable, *_args(workdir)], env=_env(8), stdout=out, stderr=subprocess.STDOUT,
                          cwd=REPO_ROOT), out


def _pids(log, timeout=60):
  deadline = time.time() + timeout
  while time.time() < deadline:
    found = dict(re.findall(r"\[launch\] process (\d) of 2: pid (\d+)", open(log).read()))
    if len(found) == 2:
      return {int(k): int(v) for k, v in found.items()}
    time.sleep(0.05)
  raise AssertionError(f"no pids from the launcher:\n{open(log).read()}")


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def _wait_for_step(proc, workdir, log, step, timeout=240):
  deadline = time.time() + timeout
  path = os.path.join(workdir, "metrics.jsonl")
  while not (os.path.exists(path) and max(_losses(workdir), default=0) >= step):
    assert proc.poll() is None, f"the run ended early:\n{open(log).read()}"
    assert time.time() < deadline, f"the run is too slow:\n{open(log).read()}"
    time.sleep(0.02)


def _finish(proc, out, log, timeout=240):
  try:
    code = proc.wait(timeout=timeout)
  finally:
    out.close()
  return code, open(log).read()


@pytest.mark.slow
def test_two_processes_match_one_and_survive_sigterm_and_sigkill(tmp_path):
  # the reference: one process x 8 devices, straight through
  ref_dir = tmp_path / "one"
  run = subprocess.run([sys.executable, *_args(ref_dir)], env=_env(8), capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr
  ref = _losses(ref_dir)
  assert sorted(ref) == list(range(1, STEPS + 1))

  work, log = tmp_path / "two", str(tmp_path / "launch.log")
  # 1. SIGTERM to process 1 (not process 0, which writes the metrics): one checkpoint at the same step, clean exit
  proc, out = _launch(work, log)
  pids = _pids(log)
  _wait_for_step(proc, work, log, 2)
  os.kill(pids[1], signal.SIGTERM)
  code, text = _finish(proc, out, log)
  assert code == 0, text
  saved = re.search(r"\[p0\] a signal on another process: saving a checkpoint at step (\d+) and exiting", text)
  assert saved, text
  stop = int(saved.group(1))
  assert 2 <= stop < STEPS and '"preempted": true' in text and "[launch] done: status 0" in text
  assert os.path.isdir(work / "checkpoints" / str(stop))

  # 2. resume on ONE process x 8 devices (another process count: the data position holds both shards); SIGTERM
  proc, out = _one_process(work, log)
  _wait_for_step(proc, work, log, stop + 2)
  proc.send_signal(signal.SIGTERM)
  code, text = _finish(proc, out, log)
  assert code == 0 and f"resumed from step {stop}" in text, text
  stop = int(re.search(r"SIGTERM: saving a checkpoint at step (\d+) and exiting", text).group(1))
  assert stop < STEPS - 4, text

  # 3. resume on two processes again, then SIGKILL process 1 mid-run: process 0 must stop by itself (it misses the
  # heartbeats for distributed.heartbeat_timeout = 10 s) instead of hanging in its next collective; the launcher
  # would only kill it after 90 s
  proc, out = _launch(work, log, grace=90)
  pids = _pids(log)
  _wait_for_step(proc, work, log, stop + 3)
  killed_at = time.time()
  os.kill(pids[1], signal.SIGKILL)
  code, text = _finish(proc, out, log, timeout=150)
  assert f"resumed from step {stop}" in text, text
  assert code != 0 and "[launch] process 1 exited with status 137" in text, text
  survivor = re.search(r"\[launch\] process 0 exited with status (\d+)", text)
  assert survivor and int(survivor.group(1)) not in (0, 137), text  # an error of its own, not the launcher's kill
  assert time.time() - killed_at < 60, f"process 0 did not stop by itself (before the launcher's 90 s):\n{text}"
  assert max(_losses(work)) < STEPS, "the kill came after the end of the run"

  # 4. restart both: the run resumes from its last committed checkpoint and finishes
  proc, out = _launch(work, log)
  code, text = _finish(proc, out, log)
  assert code == 0, text
  assert re.search(r"resumed from step (\d+)", text), text
  got = _losses(work)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [ref[s] for s in range(1, STEPS + 1)],
                             rtol=2e-6)


def test_an_error_on_every_process_is_reported_by_each(tmp_path):
  log = str(tmp_path / "launch.log")
  proc, out = _launch(tmp_path / "run", log, "--config.data_shards=1")
  code, text = _finish(proc, out, log, timeout=120)
  assert code == 1, text
  for i in range(2):
    assert (f"[p{i}] [process {i}] error: config field 'data_shards': 1 is not a multiple of the 2 processes"
            in text), text
  assert not os.path.exists(tmp_path / "run"), "a failed start left its workdir behind"


FINETUNE = {"data_shards": 2, "steps": 2, "finetune.eval_every": 2, "finetune.eval_batches": 2,
            "metrics.progress_bar": False, "metrics.tensorboard": False, "compilation_cache_dir": "",
            "model.num_hidden_layers": 2}


@pytest.mark.slow
@pytest.mark.parametrize("script, config, extra", [
  ("sft.py", "sft_tiny.py", {"finetune.sample_tokens": 24}),
  ("dpo.py", "dpo_tiny.py", {"dpo.reference": "precomputed"}),
])
def test_fine_tuning_on_two_processes_matches_one(tmp_path, script, config, extra):
  """SFT (held-out evaluation, the sample answer) and DPO (reference log-probs computed once, evaluation) on
  2 processes x 4 devices: the same figures as 1 process x 8 devices (every held-out row counted once)."""
  def args(workdir):
    over = {**FINETUNE, **extra}
    return [os.path.join(REPO_ROOT, "experiments", script),
            f"--config={os.path.join(REPO_ROOT, 'experiments', 'configs', config)}",
            f"--config.workdir={workdir}"] + [f"--config.{k}={v}" for k, v in over.items()]

  one = subprocess.run([sys.executable, *args(tmp_path / "one")], env=_env(8), capture_output=True, text=True,
                       timeout=300)
  assert one.returncode == 0, one.stdout + one.stderr
  two = subprocess.run([sys.executable, "-m", "ernie_jax.launch", "--num_processes", "2", "--cpu_devices", "4", "--",
                        *args(tmp_path / "two")], env=_env(4), capture_output=True, text=True, timeout=300,
                       cwd=REPO_ROOT)
  assert two.returncode == 0, two.stdout + two.stderr
  rows = {d: read_jsonl(os.path.join(tmp_path, d, "metrics.jsonl")) for d in ("one", "two")}
  assert [r["step"] for r in rows["one"]] == [r["step"] for r in rows["two"]] == [0, 2]
  for a, b in zip(rows["one"], rows["two"]):
    evals = [k for k in a if k.startswith("eval_")]
    assert {"eval_loss"} <= set(evals) and set(evals) == {k for k in b if k.startswith("eval_")}
    for k in evals + ([] if a["step"] == 0 else ["loss"]):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)  # (rewards: differences of log-probs)
  if script == "sft.py":
    sample = lambda text: re.search(r"^(?:\[p0\] )?sample: (.*)$", text, re.M)  # noqa: E731
    assert sample(one.stdout) and sample(two.stdout), two.stdout
    assert sample(two.stdout).group(1) == sample(one.stdout).group(1)
  else:
    ref = {d: np.load(os.path.join(tmp_path, d, "reference_logps.npz")) for d in ("one", "two")}
    for split in ("train", "heldout"):
      np.testing.assert_allclose(ref["two"][split], ref["one"][split], rtol=1e-6)
