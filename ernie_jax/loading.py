"""`from_pretrained`: build an ErnieForCausalLM (or the VL model) from a checkpoint directory.

Formats (auto-detected, or `format=`): Hugging Face safetensors directories (single file or sharded
with an index, bf16 or fp32), Paddle `-Paddle` directories (`ernie.` prefix, fused / transposed
tensors, bf16 as BF16 or U16 bits; also PaddleFormers' `save_to_hf=False` layout), and Orbax
checkpoints written by `ernie_jax.interop.orbax_io` / `tools/convert/*_to_orbax.py`. Names, shapes
and the config are checked against each other from the file headers before any tensor data is
read; every mismatch names the tensor.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.config import ModelConfig
from ernie_jax.interop import convert, hf, orbax_io
from ernie_jax.interop.safetensors_io import CheckpointError, SafetensorsReader
from ernie_jax.model import fp8, model_class
from ernie_jax.parallel.sharding import with_rules


def abstract_model(cfg):
  """(graphdef, abstract state) of the model of `cfg` (ModelConfig or VLConfig), without
  allocating parameters."""
  return nnx.split(nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0))))


def _flat_state(state) -> dict[str, Any]:
  return {"/".join(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}


def detect_format(path: str) -> str:
  """'orbax', 'hf' or 'paddle' (see `ernie_jax.interop.convert.detect_format`)."""
  return convert.detect_format(path)


def check_hf_checkpoint(reader: SafetensorsReader, cfg: ModelConfig, flat) -> dict[str, hf.Slot]:
  """Names, shapes and dtypes from the headers against the config, before reading any data."""
  convert.check_source(reader, convert.HFLayout(), cfg, {p: tuple(v.shape) for p, v in flat.items()})
  return hf.hf_name_map(cfg)


def iter_hf_params(reader: SafetensorsReader, cfg: ModelConfig, flat):
  """Yield (parameter path, host array) one parameter at a time (stacked layer / expert tensors
  are assembled into their parameter), so peak host memory is one parameter."""
  return convert.iter_params(reader, convert.HFLayout(), cfg, flat)


def load_hf_state(path: str, cfg: ModelConfig, abstract_state) -> dict[str, np.ndarray]:
  """Read a whole HF checkpoint into host numpy arrays keyed by flat parameter path."""
  reader = SafetensorsReader(path)
  try:
    return dict(iter_hf_params(reader, cfg, _flat_state(abstract_state)))
  finally:
    reader.close()


def _place(host: np.ndarray, sharding) -> jax.Array:
  if sharding is None:
    return jnp.asarray(host)
  # each process materialises only its addressable shards (works multi-host)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def from_pretrained(path: str | os.PathLike, *, dtype: str | None = None,
                    param_dtype: str | None = None, format: str = "auto",
                    config: ModelConfig | None = None, mesh=None, rules=None,
                    allow_pickle: bool = False, **config_overrides):
  """Load an ERNIE 4.5 model: an ErnieForCausalLM, or an Ernie45VLForConditionalGeneration for a
  VL checkpoint (a VL config.json or Orbax model config).

  path: a checkpoint directory: Hugging Face (config.json + *.safetensors [+ index]), Paddle
    (config.json + `ernie.`-prefixed safetensors), or an Orbax checkpoint written by ernie_jax.
  format: "auto" (detected from the files and tensor names), "hf", "paddle" or "orbax".
  dtype / param_dtype: compute / parameter dtype ("float32", "bfloat16"); default float32 for
    every format (an Orbax checkpoint's stored dtype is converted on load).
  allow_pickle: also read torch `.bin` / Paddle `.pdparams` files (unpickling runs code).
  mesh / rules: load straight into the sharded layout given by the logical-axis rules
    (default `ernie_jax.parallel.DEFAULT_RULES`); parameters are placed one at a time, each device
    receiving only its shards, so the full model is never materialised on one device.
  config_overrides: extra ModelConfig fields (e.g. moe_impl="ragged_dot", moe_transport="all_to_all",
    fp8_recipe="delayed"). An FP8 model's scales and amax histories start fresh (scale 1, empty
    history), except from an Orbax checkpoint that holds them (an FP8-trained one). Orbax
    checkpoints load without FP8 unless fp8_recipe is given.
  """
  path = os.fspath(path)
  fmt = detect_format(path) if format == "auto" else format
  if fmt not in convert.FORMATS:
    raise CheckpointError(f"{path}: unknown checkpoint format {fmt!r} (supported: {convert.FORMATS})")
  overrides = dict(config_overrides)
  if dtype is not None:
    overrides["dtype"] = dtype
  if param_dtype is not None:
    overrides["param_dtype"] = param_dtype
  if fmt == "orbax":
    if config is None:  # the stored config records the storage dtype; load as float32 by default
      overrides.setdefault("dtype", "float32")
      overrides.setdefault("param_dtype", "float32")
      if not orbax_io.is_vl_info(orbax_io.read_info(path)):  # (the VL model has no FP8)
        overrides.setdefault("fp8_recipe", "none")  # an FP8-trained checkpoint loads without FP8 unless asked
    return orbax_io.load_model(path, config=config, mesh=mesh, rules=rules, **overrides)
  cfg = config.replace(**overrides) if config is not None else convert.read_config(path, fmt, **overrides)
  graphdef, abstract = abstract_model(cfg)
  shardings = None
  if mesh is not None:
    from ernie_jax.parallel import DEFAULT_RULES, state_shardings

    shardings = _flat_state(state_shardings(abstract, mesh, rules or DEFAULT_RULES))
  flat_abstract = _flat_state(abstract)
  fp8_state = {p: v for p, v in flat_abstract.items() if fp8.is_fp8_path(p)}  # not in checkpoints
  params = {p: v for p, v in flat_abstract.items() if p not in fp8_state}
  reader = convert.open_source(path, allow_pickle=allow_pickle)
  try:
    layout = convert.layout_for(fmt, reader.keys(), cfg)
    arrays = {p: _place(host, shardings and shardings[p].get_value())
              for p, host in convert.iter_params(reader, layout, cfg, params)}
  finally:
    reader.close()
  for p, v in fp8_state.items():  # fresh FP8 scales / histories
    arrays[p] = _place(np.asarray(fp8.initial_value(p, v.shape)), shardings and shardings[p].get_value())
  flat = nnx.to_flat_state(abstract)
  for key, var in flat:
    var.set_value(arrays["/".join(str(k) for k in key)])
  return with_rules(nnx.merge(graphdef, nnx.from_flat_state(flat)), rules)
