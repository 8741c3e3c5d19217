"""`from_pretrained`: build an ErnieForCausalLM from a checkpoint directory.

Supported now: Hugging Face safetensors directories (single file or sharded with an index, bf16 or
fp32). Names, shapes and the config are checked against each other from the file headers before
any tensor data is read; every mismatch names the tensor.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.config import ModelConfig
from ernie_jax.interop import hf
from ernie_jax.interop.safetensors_io import CheckpointError, SafetensorsReader
from ernie_jax.model import ErnieForCausalLM


def abstract_model(cfg: ModelConfig):
  """(graphdef, abstract state) without allocating parameters."""
  model = nnx.eval_shape(lambda: ErnieForCausalLM(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def _flat_state(state) -> dict[str, Any]:
  return {"/".join(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}


def detect_format(path: str) -> str:
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint directory not found: {path}")
  if not os.path.exists(os.path.join(path, "config.json")):
    raise CheckpointError(f"{path} has no config.json")
  reader = SafetensorsReader(path)
  if any(k.startswith("ernie.") for k in reader.keys()):
    return "paddle"
  return "hf"


def check_hf_checkpoint(reader: SafetensorsReader, cfg: ModelConfig, flat) -> dict[str, hf.Slot]:
  """Names, shapes and dtypes from the headers against the config, before reading any data."""
  names = hf.hf_name_map(cfg)
  where = os.path.dirname(next(iter(reader.tensors.values())).file) if reader.tensors else "?"
  present = set(reader.keys())
  unexpected = sorted(n for n in present - set(names) if not hf.ignorable(cfg, n))
  if unexpected:
    n = unexpected[0]
    raise CheckpointError(f"unexpected tensor '{n}' in {where}: {hf.describe_unexpected(cfg, n)}"
                          + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
  missing = sorted(set(names) - present)
  if missing:
    raise CheckpointError(f"missing tensor '{missing[0]}' in {where}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  for name, slot in names.items():
    info, var = reader.tensors[name], flat[slot.path]
    target = tuple(var.shape[len(slot.index):])
    want = hf.hf_shape(slot.kind, target)
    if info.shape != want:
      raise CheckpointError(f"tensor '{name}' has shape {list(info.shape)}, expected {list(want)} "
                            f"for the config ({info.file})")
    if info.dtype not in ("F32", "BF16", "F16"):
      raise CheckpointError(f"tensor '{name}' has dtype {info.dtype}; expected F32, BF16 or F16")
  return names


def iter_hf_params(reader: SafetensorsReader, cfg: ModelConfig, flat):
  """Yield (parameter path, host array) one parameter at a time (stacked layer / expert tensors
  are assembled into their parameter), so peak host memory is one parameter."""
  names = check_hf_checkpoint(reader, cfg, flat)
  by_path: dict[str, list[tuple[str, hf.Slot]]] = {}
  for name, slot in names.items():
    by_path.setdefault(slot.path, []).append((name, slot))
  for path, var in flat.items():
    buf = np.empty(var.shape, var.dtype)
    for name, slot in by_path[path]:
      target = buf.shape[len(slot.index):]
      buf[slot.index] = hf.to_param(slot.kind, reader.get(name), target).astype(buf.dtype)
    yield path, buf


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
                    **config_overrides) -> ErnieForCausalLM:
  """Load an ERNIE 4.5 text model.

  path: a Hugging Face checkpoint directory (config.json + *.safetensors [+ index]).
  dtype / param_dtype: compute / parameter dtype ("float32", "bfloat16"); default float32.
  mesh / rules: load straight into the sharded layout given by the logical-axis rules
    (default `ernie_jax.parallel.DEFAULT_RULES`); parameters are placed one at a time, each device
    receiving only its shards, so the full model is never materialised on one device.
  config_overrides: extra ModelConfig fields (e.g. moe_impl="ragged_dot", moe_transport="all_to_all").
  """
  path = os.fspath(path)
  fmt = detect_format(path) if format == "auto" else format
  if fmt != "hf":
    raise CheckpointError(f"{path}: checkpoint format {fmt!r} is not supported by from_pretrained "
                          "yet (supported: 'hf')")
  overrides = dict(config_overrides)
  if dtype is not None:
    overrides["dtype"] = dtype
  if param_dtype is not None:
    overrides["param_dtype"] = param_dtype
  cfg = config.replace(**overrides) if config is not None else ModelConfig.from_hf(path, **overrides)
  graphdef, abstract = abstract_model(cfg)
  shardings = None
  if mesh is not None:
    from ernie_jax.parallel import DEFAULT_RULES, state_shardings

    shardings = _flat_state(state_shardings(abstract, mesh, rules or DEFAULT_RULES))
  reader = SafetensorsReader(path)
  try:
    arrays = {p: _place(host, shardings and shardings[p].get_value())
              for p, host in iter_hf_params(reader, cfg, _flat_state(abstract))}
  finally:
    reader.close()
  flat = nnx.to_flat_state(abstract)
  for key, var in flat:
    var.set_value(arrays["/".join(str(k) for k in key)])
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
