"""Fault cases of inference (issue 14): non-finite logits are reported instead of decoded as token 0,
and the generate CLI finds a pretraining workdir's latest checkpoint and tokenizer. CPU, tiny models."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flax import nnx

from ernie_jax.config import ModelConfig
from ernie_jax.infer.generate import NonFiniteLogitsError, generate
from ernie_jax.model import ErnieForCausalLM

PROMPTS = [[5, 17, 33, 8], [12, 4]]


def _model():
  return ErnieForCausalLM(ModelConfig.tiny_dense(initializer_range=0.3, tie_word_embeddings=False), rngs=nnx.Rngs(0))


def _set_nan(model, name: str, index):
  var = getattr(model, name) if name != "norm" else model.norm.weight
  var.value = var.value.at[index].set(np.nan)


def test_nan_weight_in_prefill_raises():
  model = _model()
  clean = generate(model, PROMPTS, max_new_tokens=4, stop_tokens=())
  assert all(len(o) == 4 for o in clean)
  _set_nan(model, "norm", 0)  # the final norm: every logit is NaN
  with pytest.raises(NonFiniteLogitsError, match="non-finite"):
    generate(model, PROMPTS, max_new_tokens=4, stop_tokens=())


def test_nan_weight_reached_while_decoding_raises():
  model = _model()
  clean = generate(model, PROMPTS, max_new_tokens=4, stop_tokens=())
  first = clean[0][0]
  assert all(first not in p for p in PROMPTS)
  # Only the embedding row of the first generated token: the prefill is finite, the first decode step is not.
  _set_nan(model, "embed", (first, 0))
  with pytest.raises(NonFiniteLogitsError):
    generate(model, PROMPTS, max_new_tokens=4, stop_tokens=())
  # One step only never feeds the token back: still fine, and equal to the clean run.
  assert generate(model, PROMPTS, max_new_tokens=1, stop_tokens=()) == [o[:1] for o in clean]


def test_cli_reports_nan_logits_in_one_line(tmp_path, capsys):
  from ernie_jax.cli import generate as cli
  from ernie_jax.interop import orbax_io

  model = _model()
  _set_nan(model, "norm", 0)
  path = str(tmp_path / "nan_ckpt")
  orbax_io.save_model(model, path)
  with pytest.warns(RuntimeWarning):
    rc = cli.main(["--checkpoint", path, "--tokens", "5 17 33", "--max-new-tokens", "3"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1
  assert len(err) == 1 and err[0].startswith("error:") and "non-finite" in err[0]


# --------------------------------------------------------------------------------------------------
# generate --checkpoint WORKDIR (a pretraining workdir), --tokenizer bytes
def _byte_workdir(tmp_path):
  """A pretraining-workdir layout (train Checkpointer, step 3) of a tiny byte-level model."""
  import jax.numpy as jnp
  from ernie_jax.train.checkpoint import Checkpointer

  cfg = ModelConfig.tiny_dense(vocab_size=259, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               initializer_range=0.3, tie_word_embeddings=False)
  model = ErnieForCausalLM(cfg, rngs=nnx.Rngs(1))

  class TrainState(nnx.Module):
    def __init__(self, model):
      self.model = model
      self.step = nnx.Variable(jnp.int32(3))

  workdir = str(tmp_path / "run")
  meta = {"step": 3, "data": {}, "config": {"data": {"source": "stdlib", "tokenizer": "bytes"}}}
  with Checkpointer(workdir, every_steps=1, keep=2, async_save=False) as ckpt:
    assert ckpt.save(3, nnx.state(TrainState(model)), meta, cfg, force=True)
  return workdir, model


def test_cli_pretraining_workdir_and_bytes_tokenizer(tmp_path, capsys):
  from ernie_jax.cli import generate as cli
  from ernie_jax.data.tokenizers import ByteTokenizer

  workdir, model = _byte_workdir(tmp_path)
  tok = ByteTokenizer()
  want = generate(model, [tok.encode("def f(")], max_new_tokens=5, stop_tokens=())[0]
  assert cli.main(["--checkpoint", workdir, "--prompt", "def f(", "--max-new-tokens", "5", "--ignore-eos",
                   "--json"]) == 0
  rec = json.loads(capsys.readouterr().out.splitlines()[0])
  assert rec["prompt_ids"] == tok.encode("def f(") and rec["output_ids"] == want
  assert rec["text"] == tok.decode(want)
  # --tokenizer bytes with the checkpoint itself (no workdir to find the tokenizer in)
  step_dir = os.path.join(workdir, "checkpoints", "3")
  assert cli.main(["--checkpoint", step_dir, "--tokenizer", "bytes", "--prompt", "def f(", "--max-new-tokens", "5",
                   "--ignore-eos"]) == 0
  out = capsys.readouterr().out
  assert f"output ids: {' '.join(map(str, want))}" in out and "text:" in out


def test_cli_help_names_the_checkpoint_formats(capsys):
  from ernie_jax.cli import generate as cli

  with pytest.raises(SystemExit):
    cli.main(["--help"])
  out = " ".join(capsys.readouterr().out.split())
  assert "Orbax" in out and "pretraining workdir" in out and "'bytes'" in out


def test_inference_on_rows_the_mesh_does_not_divide_is_padded_not_refused():
  """2 rows on a data2 x expert4 mesh (8 batch shards): the forward pads to 8 rows and returns the 2
  rows' logits and router outputs, equal to one device's; generation pads its prompts the same way."""
  import jax
  import jax.numpy as jnp

  from ernie_jax.parallel import MeshConfig, make_mesh, shard_model

  cfg = ModelConfig.tiny_moe(moe_transport="allgather")
  ref = ErnieForCausalLM(cfg, rngs=nnx.Rngs(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 8)), jnp.int32)
  want = ref(ids)
  mesh = make_mesh(MeshConfig(data=2, expert=4))
  model = shard_model(lambda: ErnieForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
  with jax.set_mesh(mesh):
    got = nnx.jit(lambda m, t: m(t))(model, ids)
  assert got.logits.shape == want.logits.shape
  np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(got.router.indices), np.asarray(want.router.indices))
  with jax.set_mesh(mesh):
    tokens = generate(model, PROMPTS + [[7, 7, 9]], max_new_tokens=4, stop_tokens=())
  assert tokens == generate(ref, PROMPTS + [[7, 7, 9]], max_new_tokens=4, stop_tokens=())
