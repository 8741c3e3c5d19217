"""PEFT LoRA adapters: save a LoRA'd model's adapter in peft's format, load a peft adapter into a model.

`save_peft_adapter(model, out_dir)` writes `adapter_config.json` + `adapter_model.safetensors` as peft's
`save_pretrained` does for transformers' ERNIE 4.5 classes (`Ernie4_5ForCausalLM`,
`Ernie4_5_MoeForCausalLM`, `Ernie4_5_VLMoeForConditionalGeneration`), so
`peft.PeftModel.from_pretrained(hf_model, out_dir)` reproduces our logits; `load_peft_adapter(model,
adapter_dir)` applies a peft-made adapter to one of our base models (`ernie_jax.model.lora.apply_lora` with
the adapter's rank / alpha / rsLoRA / dropout / targets) and fills its values. The layouts, what PEFT can
represent on ERNIE (q/k/v/o everywhere, the dense MLP of dense models, the routed experts of MoE models;
on VL models also the dense-layer MLPs, shared experts, text and vision experts and the resampler; not
the shared experts or the dense-layer MLPs of MoE text models) and the peft features refused on import
are described in `ernie_jax.interop.peft_format` (names per model family: `peft_layouts`).

Writes are atomic (`convert.atomic_output`); every error is one line naming the tensor, module or field.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from ernie_jax.config.lora import LoraConfig
from ernie_jax.interop import convert
from ernie_jax.interop import peft_format as pf
from ernie_jax.interop import safetensors_writer as stw
from ernie_jax.interop.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PeftFormatError
from ernie_jax.interop.safetensors_io import SafetensorsReader
from ernie_jax.model.lora import apply_lora, lora_config, lora_targets, scale
from ernie_jax.model.state import flat_state

__all__ = ["PeftFormatError", "load_peft_adapter", "save_peft_adapter"]


def _settings(cfg: LoraConfig) -> pf.Settings:
  s = scale(cfg)
  alpha = s * (np.sqrt(cfg.rank) if cfg.rslora else cfg.rank)
  alpha = float(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else float(alpha)
  return pf.Settings(cfg.rank, alpha, cfg.rslora, cfg.dropout)


def save_peft_adapter(model, out_dir: str | os.PathLike, *, base_model_name_or_path: str = "",
                      overwrite: bool = False) -> dict:
  """Write the LoRA adapter of `model` (after `apply_lora` / training) in peft's format. Returns the
  adapter config written. Raises PeftFormatError naming the LoRA targets PEFT cannot represent."""
  cfg = model.config
  lcfg = lora_config(model)
  if lcfg is None:
    raise PeftFormatError("the model has no LoRA parameters (apply_lora first)")
  flat = flat_state(nnx.state(model))
  lora = {p: np.asarray(jax.device_get(v.get_value())) for p, v in flat.items()
          if p.endswith(("_lora_a", "_lora_b"))}
  dtypes = {np.dtype(x.dtype) for x in lora.values()}
  tensors, config = pf.to_peft(cfg, lora, _settings(lcfg), base_model_name_or_path=base_model_name_or_path)
  dt = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
  tensors = {n: x.astype(dt) for n, x in tensors.items()}
  specs = [stw.TensorSpec(n, stw.tag_of(x.dtype), tuple(x.shape)) for n, x in sorted(tensors.items())]
  with convert.atomic_output(out_dir, overwrite) as out:
    os.makedirs(out)
    stw.write_file(os.path.join(out, ADAPTER_WEIGHTS), specs, tensors.__getitem__, {"format": "pt"})
    with open(os.path.join(out, ADAPTER_CONFIG), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
  return config


def read_peft_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config, {tensor name: array}) of a peft adapter directory; unsupported peft features are
  refused from the config before any tensor is read."""
  d = os.path.abspath(os.path.expanduser(os.fspath(adapter_dir)))
  cfg_path, weights = os.path.join(d, ADAPTER_CONFIG), os.path.join(d, ADAPTER_WEIGHTS)
  if not os.path.isfile(cfg_path):
    raise PeftFormatError(f"{d} has no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
  try:
    with open(cfg_path) as f:
      config = json.load(f)
  except ValueError as e:
    raise PeftFormatError(f"{cfg_path}: not valid JSON ({e})") from None
  if not isinstance(config, dict):
    raise PeftFormatError(f"{cfg_path}: not a JSON object")
  pf.check_config(config, cfg_path)
  if not os.path.isfile(weights):
    other = "adapter_model.bin (pickle: re-save it with safe_serialization=True)" \
      if os.path.isfile(os.path.join(d, "adapter_model.bin")) else "no weights file"
    raise PeftFormatError(f"{d} has no {ADAPTER_WEIGHTS} ({other})")
  reader = SafetensorsReader(weights)
  try:
    tensors = {n: reader.get(n) for n in reader.keys()}
  finally:
    reader.close()
  return config, tensors


def load_peft_adapter(model, adapter_dir: str | os.PathLike, *, rngs: nnx.Rngs | None = None):
  """Apply the peft LoRA adapter in `adapter_dir` to the base `model` (in place; returned).

  The model gets LoRA with the adapter's targets, rank (the largest of the adapter; smaller ones are
  zero-padded), alpha (giving the scale most of its targets share; others have it folded into B),
  rsLoRA and dropout, and the adapter's values. Names and shapes are checked against the model first."""
  if lora_config(model) is not None:
    raise PeftFormatError("the model already has LoRA parameters: load the adapter into a base model")
  cfg = model.config
  config, tensors = read_peft_adapter(adapter_dir)
  where = os.path.join(os.fspath(adapter_dir), ADAPTER_WEIGHTS)
  shapes = {p: tuple(v.shape) for p, v in flat_state(nnx.state(model)).items()}
  settings, targets, arrays = pf.from_peft(cfg, config, tensors, shapes, where=where)
  lcfg = LoraConfig(rank=settings.rank, alpha=settings.alpha, rslora=settings.rslora,
                    dropout=float(config.get("lora_dropout") or 0.0), targets=targets)
  apply_lora(model, lcfg, rngs=rngs if rngs is not None else nnx.Rngs(0))
  applied = set(lora_targets(model))
  ours = {p[:-len("_lora_a")] for p in arrays if p.endswith("_lora_a")}
  if applied != ours:
    extra = sorted(applied - ours) or sorted(ours - applied)
    raise PeftFormatError(f"internal error: LoRA targets {targets} applied to {extra[0]}, which the adapter "
                          f"{'does not cover' if applied - ours else 'has but the model did not get'}")
  state = nnx.state(model)
  flat = flat_state(state)
  for path, value in arrays.items():
    var = flat[path]
    old = var.get_value()
    if tuple(old.shape) != value.shape:
      raise PeftFormatError(f"internal error: LoRA parameter '{path}' is {list(old.shape)}, adapter gives "
                            f"{list(value.shape)}")
    var.set_value(jax.device_put(value.astype(old.dtype), old.sharding))
  nnx.update(model, state)
  return model
