"""Faults in converted checkpoints and at the loading boundary (issue 14, interop part): damaged
Orbax bytes are refused on load and export, a config that disagrees with the stored arrays is
refused before anything is written, relative paths work, damaged Orbax directories give one-line
errors, stale temporary outputs of killed converters are cleaned, and non-finite weights warn."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import ernie_jax
from ernie_jax.interop import convert, orbax_io
from ernie_jax.interop.safetensors_io import CheckpointError
from tests import hf_reference as ref
from tests.interop.test_convert import load_cli, no_leftovers, read_all, write_dir


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  base = tmp_path_factory.mktemp("faults")
  hf = ref.save(ref.build("moe", seed=5), base / "hf")
  orbax = base / "orbax"
  convert.convert_to_orbax(hf, orbax)
  return {"hf": hf, "orbax": str(orbax)}


def _copy(src, dst) -> str:
  shutil.copytree(src, dst)
  return str(dst)


def _largest_data_file(directory) -> str:
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(directory, "state")) for f in fs]
  return max(files, key=os.path.getsize)


def _one_line(msg: str) -> bool:
  return "\n" not in msg.strip()


# --------------------------------------------------------------------------------------------------
# Item 4: corrupted bytes are detected on load and on export
def test_corrupted_bytes_refused_on_load_and_export(ckpts, tmp_path, capsys):
  bad = _copy(ckpts["orbax"], tmp_path / "bad")
  data = _largest_data_file(bad)
  raw = bytearray(open(data, "rb").read())
  mid = len(raw) // 2
  raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
  open(data, "wb").write(bytes(raw))
  rel = os.path.relpath(data, bad)
  with pytest.raises(CheckpointError, match=rf"checksum mismatch in file .*{os.path.basename(data)}.*re-convert") as e:
    ernie_jax.from_pretrained(bad)
  assert rel in str(e.value) and _one_line(str(e.value))
  with pytest.raises(CheckpointError, match="checksum"):
    convert.export_hf(bad, tmp_path / "hf")
  rc = load_cli("orbax_to_hf").main_to_hf("", ["--input", bad, "--output", str(tmp_path / "hf"), "--quiet"])
  err = capsys.readouterr().err
  assert rc == 1 and os.path.basename(data) in err and _one_line(err), err
  no_leftovers(tmp_path, ["bad"])


def test_truncated_data_file_refused(ckpts, tmp_path):
  bad = _copy(ckpts["orbax"], tmp_path / "bad")
  data = _largest_data_file(bad)
  with open(data, "r+b") as f:
    f.truncate(os.path.getsize(data) // 2)
  with pytest.raises(CheckpointError, match=rf"{os.path.basename(data)}.*re-convert"):
    ernie_jax.from_pretrained(bad)


def test_checksums_recorded_and_legacy_checkpoints_load(ckpts, tmp_path):
  sums = json.load(open(os.path.join(ckpts["orbax"], orbax_io.CHECKSUMS)))
  assert sums["files"] and all(not f.startswith(orbax_io.CHECKSUMS) for f in sums["files"])
  legacy = _copy(ckpts["orbax"], tmp_path / "legacy")
  os.remove(os.path.join(legacy, orbax_io.CHECKSUMS))  # written before checksums existed
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    model = ernie_jax.from_pretrained(legacy)
  assert model.config.num_hidden_layers == 3
  convert.export_hf(legacy, tmp_path / "hf")


# --------------------------------------------------------------------------------------------------
# Item 5: a config that disagrees with the stored arrays
def _edit_config(directory, **changes):
  fn = os.path.join(directory, orbax_io.CONFIG_ITEM, "metadata")
  info = json.load(open(fn))
  info["model_config"].update(changes)
  json.dump(info, open(fn, "w"))
  os.remove(os.path.join(directory, orbax_io.CHECKSUMS))  # an edited (not damaged) checkpoint


@pytest.mark.parametrize("changes,pattern", [
  ({"hidden_size": 96}, r"shape \[128, 64\], .*expects \[128, 96\]"),
  ({"num_hidden_layers": 2, "moe_layer_end_index": 1}, r"array 'groups/1/.*' has shape \[2, .*expects \[1, "),
])
def test_export_refuses_config_that_disagrees(ckpts, tmp_path, capsys, changes, pattern):
  bad = _copy(ckpts["orbax"], tmp_path / "bad")
  _edit_config(bad, **changes)
  with pytest.raises(CheckpointError, match=pattern):
    ernie_jax.from_pretrained(bad)
  with pytest.raises(CheckpointError, match=pattern):
    convert.export_hf(bad, tmp_path / "hf")
  rc = load_cli("orbax_to_hf").main_to_hf("", ["--input", bad, "--output", str(tmp_path / "hf"), "--quiet"])
  assert rc == 1 and re.search(pattern, capsys.readouterr().err)
  no_leftovers(tmp_path, ["bad"])


# --------------------------------------------------------------------------------------------------
# Item 9: relative paths
def test_relative_paths(ckpts, tmp_path, monkeypatch, capsys):
  work = tmp_path / "work"
  work.mkdir()
  _copy(ckpts["orbax"], tmp_path / "ck")
  monkeypatch.chdir(work)
  model = ernie_jax.from_pretrained("../ck")
  assert model.config.num_hidden_layers == 3
  assert orbax_io.load_config("../ck").num_hidden_layers == 3
  reader = orbax_io.OrbaxReader("../ck")
  reader.close()
  convert.export_hf("../ck", "../hf1")
  rc = load_cli("orbax_to_hf").main_to_hf("", ["--input", "../ck", "--output", "../hf2", "--quiet"])
  assert rc == 0, capsys.readouterr().err
  assert os.path.exists(tmp_path / "hf2" / "model.safetensors")
  ernie_jax.from_pretrained("../hf2")
  convert.convert_to_orbax("../hf2", "../ck2")
  assert ernie_jax.from_pretrained("../ck2").config.num_hidden_layers == 3


# --------------------------------------------------------------------------------------------------
# Weak spots: damaged Orbax directories, stale temporary outputs
@pytest.mark.parametrize("damage", ["manifest", "metadata", "config_item", "garbled_config"])
def test_damaged_orbax_dir_one_line_error(ckpts, tmp_path, damage):
  bad = _copy(ckpts["orbax"], tmp_path / "bad")
  os.remove(os.path.join(bad, orbax_io.CHECKSUMS))  # the structural error itself must be clear
  if damage == "manifest":
    os.remove(os.path.join(bad, "state", "manifest.ocdbt"))
    pattern = r"bad.*(damaged|incomplete).*re-convert"
  elif damage == "metadata":
    os.remove(os.path.join(bad, "state", "_METADATA"))
    pattern = r"bad.*(damaged|incomplete).*re-convert"
  elif damage == "config_item":
    shutil.rmtree(os.path.join(bad, orbax_io.CONFIG_ITEM))
    pattern = r"bad.*Orbax checkpoint.*missing.*model_config"
  else:
    open(os.path.join(bad, orbax_io.CONFIG_ITEM, "metadata"), "w").write("{not json")
    pattern = r"bad.*(damaged|incomplete).*re-convert"
  with pytest.raises(CheckpointError, match=pattern) as e:
    ernie_jax.from_pretrained(bad)
  assert _one_line(str(e.value)) and "config.json" not in str(e.value), e.value


def test_stale_tmp_dirs_are_cleaned(ckpts, tmp_path, capsys):
  out = tmp_path / "out"
  # a converter killed mid-write leaves its temporary directory behind
  p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  dead = p.pid
  p.kill()
  p.wait()
  stale = tmp_path / f".out.tmp-{dead}-abc"
  (stale / "out").mkdir(parents=True)
  (stale / "out" / "junk").write_bytes(b"x" * 1000)
  alive = tmp_path / f".out.tmp-{os.getpid()}-def"  # a conversion in progress: kept
  alive.mkdir()
  old = tmp_path / ".out.tmp-xyz"  # old-style name, hours old
  old.mkdir()
  os.utime(old, (time.time() - 7200, time.time() - 7200))
  other = tmp_path / ".other.tmp-1-x"  # another output's: not ours to touch
  other.mkdir()
  convert.convert_to_orbax(ckpts["hf"], out)
  err = capsys.readouterr().err
  assert stale.name in err and old.name in err, err
  no_leftovers(tmp_path, ["out", alive.name, other.name])


# --------------------------------------------------------------------------------------------------
# Non-finite weights warn at load time
def test_non_finite_weights_warn(ckpts, tmp_path):
  tensors = read_all(ckpts["hf"])
  name = "model.layers.1.mlp.experts.2.down_proj.weight"
  tensors[name] = tensors[name].copy()
  tensors[name][0, 0] = np.nan
  cfg = json.load(open(os.path.join(ckpts["hf"], "config.json")))
  bad = write_dir(tmp_path / "hf", tensors, cfg)
  with pytest.warns(RuntimeWarning, match=r"experts/down.*non-finite") as w:
    ernie_jax.from_pretrained(bad)
  assert len([x for x in w if "non-finite" in str(x.message)]) == 1
  convert.convert_to_orbax(bad, tmp_path / "orbax")
  with pytest.warns(RuntimeWarning, match=r"experts/down.*non-finite"):
    ernie_jax.from_pretrained(tmp_path / "orbax")
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    ernie_jax.from_pretrained(ckpts["hf"])
    ernie_jax.from_pretrained(ckpts["orbax"])
