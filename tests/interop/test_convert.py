"""Converters: HF / Paddle -> Orbax -> logits equal transformers'; Orbax -> HF bit-exact; CLIs.

Paddle fixtures are built from HF checkpoints by the layout rules of spec §5.4, written here
independently of `ernie_jax.interop.paddle` (prefix `ernie.`, Linear weights [in, out], fused
qkv [Q|K|V] or grouped per KV head, fused up_gate [gate|up], bf16 as U16 bits or BF16, fp32
router and correction bias, untied lm_head [H, V]).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import ernie_jax
from ernie_jax.cli.verify import verify
from ernie_jax.interop import hf_config
from ernie_jax.interop import convert, layouts, orbax_io, sources, stream
from ernie_jax.interop import safetensors_writer as stw
from ernie_jax.interop.safetensors_io import SafetensorsReader
from tests.helpers import REPO_ROOT
from tests import hf_reference as ref

ROOT = REPO_ROOT
TOKENS = ref.random_tokens(128, (2, 12), seed=7)
FP32_KEYS = ("mlp.gate.weight", "e_score_correction_bias")


# --------------------------------------------------------------------------------------------------
# Fixture builders
def read_all(path) -> dict[str, np.ndarray]:
  r = SafetensorsReader(path)
  try:
    return {n: r.get(n) for n in r.keys()}
  finally:
    r.close()


def write_dir(path, tensors: dict[str, np.ndarray], config: dict, shard_bytes=1 << 40) -> str:
  os.makedirs(path, exist_ok=True)
  specs = [stw.TensorSpec(n, stw.tag_of(x.dtype), tuple(x.shape)) for n, x in tensors.items()]
  stw.write_checkpoint(str(path), specs, tensors.__getitem__, shard_bytes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return str(path)


def to_bf16_hf(src, dst) -> str:
  """An HF checkpoint as released: bf16, with the router and correction bias in fp32."""
  tensors = {n: (x if n.endswith(FP32_KEYS) else x.astype(ml_dtypes.bfloat16)) for n, x in read_all(src).items()}
  cfg = json.load(open(os.path.join(src, "config.json")))
  return write_dir(dst, tensors, {**cfg, "dtype": "bfloat16"})


def hf_to_paddle(src, dst, *, variant="native", u16=True) -> str:
  """Apply the Paddle layout rules to an HF checkpoint directory."""
  hf = read_all(src)
  cfg = json.load(open(os.path.join(src, "config.json")))
  prefix = "ernie." if variant == "native" else "model."
  nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  d, h = cfg["head_dim"], cfg["hidden_size"]
  out = {}
  for name, x in hf.items():
    base = prefix + name[len("model."):] if name.startswith("model.") else name
    if name.endswith("self_attn.q_proj.weight"):
      p = name[: -len("q_proj.weight")]
      q, k, v = (hf[p + f"{t}_proj.weight"].T for t in "qkv")
      if variant == "native":
        qkv = np.concatenate([q, k, v], axis=-1)
      else:  # grouped per KV head: [q heads of group g, k_g, v_g] for each g
        g = nh // nkv
        qkv = np.concatenate([q.reshape(h, nkv, g, d), k.reshape(h, nkv, 1, d), v.reshape(h, nkv, 1, d)],
                             axis=2).reshape(h, -1)
      out[base.replace("q_proj", "qkv_proj")] = qkv
    elif name.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")):
      continue
    elif name.endswith("gate_proj.weight"):
      p = name[: -len("gate_proj.weight")]
      out[base.replace("gate_proj", "up_gate_proj")] = np.concatenate([x.T, hf[p + "up_proj.weight"].T], axis=-1)
    elif name.endswith(("down_proj.weight", "o_proj.weight", "mlp.gate.weight", "mtp_linear_proj.0.weight")) \
        or name == "lm_head.weight":
      out[base] = x.T
    else:
      out[base] = x
  if variant == "paddleformers" and cfg.get("tie_word_embeddings", True):
    out["lm_head.weight"] = hf["model.embed_tokens.weight"]  # written even when tied
  out = {n: np.ascontiguousarray(x) for n, x in out.items()}
  if u16:
    out = {n: x.view(np.uint16) if x.dtype == ml_dtypes.bfloat16 else x for n, x in out.items()}
  pcfg = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "model_type", "dtype")}
  pcfg.update(rope_theta=cfg["rope_parameters"]["rope_theta"], moe_use_aux_free=True,
              dtype="bfloat16", model_type=cfg["model_type"])
  if variant == "paddleformers":
    pcfg["source"] = "paddle"
  return write_dir(dst, out, pcfg)


def hf_logits(path) -> np.ndarray:
  import torch
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  return ref.logits(model, TOKENS)


def assert_close(ours, theirs, tol=1e-5):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert np.abs(ours - theirs).max() <= tol * np.abs(theirs).max(), np.abs(ours - theirs).max()


def ours_logits(path, **kw):
  return ernie_jax.from_pretrained(path, **kw)(jnp.asarray(TOKENS)).logits


def no_leftovers(parent, allowed):
  """Nothing but `allowed` in `parent`: no partial output, no temporary directories."""
  assert sorted(os.listdir(parent)) == sorted(allowed), os.listdir(parent)


def load_cli(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", "convert", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """fp32 HF dense (untied) and MoE, a bf16 MoE, and their Paddle renderings."""
  base = tmp_path_factory.mktemp("src")
  out = {}
  out["dense"] = ref.save(ref.build("dense", seed=4, tie_word_embeddings=False), base / "dense")
  out["moe"] = ref.save(ref.build("moe", seed=3), base / "moe")
  out["moe_bf16"] = to_bf16_hf(out["moe"], base / "moe_bf16")
  out["dense_bf16"] = to_bf16_hf(out["dense"], base / "dense_bf16")
  out["paddle_u16"] = hf_to_paddle(out["moe_bf16"], base / "paddle_u16", u16=True)
  out["paddle_bf16"] = hf_to_paddle(out["moe_bf16"], base / "paddle_bf16", u16=False)
  out["paddle_pf"] = hf_to_paddle(out["moe_bf16"], base / "paddle_pf", variant="paddleformers", u16=False)
  out["paddle_dense"] = hf_to_paddle(out["dense_bf16"], base / "paddle_dense", u16=True)
  return out


@pytest.fixture(scope="module")
def reference(ckpts):
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = hf_logits(ckpts[name])
    return cache[name]

  return get


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_hf_to_orbax_logits_match_transformers(ckpts, reference, tmp_path, kind):
  out = tmp_path / "orbax"
  report = convert.convert_to_orbax(ckpts[kind], out)
  assert report.format == "hf" and report.storage_dtype == "float32" and not report.lossy
  assert sources.detect_format(out) == "orbax"
  info = orbax_io.read_info(out)
  assert info["model_config"]["num_hidden_layers"] == report.config.num_hidden_layers
  assert info["source"]["format"] == "hf"
  assert_close(ours_logits(out), reference(kind))
  no_leftovers(tmp_path, ["orbax"])


def test_streaming_blocks_are_bounded(ckpts, reference, tmp_path):
  """With a tiny block budget every expert / layer slice is its own block and storage chunk."""
  reader = SafetensorsReader(ckpts["moe"])
  cfg = hf_config.read_text(ckpts["moe"])
  params = convert.abstract_params(cfg)
  reads = layouts.check_source(reader, layouts.hf_layout(), cfg, {p: s for p, (s, _) in params.items()})
  conv = stream.Conversion(reader, layouts.hf_layout(), reads, params, block_bytes=1)
  largest_slot = max(int(np.prod(s[len(r.slots[0].index):])) * 4 for r in reads.values()
                     for s in [params[r.slots[0].path][0]])
  sizes = [b.nbytes for _, _, b in conv.blocks()]
  assert max(sizes) == largest_slot
  assert len(sizes) == len(reads)  # one block per source tensor
  reader.close()

  out = tmp_path / "orbax"
  convert.convert_to_orbax(ckpts["moe"], out, block_bytes=1)
  reader = orbax_io.OrbaxReader(out)
  gate = reader.arrays["groups/1/blocks/layers/0/mlp/experts/gate"][1]
  assert gate.shape == (2, 8, 64, 32) and gate.storage.chunk_shape == (1, 1, 64, 32)
  reader.close()
  assert_close(ours_logits(out), reference("moe"))


@pytest.mark.parametrize("name", ["paddle_u16", "paddle_bf16", "paddle_pf", "paddle_dense"])
def test_paddle_to_orbax_logits_match_transformers(ckpts, reference, tmp_path, name):
  assert sources.detect_format(ckpts[name]) == "paddle"
  out = tmp_path / "orbax"
  report = convert.convert_to_orbax(ckpts[name], out)
  variant = "paddleformers" if name == "paddle_pf" else "native"
  assert report.format == f"paddle/{variant}" and report.storage_dtype == "bfloat16"
  hf_name = "dense_bf16" if name == "paddle_dense" else "moe_bf16"
  assert_close(ours_logits(out), reference(hf_name))
  # the same directory loads directly too, and the weights are bit-identical to the HF ones
  ours = ernie_jax.from_pretrained(ckpts[name], param_dtype="bfloat16")
  theirs = ernie_jax.from_pretrained(ckpts[hf_name], param_dtype="bfloat16")
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(ours)), nnx.to_flat_state(nnx.state(theirs))):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))


def test_u16_is_bit_cast_not_value_cast(ckpts, tmp_path):
  """A U16 tensor holds bf16 bits: 0x3F80 is 1.0 (a value cast would give 16256.0)."""
  path = tmp_path / "p"
  shutil.copytree(ckpts["paddle_u16"], path)
  tensors = read_all(path)
  tensors["ernie.norm.weight"] = np.full(tensors["ernie.norm.weight"].shape, 0x3F80, np.uint16)
  write_dir(path, tensors, json.load(open(path / "config.json")))
  model = ernie_jax.from_pretrained(path)
  np.testing.assert_array_equal(np.asarray(model.norm.weight[...]), 1.0)


@pytest.mark.parametrize("name", ["moe", "moe_bf16", "dense"])
def test_round_trip_is_bit_exact(ckpts, tmp_path, name):
  convert.convert_to_orbax(ckpts[name], tmp_path / "orbax")
  convert.export_hf(tmp_path / "orbax", tmp_path / "hf")
  a, b = read_all(ckpts[name]), read_all(tmp_path / "hf")
  assert sorted(a) == sorted(b)
  for n in a:
    assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
    assert a[n].tobytes() == b[n].tobytes(), n
  cfg = json.load(open(tmp_path / "hf" / "config.json"))
  assert cfg["dtype"] == ("bfloat16" if "bf16" in name else "float32")
  assert hf_config.read_text(tmp_path / "hf") == hf_config.read_text(ckpts[name])


def test_export_loads_in_transformers_sharded(ckpts, tmp_path):
  """Orbax -> HF in several shards with an index; transformers' logits equal ours."""
  convert.convert_to_orbax(ckpts["moe_bf16"], tmp_path / "orbax")
  report = convert.export_hf(tmp_path / "orbax", tmp_path / "hf", max_shard_bytes=20_000)
  assert len(report["files"]) > 2 and os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
  result = verify(tmp_path / "orbax", tmp_path / "hf")
  assert result.ok and result.rel <= 1e-5 and result.top1 == 1.0, result


