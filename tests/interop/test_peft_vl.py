"""PEFT adapters <-> our LoRA on ERNIE 4.5 VL, against peft 0.21 on transformers'
`Ernie4_5_VLMoeForConditionalGeneration` (tiny random model of `tests.vl_reference`, one image + text).

Both directions with golden logits from transformers + peft: our adapters (every LoRA group of the VL
model, and a mixed one with per-set ranks) load in peft on transformers' model read from our HF export
of the base; peft-made adapters (random non-zero A and B, `init_lora_weights=False`) load here. The
text-model cases and the error lines shared with them are in `test_peft.py`.
"""

from __future__ import annotations

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ernie_jax
from ernie_jax.config.lora import LoraConfig
from ernie_jax.interop import convert
from ernie_jax.interop import peft_format as pf
from ernie_jax.interop.peft import load_peft_adapter, save_peft_adapter
from ernie_jax.model.lora import lora_config
from ernie_jax.model.state import flat_state
from ernie_jax.model.vl import forward
from tests import vl_reference as ref
from tests.helpers import rel
from tests.interop.test_peft import lora_model, read_adapter

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

GRID = (1, 4, 4)
IDS = np.array([[5] + ref.image_span(GRID) + [6, 7, 8, 9]])
PIXELS = ref.pixels([GRID], seed=8)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
RESAMPLER = [f"{m}_linear.{f}" for m in ("spatial", "temporal") for f in ("fc1", "fc2")]
# peft LoraConfig kwargs of the adapters peft makes
PEFT_CASES = {
  # everything peft can adapt that we can: nested gate_up (inner) / down (outer) wrappers on both expert sets
  "all": dict(r=2, lora_alpha=4, target_modules=ATTN + ["gate_proj", "up_proj", "down_proj"] + RESAMPLER,
              target_parameters=["gate_up_proj", "down_proj"]),
  # one parameter per expert set (not nested), shared experts only, rsLoRA, a rank / alpha pattern
  "mixed": dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["o_proj", "shared_experts.down_proj"],
                target_parameters=["text_moe.experts.down_proj", "vision_moe.experts.gate_up_proj"],
                rank_pattern={"o_proj": 2}, alpha_pattern={"vision_moe.experts.gate_up_proj": 7.0}),
}
OUR_CASES = {
  "all": LoraConfig(rank=2, alpha=3.0, targets=("attn", "mlp", "shared", "text_experts", "vision_experts",
                                                 "resampler")),
  # text gate_up at rank 2r (gate + up), vision gate_up at rank r (up only): per-set rank patterns
  "mixed": LoraConfig(rank=2, alpha=5.0, rslora=True, dropout=0.1,
                      targets=("attn.v", "shared", "text_experts", "vision_experts.up", "vision_experts.down",
                               "temporal_linear.fc2")),
}


def hf_logits(model) -> np.ndarray:
  return ref.forward(model, IDS, pixel_values=PIXELS, image_grid=[GRID])


def ours(model) -> np.ndarray:
  return np.asarray(forward(model, IDS, pixel_values=PIXELS, image_grid_thw=[GRID]).logits)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """transformers' base model, its checkpoint, and transformers' model read from our HF export of it."""
  d = tmp_path_factory.mktemp("peft_vl")
  torch_model = ref.build(seed=5)
  torch_model.save_pretrained(str(d / "hf"))
  convert.export_hf(ernie_jax.from_pretrained(d / "hf"), d / "ours")
  from_ours = transformers.Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(
    str(d / "ours"), dtype=torch.float32).eval()
  return {"torch": torch_model, "hf": str(d / "hf"), "from_ours": from_ours, "dir": d}


@pytest.fixture(scope="module")
def peft_made(base):
  """{case: (adapter dir, transformers + peft logits)} for adapters made and saved by peft."""
  out = {}
  for case, kw in PEFT_CASES.items():
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base["torch"]), peft.LoraConfig(init_lora_weights=False, **kw)).eval()
    pm.save_pretrained(str(base["dir"] / case))
    out[case] = (str(base["dir"] / case), hf_logits(pm))
  return out


def zeroed(model, part: str):
  """A copy of `model` whose LoRA B matrices on paths containing `part` are zero."""
  model = nnx.clone(model)
  state = nnx.state(model)
  hits = [v for p, v in flat_state(state).items() if p.endswith("_lora_b") and part in p]
  assert hits, part
  for v in hits:
    v.set_value(jnp.zeros_like(v.get_value()))
  nnx.update(model, state)
  return model


