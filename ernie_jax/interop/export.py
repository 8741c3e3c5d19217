"""Export an in-memory model (e.g. a fine-tuned one after `ernie_jax.model.lora.merge_lora`) as a
complete, loadable model directory.

`export_model(model, out_dir, format="hf" | "orbax")` writes the weights with the existing writers
(`convert.export_hf`: transformers safetensors + config.json; `orbax_io.save_model`: an Orbax checkpoint
that `ernie_jax.from_pretrained` loads) and, next to them, the tokenizer files of `tokenizer_dir` and a
generation_config.json (`interop.assets`: the given one, else the tokenizer directory's, else bos / eos /
pad ids from the model config). The directory is assembled under a temporary sibling and renamed into
place when complete (`convert.atomic_output`): nothing half-written is left behind.

A model that still carries LoRA parameters is refused: merge it first (`merge_lora`), or export the
adapter alone in PEFT's format (`ernie_jax.interop.peft.save_peft_adapter`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from flax import nnx

from ernie_jax.interop import assets, convert, orbax_io
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.model.state import flat_state

FORMATS = ("hf", "orbax")
_LORA_SUFFIXES = ("_lora_a", "_lora_b")


def export_model(model, out_dir: str | os.PathLike, *, format: str = "hf", dtype: str = "auto",
                 tokenizer_dir: str | os.PathLike | None = None,
                 generation_config: Mapping[str, Any] | str | None = None, overwrite: bool = False,
                 max_shard_bytes: int = convert.DEFAULT_SHARD_BYTES) -> dict:
  """Write `model` (ErnieForCausalLM / Ernie45VLForConditionalGeneration) to `out_dir`.

  format: "hf" (safetensors shards + config.json, transformers' layout) or "orbax". dtype: parameter
  dtype written ("auto" keeps each parameter's; "bfloat16", "float32", "float16"). tokenizer_dir: a
  directory whose tokenizer files (and generation_config.json) are copied. generation_config: a dict or a
  generation_config.json path that replaces the copied one. Returns a report dict ("format", "assets": the files
  copied besides the weights, and for HF the `export_hf` report)."""
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  if dtype not in convert.STORAGE_DTYPES:
    raise ValueError(f"dtype must be one of {convert.STORAGE_DTYPES}, got {dtype!r}")
  flat = flat_state(nnx.state(model))
  lora = sorted(p for p in flat if p.endswith(_LORA_SUFFIXES))
  if lora:
    raise CheckpointError(f"the model has LoRA parameters ('{lora[0]}' and {len(lora) - 1} more): merge them "
                          "first (ernie_jax.model.lora.merge_lora), or export the adapter with "
                          "ernie_jax.interop.peft.save_peft_adapter")
  files = assets.find(tokenizer_dir)
  copied = sorted(n for n in files if n != assets.GENERATION_CONFIG) + [assets.GENERATION_CONFIG]
  if format == "hf":
    report = convert.export_hf(model, out_dir, dtype=dtype, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                               tokenizer_dir=tokenizer_dir, generation_config=generation_config)
    return {**report, "format": "hf", "assets": copied}
  cfg = model.config
  if dtype != "auto":
    cfg = cfg.replace(param_dtype=dtype)
  with convert.atomic_output(out_dir, overwrite) as out:
    arrays = {p: v.get_value() for p, v in flat.items()}
    if dtype != "auto":
      arrays = {p: _cast(p, a, dtype) for p, a in arrays.items()}
    orbax_io.save_state(out, arrays, cfg, metadata={"source": {"format": "model", "exported_by": "export_model"}},
                        extra_files=lambda d: assets.write(d, cfg, files, generation_config))
  return {"format": "orbax", "assets": copied}


def _cast(path: str, x, dtype: str):
  """A parameter cast to the storage dtype (the router weight and correction bias stay fp32)."""
  if path.endswith(convert._FP32_PARAMS) or not hasattr(x, "dtype") or not str(x.dtype).startswith(("float", "bfloat")):
    return x
  return x.astype(dtype)