def test_export_in_memory_model_and_save_model(tmp_path):
  """A model that never saw a checkpoint (bf16 params, no correction bias): save_model / load_state
  round trip, and export straight from memory (zeros for the correction bias)."""
  cfg = ernie_jax.ModelConfig.tiny_moe(param_dtype="bfloat16", moe_use_correction_bias=False)
  model = ernie_jax.ErnieForCausalLM(cfg, rngs=nnx.Rngs(1))
  orbax_io.save_model(model, tmp_path / "orbax")
  loaded = ernie_jax.from_pretrained(tmp_path / "orbax", param_dtype="bfloat16")
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded))):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))
  convert.export_hf(model, tmp_path / "hf")
  tensors = read_all(tmp_path / "hf")
  np.testing.assert_array_equal(tensors["model.layers.1.mlp.moe_statics.e_score_correction_bias"], 0)
  assert tensors["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
  assert tensors["model.layers.1.mlp.gate.weight"].dtype == np.float32
  ref_logits = hf_logits(tmp_path / "hf")
  ours = ernie_jax.from_pretrained(tmp_path / "orbax")(jnp.asarray(TOKENS)).logits
  assert_close(ours, ref_logits)


def test_orbax_loads_onto_a_mesh(ckpts, reference, tmp_path):
  from ernie_jax.parallel import DEFAULT_RULES, MeshConfig, logical_to_spec, make_mesh

  convert.convert_to_orbax(ckpts["moe"], tmp_path / "orbax")
  mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2))
  model = ernie_jax.from_pretrained(tmp_path / "orbax", mesh=mesh)
  for p, var in nnx.to_flat_state(nnx.state(model)):
    want = logical_to_spec(var.get_metadata()["out_sharding"], var.shape, DEFAULT_RULES, mesh)
    assert var[...].sharding.spec == want, p
  tokens = np.concatenate([TOKENS, TOKENS])  # batch 4: divisible by data x expert
  with jax.set_mesh(mesh):
    logits = nnx.jit(lambda m, t: m(t).logits)(model, jnp.asarray(tokens))
  assert_close(logits, np.concatenate([reference("moe")] * 2))


