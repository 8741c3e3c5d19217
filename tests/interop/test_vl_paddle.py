"""ERNIE 4.5 VL from native `-Paddle` checkpoints through `ernie_jax.from_pretrained`, against
transformers' `Ernie4_5_VLMoeForConditionalGeneration` (tiny random configs, weights rounded to bf16
so the bf16 Paddle files hold exactly the reference's weights). The Paddle files are written by
`tests/vl_paddle_writer.py`, which applies the documented layout rules independently of
`ernie_jax.interop`. Also: header-time errors naming the tensor / config field, loading onto a
mesh, and the VL-424B-A47B preset's parameter count."""

from __future__ import annotations

import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import ernie_jax
from ernie_jax.config import ConfigError
from ernie_jax.interop.safetensors_io import CheckpointError, SafetensorsReader
from ernie_jax.model.vl import Ernie45VLForConditionalGeneration, VLConfig, forward
from ernie_jax.interop import hf_config
from tests.helpers import flat_arrays, rel
from tests import vl_paddle_writer as writer
from tests import vl_reference as ref

SQUARE, WIDE = (1, 4, 4), (1, 4, 6)


def _flat(model):
  return flat_arrays(nnx.state(model))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """tied (U16 bits, vision under `vision_model.`) and untied (BF16, `ernie.vision_model.`)."""
  base = tmp_path_factory.mktemp("vl_paddle")
  out = {}
  for name, seed, tied, u16, prefix in (("u16", 0, True, True, "vision_model."),
                                        ("bf16", 1, False, False, "ernie.vision_model.")):
    torch_model = writer.round_to_bf16(ref.build(seed=seed, tie_word_embeddings=tied))
    hf_dir = base / f"{name}_hf"
    torch_model.save_pretrained(str(hf_dir))
    out[name] = (torch_model, str(hf_dir), writer.write(base / name, hf_dir, u16=u16, vision_prefix=prefix))
  return out


def _prompt_logits(torch_model, model):
  rows = [[5, 6] + ref.image_span(SQUARE) + [7, 8, 9, 10], [11] + ref.image_span(WIDE) + [12, 13, 14]]
  ids = np.array(rows)
  pv = ref.pixels([SQUARE, WIDE], seed=2)
  want = ref.forward(torch_model, ids, pixel_values=pv, image_grid=[SQUARE, WIDE])
  got = forward(model, ids, pixel_values=pv, image_grid_thw=[SQUARE, WIDE]).logits
  return np.asarray(got), want


@pytest.mark.parametrize("name", ["u16", "bf16"])
def test_paddle_vl_logits_match_transformers(ckpts, name):
  torch_model, hf_dir, paddle_dir = ckpts[name]
  header = SafetensorsReader(paddle_dir)
  tags = {i.dtype for i in header.tensors.values()}
  assert tags == ({"U16", "F32"} if name == "u16" else {"BF16", "F32"})
  assert header.tensors["ernie.layers.1.mlp.gate.weight_1"].shape == (64, 4)
  assert header.tensors["ernie.layers.1.mlp.experts.5.up_gate_proj.weight"].shape == (64, 32)  # vision 2 x 16
  assert (name == "bf16") == ("lm_head.weight" in header.tensors)
  header.close()
  model = ernie_jax.from_pretrained(paddle_dir)
  assert isinstance(model, Ernie45VLForConditionalGeneration)
  c = model.config
  assert c == hf_config.read_vl(hf_dir)  # the Paddle config.json reads as the HF one
  assert c.layer_kinds == ("dense", "moe", "moe") and c.moe_intermediate_size == (32, 16)
  assert (model.lm_head is None) == (name == "u16")
  got, want = _prompt_logits(torch_model, model)
  assert rel(got, want) <= 1e-5
  # every parameter is bit-identical to the one loaded from the HF files (U16 was bit-cast)
  theirs = _flat(ernie_jax.from_pretrained(hf_dir))
  ours = _flat(model)
  assert ours.keys() == theirs.keys()
  for p in ours:
    np.testing.assert_array_equal(ours[p], theirs[p], err_msg=p)


