"""ERNIE 4.5 VL checkpoint conversion: HF / Paddle -> Orbax (streaming, atomic) -> logits equal
transformers' with an image in the prompt; Orbax -> HF bit-exact and loadable by transformers; the
CLIs with --verify; an in-memory VL model without correction bias exported with zero biases."""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import ernie_jax
from ernie_jax.cli.verify import verify
from ernie_jax.interop import hf_config
from ernie_jax.interop import convert, orbax_io, sources
from ernie_jax.model.vl import Ernie45VLForConditionalGeneration, VLConfig, forward
from tests.helpers import flat_arrays
from tests import vl_paddle_writer as writer
from tests import vl_reference as ref
from tests.interop.test_convert import load_cli, no_leftovers, read_all, write_dir

GRIDS = [(1, 4, 4), (1, 6, 4)]


def _flat(model):
  return flat_arrays(nnx.state(model))


def _assert_same_files(a_dir, b_dir):
  a, b = read_all(a_dir), read_all(b_dir)
  assert sorted(a) == sorted(b)
  for n in a:
    assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
    assert a[n].tobytes() == b[n].tobytes(), n


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  base = tmp_path_factory.mktemp("vl_src")
  torch_model = writer.round_to_bf16(ref.build(seed=4))
  hf_dir = str(base / "hf")
  torch_model.save_pretrained(hf_dir)
  fp32 = ("gate.weight", "gate.weight_1", "e_score_correction_bias")
  bf16 = {n: (x if n.endswith(fp32) else x.astype(ml_dtypes.bfloat16)) for n, x in read_all(hf_dir).items()}
  hf_bf16 = write_dir(base / "hf_bf16", bf16, {**json.load(open(os.path.join(hf_dir, "config.json"))),
                                                "dtype": "bfloat16"})
  paddle_dir = writer.write(base / "paddle", hf_dir, u16=True)
  return {"torch": torch_model, "hf": hf_dir, "hf_bf16": hf_bf16, "paddle": paddle_dir}


def _image_logits(torch_model, model):
  rows = [[5] + ref.image_span(GRIDS[0]) + [6, 7, 8, 9], [10, 11] + ref.image_span(GRIDS[1]) + [12]]
  ids = np.array(rows)
  pv = ref.pixels(GRIDS, seed=8)
  want = ref.forward(torch_model, ids, pixel_values=pv, image_grid=GRIDS)
  got = np.asarray(forward(model, ids, pixel_values=pv, image_grid_thw=GRIDS).logits)
  return np.abs(got - want).max() / np.abs(want).max()


def test_hf_vl_to_orbax_to_hf(ckpts, tmp_path):
  out = tmp_path / "orbax"
  report = convert.convert_to_orbax(ckpts["hf"], out)
  assert report.format == "hf/vl" and report.storage_dtype == "float32" and not report.lossy
  assert isinstance(report.config, VLConfig) and sources.detect_format(out) == "orbax"
  assert orbax_io.read_info(out)["architecture"] == orbax_io.VL_ARCHITECTURE
  assert orbax_io.load_config(out) == hf_config.read_vl(ckpts["hf"])
  model = ernie_jax.from_pretrained(out)
  assert isinstance(model, Ernie45VLForConditionalGeneration)
  assert _image_logits(ckpts["torch"], model) <= 1e-5
  if jax.device_count() >= 8:  # and straight onto a mesh
    from ernie_jax.parallel import MeshConfig, make_mesh

    sharded = ernie_jax.from_pretrained(out, mesh=make_mesh(MeshConfig(data=2, expert=2, tensor=2)))
    assert sharded.groups[1].blocks.layers[0].mlp.vision_experts.gate[...].sharding.spec[1] == "expert"
    ours = _flat(model)
    for p, a in _flat(sharded).items():
      np.testing.assert_array_equal(a, ours[p], err_msg=p)
  # Orbax -> HF reproduces the source files bit for bit, and transformers runs them
  convert.export_hf(out, tmp_path / "hf")
  _assert_same_files(ckpts["hf"], tmp_path / "hf")
  assert hf_config.read_vl(tmp_path / "hf") == hf_config.read_vl(ckpts["hf"])
  assert json.load(open(tmp_path / "hf" / "config.json"))["dtype"] == "float32"
  result = verify(out, tmp_path / "hf")
  assert result.ok and result.rel <= 1e-5 and result.top1 == 1.0, result
  no_leftovers(tmp_path, ["hf", "orbax"])