def test_mtp_tensors_round_trip(ckpts, tmp_path):
  src = tmp_path / "src"
  tensors = read_all(ckpts["moe"])
  cfg = json.load(open(os.path.join(ckpts["moe"], "config.json")))
  rs = np.random.RandomState(0)
  h = cfg["hidden_size"]
  tensors.update({"model.mtp_emb_norm.0.weight": rs.rand(h).astype(np.float32),
                  "model.mtp_hidden_norm.0.weight": rs.rand(h).astype(np.float32),
                  "model.mtp_linear_proj.0.weight": rs.randn(h, 2 * h).astype(np.float32)})
  tensors.update({k.replace("model.layers.0.", "model.mtp_block.0."): v for k, v in list(tensors.items())
                  if k.startswith("model.layers.0.")})
  write_dir(src, tensors, {**cfg, "num_nextn_predict_layers": 1})
  convert.convert_to_orbax(src, tmp_path / "orbax")
  assert orbax_io.load_config(tmp_path / "orbax").num_mtp_layers == 1
  convert.export_hf(tmp_path / "orbax", tmp_path / "hf")
  back = read_all(tmp_path / "hf")
  assert sorted(back) == sorted(tensors)
  for n in tensors:
    assert back[n].tobytes() == tensors[n].tobytes(), n
  # and from Paddle: `ernie.mtp_*` with fused tensors
  bf16 = to_bf16_hf(src, tmp_path / "src_bf16")
  paddle = hf_to_paddle(bf16, tmp_path / "paddle")
  assert "ernie.mtp_block.0.self_attn.qkv_proj.weight" in read_all(paddle)
  a = ernie_jax.from_pretrained(paddle, param_dtype="bfloat16")
  b = ernie_jax.from_pretrained(bf16, param_dtype="bfloat16")
  np.testing.assert_array_equal(np.asarray(a.mtp[0].proj[...]), np.asarray(b.mtp[0].proj[...]))
  np.testing.assert_array_equal(np.asarray(a.mtp[0].block.attn.k[...]), np.asarray(b.mtp[0].block.attn.k[...]))