def test_errors_name_the_tensor_or_field(ckpts, tmp_path, monkeypatch):
  _, _, src = ckpts["u16"]
  tensors = load_file(os.path.join(src, "model.safetensors"))
  config = json.load(open(os.path.join(src, "config.json")))

  def write(edit_tensors=None, edit_config=None):
    d = tmp_path / "c"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    t, c = dict(tensors), copy.deepcopy(config)
    (edit_tensors or (lambda _: None))(t)
    (edit_config or (lambda _: None))(c)
    save_file(t, str(d / "model.safetensors"))
    json.dump(c, open(d / "config.json", "w"))
    return d

  # checked from the headers: no tensor data may be read before these errors
  monkeypatch.setattr(SafetensorsReader, "get", lambda self, n: pytest.fail(f"data of {n} read"))
  bad = "ernie.layers.2.mlp.experts.6.up_gate_proj.weight"  # a vision expert given the text width
  d = write(lambda t: t.update({bad: np.zeros((64, 64), np.uint16)}))
  with pytest.raises(CheckpointError, match=rf"{bad.replace('.', '[.]')}' has shape \[64, 64\], expected \[64, 32\]"):
    ernie_jax.from_pretrained(d)
  d = write(lambda t: t.update({"ernie.layers.1.self_attn.qkv_proj.weight": np.zeros((64, 96), np.uint16)}))
  with pytest.raises(CheckpointError, match=r"qkv_proj\.weight' has shape \[64, 96\], expected \[64, 128\]"):
    ernie_jax.from_pretrained(d)
  d = write(lambda t: t.pop("ernie.layers.2.mlp.gate.weight_1"))
  with pytest.raises(CheckpointError, match=r"missing tensor 'ernie\.layers\.2\.mlp\.gate\.weight_1'"):
    ernie_jax.from_pretrained(d)
  d = write(lambda t: t.pop("vision_model.blocks.1.attn.qkv.bias"))
  with pytest.raises(CheckpointError, match=r"missing tensor 'vision_model\.blocks\.1\.attn\.qkv\.bias'"):
    ernie_jax.from_pretrained(d)
  d = write(lambda t: t.update({"ernie.layers.1.mlp.experts.8.down_proj.weight": np.zeros((16, 64), np.uint16)}))
  with pytest.raises(CheckpointError, match=r"unexpected tensor 'ernie\.layers\.1\.mlp\.experts\.8\..*8 experts"):
    ernie_jax.from_pretrained(d)
  d = write(lambda t: t.update({"ernie.layers.1.mlp.gate.weight": np.zeros((64, 4), np.int32)}))
  with pytest.raises(CheckpointError, match=r"mlp\.gate\.weight' has dtype I32; expected F32, BF16, F16 or U16"):
    ernie_jax.from_pretrained(d)
  monkeypatch.undo()
  d = write(edit_config=lambda c: c.pop("freq_allocation"))
  with pytest.raises(ConfigError, match="'freq_allocation'"):
    ernie_jax.from_pretrained(d)
  d = write(edit_config=lambda c: c["vision_config"].pop("num_heads"))
  with pytest.raises(ConfigError, match=r"'vision_config\.num_heads'"):
    ernie_jax.from_pretrained(d)
  d = write(edit_config=lambda c: c.update(pixel_hidden_size=48))
  with pytest.raises(ConfigError, match="'pixel_hidden_size'"):
    ernie_jax.from_pretrained(d)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_loads_onto_a_mesh(ckpts):
  from ernie_jax.parallel import DEFAULT_RULES, MeshConfig, logical_to_spec, make_mesh

  _, hf_dir, paddle_dir = ckpts["bf16"]
  mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2))
  model = ernie_jax.from_pretrained(paddle_dir, mesh=mesh)
  for p, var in nnx.to_flat_state(nnx.state(model)):
    want = logical_to_spec(var.get_metadata()["out_sharding"], var.shape, DEFAULT_RULES, mesh)
    assert var[...].sharding.spec == want, p
  assert model.groups[1].blocks.layers[0].mlp.vision_experts.gate[...].sharding.spec[1] == "expert"
  theirs = _flat(ernie_jax.from_pretrained(hf_dir))
  for p, a in _flat(model).items():
    np.testing.assert_array_equal(a, theirs[p], err_msg=p)


def test_vl_424b_preset_validates_and_counts_424b():
  cfg = VLConfig.ernie45_vl_424b_a47b()
  assert cfg.layer_kinds.count("moe") == 51 and cfg.moe_k == 8 and cfg.mrope_section == (22, 22, 20)
  abstract = nnx.eval_shape(lambda: Ernie45VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
  total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert abs(total - 424e9) <= 0.05 * 424e9, total / 1e9
  with pytest.raises(ConfigError, match="moe_k"):
    VLConfig.ernie45_vl_424b_a47b(moe_k=65)