def test_bf16_streamed_in_single_expert_blocks(ckpts, tmp_path):
  """block_bytes=1: every layer / expert slice is its own block; bf16 stays bf16; round trip exact."""
  out = tmp_path / "orbax"
  report = convert.convert_to_orbax(ckpts["hf_bf16"], out, block_bytes=1)
  assert report.storage_dtype == "bfloat16" and not report.lossy
  reader = orbax_io.OrbaxReader(out)
  vision = reader.arrays["groups/1/blocks/layers/0/mlp/vision_experts/gate"][1]
  assert vision.shape == (2, 4, 64, 16) and vision.storage.chunk_shape == (1, 1, 64, 16)
  assert reader.dtype("groups/1/blocks/layers/0/mlp/vision_router/correction_bias") == np.float32
  assert reader.dtype("vision_model/blocks/qkv/kernel") == ml_dtypes.bfloat16
  reader.close()
  convert.export_hf(out, tmp_path / "hf", max_shard_bytes=20_000)
  assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
  _assert_same_files(ckpts["hf_bf16"], tmp_path / "hf")
  assert json.load(open(tmp_path / "hf" / "config.json"))["dtype"] == "bfloat16"


def test_top_level_vision_prefix_of_the_pt_release(ckpts, tmp_path):
  """The `-PT` release (and ERNIE's paddle2torch) store the ViT as `vision_model.*`."""
  tensors = {(n[len("model."):] if n.startswith("model.vision_model.") else n): x
             for n, x in read_all(ckpts["hf"]).items()}
  src = write_dir(tmp_path / "pt", tensors, json.load(open(os.path.join(ckpts["hf"], "config.json"))))
  theirs = _flat(ernie_jax.from_pretrained(ckpts["hf"]))
  for p, a in _flat(ernie_jax.from_pretrained(src)).items():
    np.testing.assert_array_equal(a, theirs[p], err_msg=p)
  tensors["model.vision_model.ln.bias"] = tensors["vision_model.ln.bias"]
  write_dir(tmp_path / "pt", tensors, json.load(open(os.path.join(ckpts["hf"], "config.json"))))
  with pytest.raises(convert.CheckpointError, match=r"unexpected tensor 'model\.vision_model\.ln\.bias'.*outside"):
    ernie_jax.from_pretrained(src)


def test_cli_paddle_vl_to_orbax_to_hf_with_verify(ckpts, tmp_path, capsys):
  rc = load_cli("paddle_to_orbax").main_to_orbax(
    "paddle", "", ["--input", ckpts["paddle"], "--output", str(tmp_path / "o"), "--verify", "--quiet"])
  out = capsys.readouterr().out
  assert rc == 0 and "verify: max |Δ logits|" in out and "OK" in out, out
  assert orbax_io.read_info(tmp_path / "o")["source"]["format"] == "paddle/vl"
  theirs = _flat(ernie_jax.from_pretrained(ckpts["hf"]))
  for p, a in _flat(ernie_jax.from_pretrained(tmp_path / "o")).items():
    np.testing.assert_array_equal(a, theirs[p], err_msg=p)
  rc = load_cli("orbax_to_hf").main_to_hf("", ["--input", str(tmp_path / "o"), "--output", str(tmp_path / "h"),
                                               "--verify", "--quiet"])
  assert rc == 0 and "OK" in capsys.readouterr().out
  _assert_same_files(ckpts["hf_bf16"], tmp_path / "h")  # Paddle -> Orbax -> HF == the bf16 HF files
  no_leftovers(tmp_path, ["h", "o"])


def test_in_memory_model_without_correction_bias(tmp_path):
  """save_model / from_pretrained round trip of a VL model that never saw a checkpoint; its HF
  export carries zero correction biases (transformers always has them) and runs in transformers."""
  cfg = VLConfig.tiny(param_dtype="bfloat16", moe_use_correction_bias=False)
  model = Ernie45VLForConditionalGeneration(cfg, rngs=nnx.Rngs(3))
  orbax_io.save_model(model, tmp_path / "orbax")
  loaded = ernie_jax.from_pretrained(tmp_path / "orbax", param_dtype="bfloat16")
  assert loaded.config == cfg.replace(dtype="float32")
  # a VL config is recognised without the architecture tag too (e.g. training checkpoints)
  assert orbax_io.is_vl_info({"model_config": cfg.to_dict()})
  assert not orbax_io.is_vl_info({"model_config": ernie_jax.ModelConfig.tiny_moe().to_dict()})
  ours = _flat(model)
  for p, a in _flat(loaded).items():
    np.testing.assert_array_equal(a, ours[p], err_msg=p)
  convert.export_hf(model, tmp_path / "hf")
  tensors = read_all(tmp_path / "hf")
  bias = tensors["model.layers.1.mlp.moe_statics.e_score_correction_bias"]
  assert bias.shape == (2, cfg.moe_num_experts) and not bias.any()
  assert tensors["model.layers.1.mlp.gate.weight_1"].dtype == np.float32
  assert tensors["model.vision_model.blocks.0.attn.qkv.weight"].dtype == ml_dtypes.bfloat16
  result = verify(tmp_path / "orbax", tmp_path / "hf")
  assert result.ok and result.rel <= 1e-5, result