def test_dtype_option_and_lossy_flag(ckpts, tmp_path):
  r = convert.convert_to_orbax(ckpts["moe"], tmp_path / "a", dtype="bfloat16")
  assert r.storage_dtype == "bfloat16" and r.lossy
  reader = orbax_io.OrbaxReader(tmp_path / "a")
  assert reader.dtype("embed") == ml_dtypes.bfloat16
  assert reader.dtype("groups/1/blocks/layers/0/mlp/router/kernel") == np.float32
  reader.close()
  r = convert.convert_to_orbax(ckpts["moe_bf16"], tmp_path / "b", dtype="float32")
  assert r.storage_dtype == "float32" and not r.lossy


def test_pickle_inputs(ckpts, tmp_path, reference):
  import torch

  src = tmp_path / "bin"  # what older transformers wrote with safe_serialization=False
  src.mkdir()
  shutil.copy(os.path.join(ckpts["moe"], "config.json"), src)
  torch.save({n: torch.from_numpy(x) for n, x in read_all(ckpts["moe"]).items()}, src / "pytorch_model.bin")
  with pytest.raises(convert.CheckpointError, match=r"pickle.*--allow-pickle"):
    convert.convert_to_orbax(src, tmp_path / "out")
  no_leftovers(tmp_path, ["bin"])
  convert.convert_to_orbax(src, tmp_path / "out", allow_pickle=True)
  assert_close(ours_logits(tmp_path / "out"), reference("moe"))

  pd = tmp_path / "pd"
  pd.mkdir()
  shutil.copy(os.path.join(ckpts["paddle_u16"], "config.json"), pd)
  (pd / "model_state.pdparams").write_bytes(b"not really a pickle")
  assert sources.detect_format(pd) == "paddle"
  with pytest.raises(convert.CheckpointError, match=r"model_state\.pdparams.*pickle"):
    convert.convert_to_orbax(pd, tmp_path / "out2")
  try:
    import paddle  # noqa: F401
  except ImportError:
    with pytest.raises(convert.CheckpointError, match="needs paddlepaddle"):
      convert.convert_to_orbax(pd, tmp_path / "out2", allow_pickle=True)
  assert not os.path.exists(tmp_path / "out2")


