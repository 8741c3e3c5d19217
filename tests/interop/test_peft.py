"""PEFT adapters <-> our LoRA, against peft 0.21 on transformers' ERNIE 4.5 classes.

The golden references are peft's own: adapters made by `get_peft_model(..., init_lora_weights=False)`
(random non-zero A and B) and saved with `save_pretrained`, and the logits of peft models on
transformers. The mapping (`peft_format`) is checked on its own (our export of a peft adapter loads in peft with its
logits; a transformers-4 per-expert adapter merged into our weights with numpy gives peft's logits), then
the model-level API (`interop.peft`) on LoRA'd models, and the merged export.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ernie_jax
from ernie_jax.config.lora import LoraConfig
from ernie_jax.interop import peft_format as pf
from ernie_jax.interop.export import export_model
from ernie_jax.interop.peft import load_peft_adapter, save_peft_adapter
from ernie_jax.interop import safetensors_writer as stw
from ernie_jax.interop.safetensors_io import CheckpointError, SafetensorsReader
from ernie_jax.model.lora import apply_lora, lora_config, merge_lora
from ernie_jax.model.state import flat_state
from tests import hf_reference as ref
from tests.helpers import rel

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TOKENS = ref.random_tokens(128, (2, 10), seed=21)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
# name -> (model kind, peft LoraConfig kwargs)
PEFT_CASES = {
  "dense": ("dense", dict(r=4, lora_alpha=8, target_modules=ATTN + ["gate_proj", "up_proj", "down_proj"],
                          rank_pattern={"o_proj": 2}, alpha_pattern={"v_proj": 3.0})),
  # what users write: peft itself turns gate/up/down_proj into the fused routed experts (rank 2r gate_up)
  "moe": ("moe", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])),
  "moe_params": ("moe", dict(r=3, lora_alpha=5, use_rslora=True, target_modules=ATTN,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
  "moe_down_only": ("moe", dict(r=2, lora_alpha=4, target_modules=["k_proj"],
                                target_parameters=["mlp.experts.down_proj"])),
}
SEEDS = {"dense": 4, "moe": 3}


def base_hf(kind):
  return ref.build(kind, seed=SEEDS[kind])


def peft_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


def read_adapter(d) -> tuple[dict, dict[str, np.ndarray]]:
  r = SafetensorsReader(os.path.join(d, pf.ADAPTER_WEIGHTS))
  try:
    tensors = {n: r.get(n) for n in r.keys()}
  finally:
    r.close()
  with open(os.path.join(d, pf.ADAPTER_CONFIG)) as f:
    return json.load(f), tensors


def write_adapter(d, config, tensors) -> str:
  os.makedirs(d, exist_ok=True)
  specs = [stw.TensorSpec(n, stw.tag_of(x.dtype), tuple(x.shape)) for n, x in sorted(tensors.items())]
  stw.write_file(os.path.join(d, pf.ADAPTER_WEIGHTS), specs, tensors.__getitem__, {"format": "pt"})
  with open(os.path.join(d, pf.ADAPTER_CONFIG), "w") as f:
    json.dump(config, f)
  return str(d)


def merged(model, arrays, settings):
  """`model` with W + scale * A.B for every LoRA array pair (numpy, independent of ernie_jax.model.lora)."""
  s = pf.scale_of(settings.rank, settings.alpha, settings.rslora)
  state = nnx.state(model)
  flat = flat_state(state)
  for p in [p[:-len("_lora_a")] for p in arrays if p.endswith("_lora_a")]:
    w = np.asarray(flat[p].get_value(), np.float64)
    a, b = arrays[p + "_lora_a"].astype(np.float64), arrays[p + "_lora_b"].astype(np.float64)
    lead = a.ndim + b.ndim - 2 - w.ndim
    n = int(np.prod(w.shape[:lead]))
    delta = np.matmul(a.reshape(n, -1, a.shape[-1]), b.reshape(n, b.shape[lead], -1))
    flat[p].set_value(jnp.asarray((w + s * delta.reshape(w.shape)).astype(np.float32)))
  nnx.update(model, state)
  return model


def ours(model) -> np.ndarray:
  return np.asarray(model(jnp.asarray(TOKENS)).logits)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  d = tmp_path_factory.mktemp("peft_bases")
  return {k: ref.save(base_hf(k), d / k) for k in SEEDS}


@pytest.fixture(scope="module")
def peft_made(tmp_path_factory):
  """{case: (adapter dir, transformers + peft logits)} for adapters made and saved by peft."""
  d = tmp_path_factory.mktemp("peft_made")
  out = {}
  for case, (kind, kw) in PEFT_CASES.items():
    torch.manual_seed(0)
    pm = peft.get_peft_model(base_hf(kind), peft.LoraConfig(init_lora_weights=False, **kw)).eval()
    pm.save_pretrained(str(d / case))
    out[case] = (str(d / case), peft_logits(pm))
  return out


def shapes_of(model):
  return {p: tuple(v.shape) for p, v in flat_state(nnx.state(model)).items()}


# --------------------------------------------------------------------------------------------------
# The mapping alone
@pytest.mark.parametrize("case", ["dense", "moe", "moe_params", "moe_down_only"])
def test_our_export_of_a_peft_adapter_loads_in_peft(bases, peft_made, tmp_path, case):
  """to_peft(from_peft(x)): peft loads the result (rank 2r fused experts, rank / alpha patterns) with the
  original adapter's logits."""
  kind = PEFT_CASES[case][0]
  adapter, reference = peft_made[case]
  cfg = ernie_jax.from_pretrained(bases[kind]).config
  from ernie_jax.interop.convert import abstract_params
  shapes = {p: s for p, (s, _) in abstract_params(cfg).items()}
  settings, _, arrays = pf.from_peft(cfg, *read_adapter(adapter), shapes)
  tensors, config = pf.to_peft(cfg, arrays, settings)
  out = write_adapter(tmp_path / "ours", config, tensors)
  loaded = peft.PeftModel.from_pretrained(base_hf(kind), out).eval()
  assert rel(peft_logits(loaded), reference) < 1e-5


