"""End-to-end pretraining (experiments/pretrain.py): the tiny config learns; SIGKILL + restart gives
the same per-step losses; SIGTERM saves and exits cleanly; resume onto another mesh; non-finite
handling; errors before compilation; init_from a converted model checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import xla_flags
from tests.helpers import REPO_ROOT, run_config

ROOT = REPO_ROOT
PRETRAIN = os.path.join(ROOT, "experiments", "pretrain.py")
TINY = os.path.join(ROOT, "experiments", "configs", "tiny.py")
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import pretrain  # noqa: E402
from configs import tiny  # noqa: E402

from ernie_jax.train.config import TrainConfigError  # noqa: E402
from ernie_jax.train.metrics import read_jsonl  # noqa: E402

# A micro MoE + MTP model (compiles and steps fast) for the fault-tolerance tests.
MICRO = {
  "model.hidden_size": 32, "model.num_hidden_layers": 2, "model.num_attention_heads": 2,
  "model.num_key_value_heads": 2, "model.head_dim": 16, "model.intermediate_size": 64,
  "model.moe_num_experts": 4, "model.moe_k": 2, "model.moe_intermediate_size": 32,
  "data.seq_len": 32, "data.max_documents": 300, "global_batch_size": 8, "metrics.log_every": 1,
  "metrics.progress_bar": False, "metrics.tensorboard": False, "optim.warmup_steps": 2,
}


def _config(workdir, xla_cache, **overrides):
  return run_config(tiny.get_config(), workdir, xla_cache, **overrides)


def _cli(workdir, xla_cache, overrides):
  args = [sys.executable, PRETRAIN, f"--config={TINY}", f"--config.workdir={workdir}",
          f"--config.compilation_cache_dir={xla_cache}"]
  return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def _env(devices=1):
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
              XLA_FLAGS=xla_flags(devices))


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def _last_step(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = [l for l in f.read().splitlines() if l.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0
  except FileNotFoundError:
    return 0


def _start_and_wait(cmd, workdir, until_step, timeout=240):
  proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + timeout
  while _last_step(workdir) < until_step:
    assert proc.poll() is None, f"run ended early:\n{proc.stdout.read()}"
    assert time.time() < deadline, "run too slow"
    time.sleep(0.02)
  return proc


@pytest.mark.slow
def test_tiny_config_learns_below_unigram_entropy(tmp_path, xla_cache):
  """The README's tiny config (MoE + MTP, bytes of the Python stdlib, one CPU device): after 100 of
  its steps the LM loss is far below the unigram entropy of the data (the best context-free model)."""
  subprocess.run(_cli(tmp_path, xla_cache, {"steps": 100, "metrics.log_every": 20}), env=_env(),
                 check=True, capture_output=True)
  records = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  h = json.load(open(tmp_path / "run_info.json"))["unigram_entropy"]
  assert 2.5 < h < 4.0
  assert records[0]["lm_loss"] > h  # starts at ~ln(vocab)
  assert records[-1]["lm_loss"] < 0.8 * h, (h, [r["lm_loss"] for r in records])
  assert {"loss", "lm_loss", "mtp_loss", "moe_aux_loss", "moe_z_loss", "grad_norm", "lr", "tokens_per_sec",
          "mfu", "expert_usage"} <= set(records[-1])
  assert os.listdir(os.path.join(tmp_path, "checkpoints")) and os.path.isdir(os.path.join(tmp_path, "tensorboard"))


def test_sigkill_and_restart_reproduces_every_step_loss(tmp_path, xla_cache):
  steps = 40
  overrides = {**MICRO, "steps": steps, "checkpoint.every_steps": 5}
  ref = tmp_path / "ref"
  subprocess.run(_cli(ref, xla_cache, overrides), env=_env(), check=True, capture_output=True)
  expected = _losses(ref)
  assert sorted(expected) == list(range(1, steps + 1))

  run = tmp_path / "killed"
  proc = _start_and_wait(_cli(run, xla_cache, overrides), run, until_step=17)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = _last_step(run)
  assert killed_at < steps, "the run finished before it could be killed"
  out = subprocess.run(_cli(run, xla_cache, overrides), env=_env(), check=True, capture_output=True, text=True)
  info = json.load(open(run / "run_info.json"))
  assert info["resumed_from"] is not None and 5 <= info["resumed_from"] <= killed_at, out.stdout
  assert _losses(run) == expected  # bit-identical, every step


def test_sigterm_saves_and_exits_cleanly(tmp_path, xla_cache):
  proc = _start_and_wait(_cli(tmp_path, xla_cache, {**MICRO, "steps": 100000, "checkpoint.every_steps": 0}),
                         tmp_path, until_step=3)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "SIGTERM: saving a checkpoint" in out
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert saved == [_last_step(tmp_path)], (saved, out)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_resume_on_a_different_mesh(tmp_path, xla_cache):
  """Save on data=8, resume on data=2 x fsdp=2 x tensor=2: parameters restore bit-exactly and the
  continued losses match an uninterrupted run."""
  over = {**MICRO, "steps": 6, "checkpoint.every_steps": 3, "checkpoint.keep": 5, "global_batch_size": 16}
  ref = tmp_path / "ref"
  pretrain.train(_config(ref, xla_cache, **over, **{"mesh.data": 8}))
  expected = _losses(ref)

  import shutil
  moved = tmp_path / "moved"
  shutil.copytree(ref, moved)
  shutil.rmtree(moved / "checkpoints" / "6")
  cfg = _config(moved, xla_cache, **over, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  summary = pretrain.train(cfg)
  assert summary["resumed_from"] == 3
  got = _losses(moved)
  np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [expected[s] for s in (4, 5, 6)], rtol=2e-5)

  # bit-exact restore of step 3 onto the new mesh (shardings from the new mesh)
  from ernie_jax.train import config as config_lib
  from ernie_jax.train.checkpoint import Checkpointer
  from ernie_jax.train.optimizer import make_optimizer
  from ernie_jax.train.step import abstract_train_state, build_mesh
  parsed = config_lib.parse(cfg)
  tx, _ = make_optimizer(parsed.optim, parsed.run.steps)
  arrays = {}
  for name, mesh_cfg in (("old", dict(data=8)), ("new", dict(data=2, fsdp=2, tensor=2))):
    mesh = build_mesh(mesh_cfg)
    _, _, target = abstract_train_state(parsed.model, tx, 0, mesh)
    ck = Checkpointer(str(moved), every_steps=0, keep=5)
    state, _ = ck.restore(3, target)
    ck.close()
    arrays[name] = jax.tree.leaves(state)
    if name == "new":
      q = state["model"]["groups"][0]["blocks"]["layers"][0]["attn"]["q"][...]
      assert q.sharding.spec[1] == "fsdp" and q.sharding.spec[2] == "tensor"
  for a, b in zip(arrays["old"], arrays["new"]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonfinite_loss_stops_without_checkpointing_nans(tmp_path, xla_cache):
  over = {**MICRO, "steps": 10, "checkpoint.every_steps": 1, "optim.lr": 1e30, "optim.clip_norm": 0.0,
          "optim.warmup_steps": 0, "optim.schedule": "constant"}
  with pytest.raises(pretrain.NonFiniteError, match=r"step 2: non-finite loss .* Stopping; the last checkpoint is step 1"):
    pretrain.train(_config(tmp_path / "stop", xla_cache, **over))
  assert sorted(os.listdir(tmp_path / "stop" / "checkpoints")) == ["1"]

  with pytest.raises(pretrain.NonFiniteError, match=r"3 consecutive skipped steps"):
    pretrain.train(_config(tmp_path / "skip", xla_cache, **over, nonfinite="skip", max_skipped_steps=3))
  # checkpoints written while skipping hold the last finite state
  import orbax.checkpoint as ocp
  for step in os.listdir(tmp_path / "skip" / "checkpoints"):
    restored = ocp.StandardCheckpointer().restore(tmp_path / "skip" / "checkpoints" / step / "state")
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored))


def test_errors_before_compilation(tmp_path, xla_cache):
  with pytest.raises(TrainConfigError, match="config field 'optim.lr': must be > 0"):
    pretrain.train(_config(tmp_path, xla_cache, **{"optim.lr": -1.0}))
  with pytest.raises(TrainConfigError, match="config field 'loss.lm_chunk': must be a finite number >= 0, got -4"):
    pretrain.train(_config(tmp_path, xla_cache, **{"loss.lm_chunk": -4}))
  with pytest.raises(TrainConfigError, match="config field 'model.moe_k'"):
    pretrain.train(_config(tmp_path, xla_cache, **{"model.moe_k": 9}))
  with pytest.raises(TrainConfigError, match="config field 'data.paths'"):
    pretrain.train(_config(tmp_path, xla_cache, **{"data.source": "jsonl"}))
  with pytest.raises(pretrain.DataError, match="no file matches"):
    pretrain.train(_config(tmp_path, xla_cache, **{"data.source": "text", "data.paths": str(tmp_path / "nope*.txt")}))
  with pytest.raises(pretrain.TokenizerError, match="has 259 ids but model.vocab_size is 256"):
    pretrain.train(_config(tmp_path, xla_cache, **{"model.vocab_size": 256}))
  bad = tmp_path / "big.npy"
  np.save(bad, np.array([1, 5, 400, 2, 7] * 200, np.int32))
  with pytest.raises(pretrain.DataError, match="token id 400 >= model.vocab_size 320"):
    pretrain.train(_config(tmp_path, xla_cache, **{"data.source": "tokens", "data.paths": str(bad)}))
  # on the command line: unknown fields and wrong types are refused by config_flags
  out = subprocess.run(_cli(tmp_path, xla_cache, {"optim.learning_rate": 1.0}), env=_env(), capture_output=True, text=True)
  assert out.returncode != 0 and "learning_rate" in out.stderr
  out = subprocess.run(_cli(tmp_path, xla_cache, {"optim.warmup_steps": -5}), env=_env(), capture_output=True, text=True)
  assert out.returncode == 1 and "config field 'optim.warmup_steps'" in out.stderr
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_init_from_a_converted_checkpoint_and_back(tmp_path, xla_cache):
  """init_from an Orbax model checkpoint (ernie_jax.interop.orbax_io); the trained checkpoint is
  itself loadable with ernie_jax.from_pretrained."""
  orbax_io = pytest.importorskip("ernie_jax.interop.orbax_io")
  from flax import nnx

  import ernie_jax
  from ernie_jax.train import config as config_lib

  over = {**MICRO, "steps": 1, "optim.lr": 1e-9, "optim.warmup_steps": 0, "optim.weight_decay": 0.0,
          "loss.bias_update_lr": 0.0}
  cfg = config_lib.parse(_config(tmp_path, xla_cache, **over)).model
  source = ernie_jax.ErnieForCausalLM(cfg, rngs=nnx.Rngs(123))
  orbax_io.save_model(source, str(tmp_path / "converted"))
  pretrain.train(_config(tmp_path / "run", xla_cache, **over, init_from=str(tmp_path / "converted")))
  trained = ernie_jax.from_pretrained(str(tmp_path / "run" / "checkpoints"))
  a = dict(nnx.to_flat_state(nnx.state(source, nnx.Param)))
  b = dict(nnx.to_flat_state(nnx.state(trained, nnx.Param)))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(np.asarray(b[k][...]), np.asarray(a[k][...]), atol=1e-6, err_msg=str(k))