@pytest.mark.parametrize("case", list(OUR_CASES))
def test_our_vl_adapter_loaded_by_peft_gives_our_logits(base, tmp_path, case):
  """save_peft_adapter on a LoRA'd VL model -> peft.PeftModel.from_pretrained on transformers' model of our
  HF export: our logits (image + text)."""
  model = lora_model(base["hf"], OUR_CASES[case])
  logits = ours(model)
  assert rel(logits, hf_logits(base["from_ours"])) > 1e-3  # the adapter matters
  if case == "all":  # every kind of adapted module (incl. the vision experts and resampler) moves the logits
    for part in ("/attn/", "/mlp/gate", "/shared/", "/text_experts/", "/vision_experts/", "/spatial_linear/",
                 "/temporal_linear/"):
      assert rel(ours(zeroed(model, part)), logits) > 1e-4, part
  config = save_peft_adapter(model, tmp_path / "adapter")
  assert "fc1" not in config["target_modules"]  # would also adapt the vision tower's MLPs
  if case == "mixed":
    assert config["target_modules"] == ["shared_experts.down_proj", "shared_experts.gate_proj",
                                        "shared_experts.up_proj", "temporal_linear.fc2", "v_proj"]
    assert config["rank_pattern"] == {"text_moe.experts.gate_up_proj": 4} and config["lora_dropout"] == 0.0
  loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base["from_ours"]), str(tmp_path / "adapter")).eval()
  assert rel(hf_logits(loaded), logits) < 1e-5


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_vl_adapter_loaded_here_gives_peft_logits(base, peft_made, tmp_path, case):
  """A peft-made adapter applied to our VL model: transformers + peft's logits; our re-export of it loads in
  peft with the same logits."""
  adapter, reference = peft_made[case]
  model = load_peft_adapter(ernie_jax.from_pretrained(base["hf"]), adapter)
  assert lora_config(model).rslora == PEFT_CASES[case].get("use_rslora", False)
  assert rel(reference, hf_logits(base["torch"])) > 1e-3
  assert rel(ours(model), reference) < 1e-5
  save_peft_adapter(model, tmp_path / "again")
  loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base["torch"]), str(tmp_path / "again")).eval()
  assert rel(hf_logits(loaded), reference) < 1e-5


@pytest.mark.parametrize("target,match", [
  ("qkv", r"'base_model\.model\.model\.vision_tower\.blocks\.0\.attn\.qkv\.lora_A\.weight'.*a Linear that "
          r"ernie_jax's LoRA does not adapt"),
  ("resampler_model.mlp", r"module 'model\.resampler_model\.mlp' is not a LoRA-able module"),
])
def test_import_refuses_modules_our_lora_does_not_adapt(base, tmp_path, target, match):
  """peft can adapt the vision tower and the resampler's output Linear; our LoRA does not: one line."""
  pm = peft.get_peft_model(copy.deepcopy(base["torch"]), peft.LoraConfig(r=2, target_modules=[target]))
  pm.save_pretrained(str(tmp_path / "a"))
  model = ernie_jax.from_pretrained(base["hf"])
  with pytest.raises(pf.PeftFormatError, match=match) as e:
    load_peft_adapter(model, tmp_path / "a")
  assert "\n" not in str(e.value) and lora_config(model) is None


def test_import_errors_on_vl_expert_sets(base, peft_made):
  model = ernie_jax.from_pretrained(base["hf"])
  shapes = {p: tuple(v.shape) for p, v in flat_state(nnx.state(model)).items()}
  config, tensors = read_adapter(peft_made["mixed"][0])
  p = f"{pf.PREFIX}model.language_model.layers.1.mlp.vision_moe.experts"
  # vision experts: I = 16, so gate_up is [4 * 3, 64] / [32, 3 * 4]
  bad = {p + ".lora_B.weight": tensors[p + ".lora_B.weight"][:-1]}
  with pytest.raises(pf.PeftFormatError, match=r"vision_moe\.experts\.lora_B\.weight' has shape \[31, 12\], "
                                               r"expected \[32, 12\]"):
    pf.from_peft(model.config, config, {**tensors, **bad}, shapes)
  nested = {p + ".base_layer.lora_A.weight": tensors[p + ".lora_A.weight"],
            p + ".base_layer.lora_B.weight": tensors[p + ".lora_B.weight"]}
  with pytest.raises(pf.PeftFormatError, match=r"vision_moe\.experts\.base_layer' does not match target_parameters"):
    pf.from_peft(model.config, config, {**tensors, **nested}, shapes)
  text_only = {k: v for k, v in tensors.items() if "layers.2.mlp.text_moe" not in k}
  with pytest.raises(pf.PeftFormatError, match=r"no LoRA tensors for 'model\.language_model\.layers\.2\.mlp\."
                                               r"text_moe\.experts\.0\.down_proj'"):
    pf.from_peft(model.config, config, text_only, shapes)


def test_vl_peft_config_is_what_peft_writes(peft_made, tmp_path, base):
  """Our adapter_config.json for a peft-made VL adapter re-saved has peft's own module keys."""
  _, theirs = read_adapter(peft_made["all"][0])
  model = load_peft_adapter(ernie_jax.from_pretrained(base["hf"]), peft_made["all"][0])
  save_peft_adapter(model, tmp_path / "ours")
  config, ours_t = read_adapter(tmp_path / "ours")
  assert sorted(ours_t) == sorted(theirs)
  assert config["target_parameters"] == ["down_proj", "gate_up_proj"]
  assert config["target_modules"] == sorted(PEFT_CASES["all"]["target_modules"])


def test_generate_cli_with_vl_adapter(base, peft_made, capsys):
  """`python -m ernie_jax.cli.generate --checkpoint <VL> --adapter <peft dir>` (text-only prompt): the greedy
  tokens of transformers + peft (full re-forward per token)."""
  from ernie_jax.cli.generate import main

  prompt, n = [5, 6, 7, 8, 9], 3
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(base["torch"]), peft_made["mixed"][0]).eval()
  ids = list(prompt)
  for _ in range(n):
    ids.append(int(ref.forward(pm, np.array([ids]))[0, -1].argmax()))
  rc = main(["--checkpoint", base["hf"], "--adapter", peft_made["mixed"][0], "--tokens", " ".join(map(str, prompt)),
             "--max-new-tokens", str(n), "--ignore-eos", "--json"])
  out = capsys.readouterr().out
  assert rc == 0, out
  assert json.loads(out.splitlines()[0])["output_ids"] == ids[len(prompt):]