# --------------------------------------------------------------------------------------------------
# Errors (one line naming the tensor / module / field)
def _error(bases, tmp_path, edit, match):
  model = ernie_jax.from_pretrained(bases["dense"])
  pm = peft.get_peft_model(base_hf("dense"), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
  pm.save_pretrained(str(tmp_path / "a"))
  config, tensors = read_adapter(tmp_path / "a")
  edit(config, tensors)
  with pytest.raises(pf.PeftFormatError, match=match) as e:
    pf.from_peft(model.config, config, tensors, shapes_of(model))
  assert "\n" not in str(e.value)


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit,match", [
  (lambda c, t: t.update({Q0.replace("q_proj", "qq_proj") + ".lora_A.weight": t.pop(Q0 + ".lora_A.weight"),
                          Q0.replace("q_proj", "qq_proj") + ".lora_B.weight": t.pop(Q0 + ".lora_B.weight")}),
   r"'base_model\.model\.model\.layers\.0\.self_attn\.qq_proj\.lora_A\.weight'.*not a LoRA-able module"),
  (lambda c, t: t.update({Q0.replace("layers.0", "layers.7") + ".lora_A.weight": t[Q0 + ".lora_A.weight"],
                          Q0.replace("layers.0", "layers.7") + ".lora_B.weight": t[Q0 + ".lora_B.weight"]}),
   r"layers\.7.*num_hidden_layers=2"),
  (lambda c, t: t.update({Q0 + ".lora_B.weight": t[Q0 + ".lora_B.weight"][:-1]}),
   r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_B\.weight' has shape \[95, 2\], expected \[96, 2\]"),
  (lambda c, t: t.pop(Q0 + ".lora_B.weight"), r"q_proj\.lora_B\.weight' is missing"),
  (lambda c, t: [t.pop(Q0 + ".lora_A.weight"), t.pop(Q0 + ".lora_B.weight")],
   r"no LoRA tensors for 'model\.layers\.0\.self_attn\.q_proj'"),
  (lambda c, t: c.update(use_dora=True), r"use_dora=True is not supported"),
  (lambda c, t: c.update(bias="lora_only"), r"bias='lora_only'"),
  (lambda c, t: c.update(modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\] is not supported"),
  (lambda c, t: c.update(peft_type="IA3"), r"peft_type is 'IA3'"),
  (lambda c, t: t.update({Q0 + ".lora_magnitude_vector": np.ones(96, np.float32)}), r"DoRA magnitude"),
  (lambda c, t: c.update(rank_pattern={"q_proj": 3}), r"rank 2 but adapter_config.json gives 3"),
])
def test_import_errors_name_the_problem(bases, tmp_path, edit, match):
  _error(bases, tmp_path, edit, match)


def test_export_refuses_what_peft_cannot_represent(bases):
  """Shared experts and dense-layer MLPs of MoE models: peft 0.21 rewrites their targets into the routed
  experts, so such an adapter is refused, naming the modules (never written lossy)."""
  model = ernie_jax.from_pretrained(bases["moe"])
  shapes = shapes_of(model)
  lora = {}
  for p in ("groups/0/blocks/layers/0/attn/q", "groups/1/blocks/layers/0/mlp/shared/up"):
    w = shapes[p]
    lead = 1
    lora[p + "_lora_a"] = np.ones(w[:lead] + (w[lead],) + (2,), np.float32)
    lora[p + "_lora_b"] = np.ones(w[:lead] + (2,) + w[lead + 1:], np.float32)
  with pytest.raises(pf.PeftFormatError, match=r"model\.layers\.1\.mlp\.shared_experts\.up_proj.*cannot"):
    pf.to_peft(model.config, lora, pf.Settings(2, 4.0))


# --------------------------------------------------------------------------------------------------
# Models: save_peft_adapter / load_peft_adapter, merged export
def lora_model(base_dir, lcfg, seed=1):
  """Our model of `base_dir` with LoRA `lcfg` whose A and B are random and non-zero."""
  model = ernie_jax.from_pretrained(base_dir)
  apply_lora(model, lcfg, rngs=nnx.Rngs(seed))
  rng = np.random.RandomState(seed)
  state = nnx.state(model)
  for p, v in flat_state(state).items():
    if p.endswith(("_lora_a", "_lora_b")):
      v.set_value(jnp.asarray(rng.normal(0, 0.1, v.shape).astype(np.float32)))
  nnx.update(model, state)
  return model


OUR_CASES = {
  "dense": ("dense", LoraConfig(rank=3, alpha=5.0, targets=("attn", "mlp"))),
  "moe": ("moe", LoraConfig(rank=2, alpha=3.0, targets=("attn", "experts"))),
  "moe_rslora": ("moe", LoraConfig(rank=3, alpha=2.0, rslora=True, dropout=0.1, targets=("attn.q", "mlp.experts.up",
                                                                                         "mlp.experts.down"))),
}


@pytest.mark.parametrize("case", list(OUR_CASES))
def test_our_adapter_loaded_by_peft_gives_our_logits(bases, tmp_path, case):
  """(a) save_peft_adapter -> peft.PeftModel.from_pretrained on transformers' model: our logits."""
  kind, lcfg = OUR_CASES[case]
  model = lora_model(bases[kind], lcfg)
  logits = ours(model)
  assert rel(logits, peft_logits(base_hf(kind))) > 1e-3  # the adapter matters
  config = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=bases[kind])
  assert sorted(os.listdir(tmp_path)) == ["adapter"]
  assert sorted(os.listdir(tmp_path / "adapter")) == [pf.ADAPTER_CONFIG, pf.ADAPTER_WEIGHTS]
  assert config["peft_type"] == "LORA" and config["r"] == lcfg.rank and config["use_rslora"] == lcfg.rslora
  loaded = peft.PeftModel.from_pretrained(base_hf(kind), str(tmp_path / "adapter")).eval()
  assert rel(peft_logits(loaded), logits) < 1e-5


