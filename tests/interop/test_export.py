"""Exported models carry their tokenizer files and generation_config.json (converters HF -> Orbax -> HF
and `export.export_model`), and `export_model` writes models transformers / from_pretrained load with
our logits."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import ernie_jax
from ernie_jax.cli.convert import main_to_hf, main_to_orbax
from ernie_jax.interop import assets, convert, orbax_io
from ernie_jax.interop.export import export_model
from ernie_jax.interop.safetensors_io import CheckpointError
from tests import hf_reference as ref
from tests.helpers import rel

TOKENS = ref.random_tokens(128, (2, 10), seed=11)
TOKENIZER = {  # stand-ins for a release's tokenizer files (contents only need to survive byte for byte)
  "tokenizer.model": bytes(range(256)) * 3,
  "tokenizer_config.json": json.dumps({"model_max_length": 131072, "chat_template": "{{ messages }}"}).encode(),
  "special_tokens_map.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>"}).encode(),
  "added_tokens.json": json.dumps({"<think>": 100295}).encode(),
  "chat_template.jinja": b"{% for m in messages %}{{ m['content'] }}{% endfor %}",
}
GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 100272], "pad_token_id": 0, "top_p": 0.8, "temperature": 0.8}


def add_assets(directory, generation=True) -> str:
  for name, data in TOKENIZER.items():
    with open(os.path.join(directory, name), "wb") as f:
      f.write(data)
  path = os.path.join(directory, assets.GENERATION_CONFIG)
  if generation:
    with open(path, "w") as f:
      json.dump(GENERATION, f)
  elif os.path.exists(path):
    os.remove(path)
  return str(directory)


def assert_assets(directory, generation=GENERATION):
  for name, data in TOKENIZER.items():
    with open(os.path.join(directory, name), "rb") as f:
      assert f.read() == data, name
  with open(os.path.join(directory, assets.GENERATION_CONFIG)) as f:
    assert json.load(f) == generation


@pytest.fixture(scope="module")
def src(tmp_path_factory):
  """A tiny fp32 HF MoE checkpoint with tokenizer files and a generation config."""
  base = tmp_path_factory.mktemp("export_src")
  d = ref.save(ref.build("moe", seed=5), base / "moe")
  return add_assets(d)


def hf_logits(path):
  import torch
  import transformers

  return ref.logits(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), TOKENS)


def test_converters_carry_tokenizer_and_generation_config(src, tmp_path, capsys):
  """HF -> Orbax -> HF through the command lines: every file arrives byte for byte, the Orbax checkpoint's
  checksums cover them and it still loads."""
  assert main_to_orbax("hf", "", ["--input", src, "--output", str(tmp_path / "o"), "--quiet"]) == 0
  assert_assets(tmp_path / "o")
  checks = json.load(open(tmp_path / "o" / "checksums.json"))["files"]
  assert set(TOKENIZER) | {assets.GENERATION_CONFIG} <= set(checks)
  assert orbax_io.verify_checksums(tmp_path / "o")
  assert main_to_hf("", ["--input", str(tmp_path / "o"), "--output", str(tmp_path / "h"), "--quiet"]) == 0
  assert_assets(tmp_path / "h")
  capsys.readouterr()
  # a damaged tokenizer file in the Orbax checkpoint is caught by its checksums
  with open(tmp_path / "o" / "tokenizer.model", "r+b") as f:
    f.write(b"\xff")
  with pytest.raises(CheckpointError, match="tokenizer.model"):
    orbax_io.verify_checksums(tmp_path / "o")


def test_generation_config_from_model_config_and_tokenizer_option(src, tmp_path):
  """Without a source generation_config.json one is written from the config's ids; --tokenizer / tokenizer_dir
  takes the files from another directory."""
  bare = ref.save(ref.build("dense", seed=2, bos_token_id=5, eos_token_id=6, pad_token_id=7), tmp_path / "bare")
  os.remove(os.path.join(bare, assets.GENERATION_CONFIG))  # save_pretrained writes one: drop it
  convert.convert_to_orbax(bare, tmp_path / "o1")
  with open(tmp_path / "o1" / assets.GENERATION_CONFIG) as f:
    assert json.load(f) == {"bos_token_id": 5, "eos_token_id": 6, "pad_token_id": 7}
  assert not os.path.exists(tmp_path / "o1" / "tokenizer.model")
  convert.export_hf(str(tmp_path / "o1"), tmp_path / "h1", tokenizer_dir=src)
  assert_assets(tmp_path / "h1")


def test_export_model_hf_and_orbax(src, tmp_path):
  """export_model of an in-memory model: transformers loads the HF export with our logits (fp32), and the
  Orbax export loads back with the same logits; tokenizer files and generation config in both."""
  model = ernie_jax.from_pretrained(src)
  ours = np.asarray(model(jnp.asarray(TOKENS)).logits)
  assert rel(ours, hf_logits(src)) < 1e-5  # the reference itself
  gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}
  report = export_model(model, tmp_path / "hf", format="hf", tokenizer_dir=src, generation_config=gen)
  assert report["format"] == "hf" and "tokenizer.model" in report["assets"]
  assert_assets(tmp_path / "hf", gen)
  assert rel(hf_logits(tmp_path / "hf"), ours) < 1e-5
  export_model(model, tmp_path / "ob", format="orbax", tokenizer_dir=src)
  assert_assets(tmp_path / "ob")
  back = ernie_jax.from_pretrained(tmp_path / "ob")
  np.testing.assert_array_equal(np.asarray(back(jnp.asarray(TOKENS)).logits), ours)
  # bf16 storage: the config says so and the weights are rounded
  export_model(model, tmp_path / "ob16", format="orbax", dtype="bfloat16")
  assert orbax_io.read_info(tmp_path / "ob16")["model_config"]["param_dtype"] == "bfloat16"
  assert os.path.exists(tmp_path / "ob16" / assets.GENERATION_CONFIG)
  assert sorted(os.listdir(tmp_path)) == ["hf", "ob", "ob16"]


def test_export_model_errors_leave_nothing(src, tmp_path):
  model = ernie_jax.from_pretrained(src)
  with pytest.raises(CheckpointError, match="does not exist"):
    export_model(model, tmp_path / "x", tokenizer_dir=tmp_path / "nowhere")
  bad = tmp_path / "bad.json"
  bad.write_text("[1, 2]")
  for fmt in ("hf", "orbax"):
    with pytest.raises(CheckpointError, match="not a JSON object"):
      export_model(model, tmp_path / "x", format=fmt, generation_config=str(bad))
  with pytest.raises(ValueError, match="format must be"):
    export_model(model, tmp_path / "x", format="gguf")
  assert sorted(os.listdir(tmp_path)) == ["bad.json"]