# --------------------------------------------------------------------------------------------------
# CLIs (in process, plus one real subprocess)
def test_cli_hf_to_orbax_verify_and_back(ckpts, tmp_path, capsys):
  to_orbax, to_hf = load_cli("hf_to_orbax"), load_cli("orbax_to_hf")
  rc = to_orbax.main_to_orbax("hf", "", ["--input", ckpts["moe_bf16"], "--output", str(tmp_path / "o"),
                                         "--verify", "--quiet"])
  out = capsys.readouterr().out
  assert rc == 0 and "verify: max |Δ logits|" in out and "OK" in out
  rc = to_hf.main_to_hf("", ["--input", str(tmp_path / "o"), "--output", str(tmp_path / "h"), "--verify",
                             "--max-shard-size", "30KB", "--quiet"])
  assert rc == 0 and "OK" in capsys.readouterr().out
  # output exists: refused, then replaced with --overwrite
  rc = to_hf.main_to_hf("", ["--input", str(tmp_path / "o"), "--output", str(tmp_path / "h"), "--quiet"])
  assert rc == 1 and "already exists" in capsys.readouterr().err
  rc = to_hf.main_to_hf("", ["--input", str(tmp_path / "o"), "--output", str(tmp_path / "h"), "--quiet",
                             "--overwrite"])
  assert rc == 0
  no_leftovers(tmp_path, ["h", "o"])


def test_cli_paddle_to_orbax_verify(ckpts, tmp_path, capsys):
  cli = load_cli("paddle_to_orbax")
  rc = cli.main_to_orbax("paddle", "", ["--input", ckpts["paddle_u16"], "--output", str(tmp_path / "o"),
                                        "--verify", "--quiet"])
  assert rc == 0 and "OK" in capsys.readouterr().out
  # the wrong tool for the format says which one to use
  rc = cli.main_to_orbax("paddle", "", ["--input", ckpts["moe"], "--output", str(tmp_path / "x")])
  assert rc == 1 and "use hf_to_orbax.py" in capsys.readouterr().err
  no_leftovers(tmp_path, ["o"])


def test_cli_verify_failure_writes_nothing(ckpts, tmp_path, capsys):
  """Rounding fp32 weights to bf16 cannot meet a zero tolerance: exit 3, no output."""
  cli = load_cli("hf_to_orbax")
  rc = cli.main_to_orbax("hf", "", ["--input", ckpts["moe"], "--output", str(tmp_path / "o"), "--dtype",
                                    "bfloat16", "--verify", "--tolerance", "0", "--quiet"])
  captured = capsys.readouterr()
  assert rc == 3 and "FAILED" in captured.out and "verification FAILED" in captured.err
  no_leftovers(tmp_path, [])


def test_cli_subprocess_help_and_exit_status(ckpts, tmp_path):
  env = {**os.environ, "PYTHONPATH": ""}  # the scripts find the package themselves
  for name in ("hf_to_orbax", "paddle_to_orbax", "orbax_to_hf"):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert", f"{name}.py"), "--help"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and "--overwrite" in p.stdout and "--verify" in p.stdout, p.stderr
  (tmp_path / "exists").mkdir()
  p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert", "hf_to_orbax.py"),
                      "--input", ckpts["moe"], "--output", str(tmp_path / "exists")],
                     capture_output=True, text=True, env=env, timeout=120)
  assert p.returncode == 1 and "already exists" in p.stderr
  assert os.listdir(tmp_path / "exists") == []
