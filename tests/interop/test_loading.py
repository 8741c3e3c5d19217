"""from_pretrained: sharded checkpoints, MTP tensors, and errors that name the bad tensor."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ernie_jax
from ernie_jax.interop.safetensors_io import CheckpointError
from tests import hf_reference as ref


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
  model = ref.build("moe", seed=11)
  return model, ref.save(model, tmp_path_factory.mktemp("moe"))


def _rewrite(src, dst, edit):
  """Copy an HF checkpoint dir, applying edit(tensors: dict) to its single safetensors file."""
  shutil.copytree(src, dst)
  path = os.path.join(dst, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)
  return dst


def test_sharded_checkpoint_with_index(moe_ckpt, tmp_path):
  model, _ = moe_ckpt
  path = ref.save(model, tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
  tokens = ref.random_tokens(model.config.vocab_size, (1, 10))
  ours = ernie_jax.from_pretrained(path)(jnp.asarray(tokens)).logits
  theirs = ref.logits(model, tokens)
  assert np.abs(np.asarray(ours) - theirs).max() <= 1e-5 * np.abs(theirs).max()


def test_missing_tensor(moe_ckpt, tmp_path):
  _, src = moe_ckpt
  name = "model.layers.1.mlp.experts.3.up_proj.weight"
  path = _rewrite(src, tmp_path / "c", lambda t: t.pop(name))
  with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
    ernie_jax.from_pretrained(path)


def test_unexpected_tensor(moe_ckpt, tmp_path):
  _, src = moe_ckpt
  path = _rewrite(src, tmp_path / "c", lambda t: t.update({"model.layers.9.foo.weight": np.ones(3, np.float32)}))
  with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.9\.foo\.weight'.*num_hidden_layers=3"):
    ernie_jax.from_pretrained(path)


def test_misshaped_tensor(moe_ckpt, tmp_path):
  _, src = moe_ckpt
  name = "model.layers.0.self_attn.k_proj.weight"
  path = _rewrite(src, tmp_path / "c", lambda t: t.update({name: t[name][:-1]}))
  with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + r".*shape \[31, 64\], expected \[32, 64\]"):
    ernie_jax.from_pretrained(path)


def test_wrong_dtype(moe_ckpt, tmp_path):
  _, src = moe_ckpt
  name = "model.norm.weight"
  path = _rewrite(src, tmp_path / "c", lambda t: t.update({name: t[name].astype(np.int32)}))
  with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*dtype I32"):
    ernie_jax.from_pretrained(path)


def test_config_does_not_match_tensors(moe_ckpt, tmp_path):
  _, src = moe_ckpt
  dst = tmp_path / "c"
  shutil.copytree(src, dst)
  cfg = json.loads((dst / "config.json").read_text())
  cfg["moe_num_experts"] = 6  # the file holds 8 experts
  (dst / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.6\..*\(and \d+ more\)|mlp\.gate\.weight"):
    ernie_jax.from_pretrained(dst)


def test_truncated_file(moe_ckpt, tmp_path):
  _, src = moe_ckpt
  dst = tmp_path / "c"
  shutil.copytree(src, dst)
  f = dst / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-100])
  with pytest.raises(CheckpointError, match="truncated"):
    ernie_jax.from_pretrained(dst)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="not found"):
    ernie_jax.from_pretrained(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="config.json"):
    ernie_jax.from_pretrained(tmp_path / "empty")


def test_mtp_tensors_load(moe_ckpt, tmp_path):
  """MTP modules (ignored by transformers) are present and loadable; the main logits are unchanged."""
  model, src = moe_ckpt
  rs = np.random.RandomState(0)
  h = model.config.hidden_size
  mtp = {
    "model.mtp_emb_norm.0.weight": rs.rand(h).astype(np.float32),
    "model.mtp_hidden_norm.0.weight": rs.rand(h).astype(np.float32),
    "model.mtp_linear_proj.0.weight": rs.randn(h, 2 * h).astype(np.float32),
  }
  dense = {k.replace("model.layers.0.", "model.mtp_block.0."): v
           for k, v in load_file(os.path.join(src, "model.safetensors")).items()
           if k.startswith("model.layers.0.")}  # MTP block 0 is dense (layer 0 is dense)
  path = _rewrite(src, tmp_path / "c", lambda t: t.update({**mtp, **dense}))
  cfg = json.loads(open(os.path.join(path, "config.json")).read())
  cfg["num_nextn_predict_layers"] = 1
  open(os.path.join(path, "config.json"), "w").write(json.dumps(cfg))
  ours = ernie_jax.from_pretrained(path)
  assert ours.config.num_mtp_layers == 1
  np.testing.assert_array_equal(ours.mtp[0].proj[...], mtp["model.mtp_linear_proj.0.weight"].T)
  np.testing.assert_array_equal(ours.mtp[0].block.mlp.gate[...],
                                dense["model.mtp_block.0.mlp.gate_proj.weight"].T)
  tokens = ref.random_tokens(model.config.vocab_size, (1, 8))
  out = ours(jnp.asarray(tokens))
  theirs = ref.logits(model, tokens)
  assert np.abs(np.asarray(out.logits) - theirs).max() <= 1e-5 * np.abs(theirs).max()
  (mtp_logits,) = ours.mtp_logits(jnp.asarray(tokens), out.hidden)
  assert mtp_logits.shape == out.logits.shape and np.isfinite(np.asarray(mtp_logits)).all()
  # without the flag the same file is rejected, naming the MTP tensor
  cfg["num_nextn_predict_layers"] = 0
  open(os.path.join(path, "config.json"), "w").write(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="MTP"):
    ernie_jax.from_pretrained(path)