@pytest.mark.parametrize("case", ["dense", "moe", "moe_params", "moe_down_only"])
def test_peft_adapter_loaded_here_gives_peft_logits(bases, peft_made, case):
  """(b) a peft-made adapter applied to our model (apply_lora + values): transformers + peft's logits."""
  kind = PEFT_CASES[case][0]
  adapter, reference = peft_made[case]
  model = load_peft_adapter(ernie_jax.from_pretrained(bases[kind]), adapter)
  lcfg = lora_config(model)
  assert lcfg is not None and lcfg.rslora == PEFT_CASES[case][1].get("use_rslora", False)
  assert rel(ours(model), reference) < 1e-5
  with pytest.raises(pf.PeftFormatError, match="already has LoRA"):
    load_peft_adapter(model, adapter)


def test_merged_export_hf_and_orbax(bases, tmp_path):
  """(c) merge_lora + export_model: transformers loads the HF export with the LoRA model's logits, the
  Orbax export loads back with them; tokenizer files and generation_config.json come along."""
  import transformers

  tok = tmp_path / "tok"
  tok.mkdir()
  (tok / "tokenizer.model").write_bytes(b"\x00spm" * 10)
  (tok / "tokenizer_config.json").write_text('{"model_max_length": 128}')
  model = lora_model(bases["moe"], LoraConfig(rank=2, targets=("attn", "mlp", "shared", "experts")))
  logits = ours(model)
  with pytest.raises(CheckpointError, match="merge them first"):
    export_model(model, tmp_path / "x")
  plain = merge_lora(model)
  export_model(plain, tmp_path / "hf", tokenizer_dir=tok)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
  assert rel(ref.logits(hf_model, TOKENS), logits) < 1e-5
  export_model(plain, tmp_path / "ob", format="orbax", tokenizer_dir=tok)
  assert rel(ours(ernie_jax.from_pretrained(tmp_path / "ob")), logits) < 1e-5
  for d in ("hf", "ob"):
    assert (tmp_path / d / "tokenizer.model").read_bytes() == (tok / "tokenizer.model").read_bytes()
    gen = json.loads((tmp_path / d / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
  assert sorted(os.listdir(tmp_path)) == ["hf", "ob", "tok"]


def test_save_refuses_shared_experts_and_writes_nothing(bases, tmp_path):
  model = lora_model(bases["moe"], LoraConfig(rank=2))  # default targets include the shared experts
  with pytest.raises(pf.PeftFormatError, match=r"mlp\.shared_experts\..*_proj") as e:
    save_peft_adapter(model, tmp_path / "adapter")
  assert "\n" not in str(e.value) and "model.layers.0.mlp.gate_proj" in str(e.value)
  assert os.listdir(tmp_path) == []


def test_transformers4_per_expert_adapter(bases, tmp_path):
  """Adapters saved before transformers 5 fused the experts (`mlp.experts.E.gate_proj.lora_A.weight`):
  built from a fused peft adapter by peft's layout, peft itself loads them (its v4 -> v5 conversion) with
  the fused adapter's logits, and so does our import."""
  torch.manual_seed(1)
  pm = peft.get_peft_model(base_hf("moe"), peft.LoraConfig(
    r=3, lora_alpha=5, target_modules=ATTN, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    init_lora_weights=False)).eval()
  reference = peft_logits(pm)
  pm.save_pretrained(str(tmp_path / "fused"))
  config, t = read_adapter(tmp_path / "fused")
  n_e, inter, h, r = 8, 32, 64, 3
  v4 = {k: v for k, v in t.items() if ".mlp.experts." not in k}
  for layer in (1, 2):
    p = f"{pf.PREFIX}model.layers.{layer}.mlp.experts"
    gu_a = t[p + ".base_layer.lora_A.weight"].reshape(n_e, r, h)
    gu_b = t[p + ".base_layer.lora_B.weight"].reshape(2 * inter, r, n_e)
    dn_a, dn_b = t[p + ".lora_A.weight"].reshape(n_e, r, inter), t[p + ".lora_B.weight"].reshape(h, r, n_e)
    for e in range(n_e):
      for name, x in (("gate_proj.lora_A", gu_a[e]), ("gate_proj.lora_B", gu_b[:inter, :, e]),
                      ("up_proj.lora_A", gu_a[e]), ("up_proj.lora_B", gu_b[inter:, :, e]),
                      ("down_proj.lora_A", dn_a[e]), ("down_proj.lora_B", dn_b[:, :, e])):
        v4[f"{p}.{e}.{name}.weight"] = np.ascontiguousarray(x)
  config = {**config, "target_modules": ATTN + ["gate_proj", "up_proj", "down_proj"], "target_parameters": None,
            "rank_pattern": {}, "alpha_pattern": {}}
  write_adapter(tmp_path / "v4", config, v4)
  assert rel(peft_logits(peft.PeftModel.from_pretrained(base_hf("moe"), str(tmp_path / "v4")).eval()), reference) < 1e-5
  model = ernie_jax.from_pretrained(bases["moe"])
  settings, _, arrays = pf.from_peft(model.config, config, v4, shapes_of(model))
  assert rel(ours(merged(model, arrays, settings)), reference) < 1e-5


def test_import_errors_on_fused_experts(bases, peft_made):
  model = ernie_jax.from_pretrained(bases["moe"])
  config, tensors = read_adapter(peft_made["moe_params"][0])
  p = f"{pf.PREFIX}model.layers.1.mlp.experts"
  cases = [
    ({p + ".lora_B.weight": tensors[p + ".lora_B.weight"][:, :-1]},
     r"'base_model\.model\.model\.layers\.1\.mlp\.experts\.lora_B\.weight' has shape \[64, 23\], expected \[64, 24\]"),
    ({p + ".base_layer.lora_A.weight": tensors[p + ".base_layer.lora_A.weight"][:-1]},
     r"experts\.base_layer\.lora_A\.weight' has shape \[23, 64\], expected \[8 \* rank, in\]"),
    ({f"{p}.9.up_proj.lora_A.weight": np.zeros((3, 64), np.float32),
      f"{p}.9.up_proj.lora_B.weight": np.zeros((32, 3), np.float32)}, r"expert 9 but the model has 8 experts"),
    ({f"{pf.PREFIX}model.layers.0.mlp.experts.lora_A.weight": np.zeros((3, 64), np.float32),
      f"{pf.PREFIX}model.layers.0.mlp.experts.lora_B.weight": np.zeros((64, 3), np.float32)},
     r"layers\.0\.mlp\.experts' is not a LoRA-able module.*dense"),
  ]
  for change, match in cases:
    with pytest.raises(pf.PeftFormatError, match=match):
      pf.from_peft(model.config, config, {**tensors, **change}, shapes_of(model))
  with pytest.raises(pf.PeftFormatError, match=r"does not match target_parameters=\['mlp\.experts\.down_proj'\]"):
    pf.from_peft(model.config, {**config, "target_parameters": ["mlp.experts.down_proj"]}, tensors, shapes_of(model))
