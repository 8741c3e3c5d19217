"""Bad inputs to the converters, HF and Paddle layouts: each fails (CLI exit status 1) with a message
naming the tensor or file, and leaves nothing behind next to the output."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from ernie_jax.interop import convert
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.interop.sources import detect_format
from tests import hf_reference as ref
from tests.interop.test_convert import hf_to_paddle, load_cli, no_leftovers, read_all, to_bf16_hf, write_dir


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  base = tmp_path_factory.mktemp("src")
  hf = ref.save(ref.build("moe", seed=5), base / "hf")
  paddle = hf_to_paddle(to_bf16_hf(hf, base / "bf16"), base / "paddle")
  return {"hf": hf, "paddle": paddle}


def _copy(src, dst, tensors=None, config=None):
  """A copy of checkpoint `src` with tensors / config edited (single safetensors file)."""
  t = read_all(src)
  cfg = json.load(open(os.path.join(src, "config.json")))
  if tensors:
    tensors(t)
  if config:
    config(cfg)
  return write_dir(dst, t, cfg)


def _drop(name):
  return lambda t: t.pop(name)


def _set(name, fn):
  return lambda t: t.update({name: fn(t[name])})


CASES = {
  # case: (layout, tensor edit, config edit, regex the message must match)
  "missing-hf": ("hf", _drop("model.layers.1.mlp.experts.3.up_proj.weight"), None,
                 r"missing tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'"),
  "missing-paddle": ("paddle", _drop("ernie.layers.2.mlp.experts.7.up_gate_proj.weight"), None,
                     r"missing tensor 'ernie\.layers\.2\.mlp\.experts\.7\.up_gate_proj\.weight'"),
  "unexpected-hf": ("hf", lambda t: t.update({"model.layers.9.foo.weight": np.ones(3, np.float32)}), None,
                    r"unexpected tensor 'model\.layers\.9\.foo\.weight'.*num_hidden_layers=3"),
  "unexpected-paddle": ("paddle", lambda t: t.update({"ernie.layers.1.mlp.gate.weight_1": np.ones((64, 8), np.float32)}),
                        None, r"unexpected tensor 'ernie\.layers\.1\.mlp\.gate\.weight_1'.*ERNIE-4\.5-VL"),
  "shape-hf": ("hf", _set("model.layers.0.self_attn.k_proj.weight", lambda x: x[:-1]), None,
               r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[31, 64\], expected \[32, 64\]"),
  "shape-paddle": ("paddle", _set("ernie.layers.0.self_attn.qkv_proj.weight", lambda x: x[:, :-16]), None,
                   r"'ernie\.layers\.0\.self_attn\.qkv_proj\.weight' has shape \[64, 112\], expected \[64, 128\]"),
  "dtype-hf": ("hf", _set("model.norm.weight", lambda x: x.astype(np.int32)), None,
               r"'model\.norm\.weight' has dtype I32"),
  "dtype-paddle": ("paddle", _set("ernie.norm.weight", lambda x: x.view(np.int16)), None,
                   r"'ernie\.norm\.weight' has dtype I16.*U16"),
  "config-hf": ("hf", None, lambda c: c.update(moe_num_experts=6),
                r"unexpected tensor 'model\.layers\.1\.mlp\.experts\.6\..*\(and \d+ more\)"),
  "config-paddle": ("paddle", None, lambda c: c.update(num_key_value_heads=4),
                    r"'ernie\.layers\.0\.self_attn\.qkv_proj\.weight' has shape \[64, 128\], expected \[64, 192\]"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(sources, tmp_path, capsys, case):
  layout, edit, config, pattern = CASES[case]
  bad = _copy(sources[layout], tmp_path / "bad", edit, config)
  cli = load_cli(f"{layout}_to_orbax")
  rc = cli.main_to_orbax(layout, "", ["--input", bad, "--output", str(tmp_path / "out"), "--quiet"])
  err = capsys.readouterr().err
  assert rc == 1 and re.search(pattern, err), err
  with pytest.raises(CheckpointError, match=pattern):
    convert.convert_to_orbax(bad, tmp_path / "out")
  no_leftovers(tmp_path, ["bad"])


@pytest.mark.parametrize("layout", ["hf", "paddle"])
def test_truncated_file(sources, tmp_path, layout):
  bad = tmp_path / "bad"
  shutil.copytree(sources[layout], bad)
  f = bad / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-100])
  with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated file: tensor '.*' ends at byte"):
    convert.convert_to_orbax(bad, tmp_path / "out")
  no_leftovers(tmp_path, ["bad"])


def test_missing_shard(sources, tmp_path):
  bad = tmp_path / "bad"
  write_dir(bad, read_all(sources["hf"]), json.load(open(os.path.join(sources["hf"], "config.json"))),
            shard_bytes=50_000)
  shards = sorted(bad.glob("model-0*.safetensors"))
  assert len(shards) > 2
  os.remove(shards[1])
  with pytest.raises(CheckpointError, match=r"index\.json names shard 'model-\d+-of-\d+\.safetensors', which does not exist"):
    convert.convert_to_orbax(bad, tmp_path / "out")
  no_leftovers(tmp_path, ["bad"])


def test_output_exists(sources, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  with pytest.raises(FileExistsError, match=r"out already exists.*overwrite"):
    convert.convert_to_orbax(sources["hf"], out)
  assert os.listdir(out) == ["keep.txt"]
  with pytest.raises(FileExistsError, match="already exists"):
    convert.export_hf(out, out)
  no_leftovers(tmp_path, ["out"])
  # a failing conversion with overwrite leaves the old output untouched
  bad = _copy(sources["hf"], tmp_path / "bad", _drop("model.norm.weight"))
  with pytest.raises(CheckpointError, match="model.norm.weight"):
    convert.convert_to_orbax(bad, out, overwrite=True)
  assert os.listdir(out) == ["keep.txt"]
  convert.convert_to_orbax(sources["hf"], out, overwrite=True)
  assert detect_format(out) == "orbax" and not os.path.exists(out / "keep.txt")
  no_leftovers(tmp_path, ["bad", "out"])


def test_output_in_new_parent_is_cleaned_up(sources, tmp_path):
  bad = _copy(sources["hf"], tmp_path / "bad", _drop("model.norm.weight"))
  with pytest.raises(CheckpointError):
    convert.convert_to_orbax(bad, tmp_path / "new" / "deeper" / "out")
  no_leftovers(tmp_path, ["bad"])


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="not found"):
    convert.convert_to_orbax(tmp_path / "nope", tmp_path / "out")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="config.json"):
    convert.convert_to_orbax(tmp_path / "empty", tmp_path / "out")
  (tmp_path / "empty" / "config.json").write_text("{}")
  with pytest.raises(CheckpointError, match="no .safetensors"):
    convert.convert_to_orbax(tmp_path / "empty", tmp_path / "out")
  with pytest.raises(CheckpointError, match="not an ernie_jax Orbax checkpoint"):
    convert.export_hf(tmp_path / "empty", tmp_path / "out")
  no_leftovers(tmp_path, ["empty"])


def test_error_while_streaming_leaves_nothing(sources, tmp_path, monkeypatch):
  """A failure deep inside the background writer (here: reading one expert tensor) surfaces as
  itself, promptly, and the partial checkpoint is removed."""
  import time

  from ernie_jax.interop.safetensors_io import SafetensorsReader

  real_get = SafetensorsReader.get

  def get(self, name):
    if name == "model.layers.2.mlp.experts.5.down_proj.weight":
      raise CheckpointError(f"I/O error reading '{name}'")
    return real_get(self, name)

  monkeypatch.setattr(SafetensorsReader, "get", get)
  t0 = time.perf_counter()
  with pytest.raises(CheckpointError, match=r"I/O error reading 'model\.layers\.2\.mlp\.experts\.5\.down_proj"):
    convert.convert_to_orbax(sources["hf"], tmp_path / "out", block_bytes=1)
  assert time.perf_counter() - t0 < 60
  no_leftovers(tmp_path, [])
