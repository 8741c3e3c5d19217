"""`from_pretrained`: build an ErnieForCausalLM (or the VL model) from a checkpoint directory.

Formats (auto-detected, or `format=`): Hugging Face safetensors directories (single file or sharded
with an index, bf16 or fp32), Paddle `-Paddle` directories (`ernie.` prefix, fused / transposed
tensors, bf16 as BF16 or U16 bits; also PaddleFormers' `save_to_hf=False` layout), and Orbax
checkpoints written by `ernie_jax.interop.orbax_io` / `tools/convert/*_to_orbax.py`. The directory
is looked at once (`interop.sources.open_checkpoint`: format, reader, layout, config); names,
shapes and the config are checked against each other from the file headers before any tensor data
is read; every mismatch names the tensor.

Paths may be relative (made absolute here, as Orbax requires). An Orbax checkpoint's files are
checked against its recorded checksums before loading. A parameter holding NaN / Inf is reported
with one `RuntimeWarning` naming it (checked per parameter as it is loaded).

Imports run loading -> interop -> model: the interop layer knows the checkpoint formats, this
module assembles models from them.
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.config import ModelConfig
from ernie_jax.interop import orbax_io
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.interop.sources import FORMATS, Source, open_checkpoint
from ernie_jax.interop.stream import iter_params
from ernie_jax.model import fp8
from ernie_jax.model.state import abstract_model, flat_state, fresh_fp8_values, path_str
from ernie_jax.parallel import DEFAULT_RULES, state_shardings
from ernie_jax.parallel.sharding import with_rules


def _place(host: np.ndarray, sharding) -> jax.Array:
  if sharding is None:
    return jnp.asarray(host)
  # each process materialises only its addressable shards (works multi-host)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


class _NonFinite:
  """Collects parameters holding NaN / Inf; `report` warns once, naming the first."""

  def __init__(self, path: str):
    self.path, self.names = path, []

  def check(self, name: str, x) -> None:
    if jnp.issubdtype(x.dtype, jnp.floating):
      finite = np.isfinite(x).all() if isinstance(x, np.ndarray) else jnp.isfinite(x).all()
      if not bool(finite):
        self.names.append(name)

  def report(self) -> None:
    if self.names:
      more = f" (and {len(self.names) - 1} more)" if len(self.names) > 1 else ""
      warnings.warn(f"{self.path}: parameter '{self.names[0]}'{more} holds non-finite values (NaN or Inf); the "
                    "model's outputs will be NaN / Inf: check how the checkpoint was made", RuntimeWarning, stacklevel=3)


def load_model(path: str | os.PathLike, *, config: ModelConfig | None = None, mesh=None, rules=None,
               source: Source | None = None, **overrides):
  """Build an `ErnieForCausalLM` (or, for a VL checkpoint, an `Ernie45VLForConditionalGeneration`)
  from an Orbax checkpoint (see `from_pretrained`); `source`: the checkpoint already opened (else
  it is opened here, which checks its checksums)."""
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  opened = source is None
  if opened:
    source = open_checkpoint(path, format="orbax")
  try:
    cfg = config.replace(**overrides) if config is not None else source.read_config(**overrides)
  finally:
    if opened:
      source.close()
  graphdef, abstract = abstract_model(cfg)
  shardings = state_shardings(abstract, mesh, rules or DEFAULT_RULES) if mesh is not None else None
  state = orbax_io.load_state(path, abstract, shardings)
  bad = _NonFinite(path)
  for name, var in flat_state(state).items():
    if not fp8.is_fp8_path(name):
      bad.check(name, var.get_value())
  bad.report()
  return with_rules(nnx.merge(graphdef, state), rules)


def from_pretrained(path: str | os.PathLike, *, dtype: str | None = None,
                    param_dtype: str | None = None, format: str = "auto",
                    config: ModelConfig | None = None, mesh=None, rules=None,
                    allow_pickle: bool = False, verify_checksums: bool = True, **config_overrides):
  """Load an ERNIE 4.5 model: an ErnieForCausalLM, or an Ernie45VLForConditionalGeneration for a
  VL checkpoint (a VL config.json or Orbax model config).

  path: a checkpoint directory: Hugging Face (config.json + *.safetensors [+ index]), Paddle
    (config.json + `ernie.`-prefixed safetensors), or an Orbax checkpoint written by ernie_jax.
  format: "auto" (detected from the files and tensor names), "hf", "paddle" or "orbax".
  dtype / param_dtype: compute / parameter dtype ("float32", "bfloat16"); default float32 for
    every format (an Orbax checkpoint's stored dtype is converted on load).
  allow_pickle: also read torch `.bin` / Paddle `.pdparams` files (unpickling runs code).
  verify_checksums: check an Orbax checkpoint's files against the checksums recorded when it was
    written (one extra read of the files; a damaged file is a CheckpointError naming it).
  mesh / rules: load straight into the sharded layout given by the logical-axis rules
    (default `ernie_jax.parallel.DEFAULT_RULES`); parameters are placed one at a time, each device
    receiving only its shards, so the full model is never materialised on one device.
  config_overrides: extra ModelConfig fields (e.g. moe_impl="ragged_dot", moe_transport="all_to_all",
    fp8_recipe="delayed"). An FP8 model's scales and amax histories start fresh (scale 1, empty
    history), except from an Orbax checkpoint that holds them (an FP8-trained one). Orbax
    checkpoints load without FP8 unless fp8_recipe is given.
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if format not in ("auto", *FORMATS):
    raise CheckpointError(f"{path}: unknown checkpoint format {format!r} (supported: {FORMATS})")
  overrides = dict(config_overrides)
  if dtype is not None:
    overrides["dtype"] = dtype
  if param_dtype is not None:
    overrides["param_dtype"] = param_dtype
  with open_checkpoint(path, format=format, allow_pickle=allow_pickle, verify=verify_checksums) as source:
    if source.format == "orbax":
      if config is None:  # the stored config records the storage dtype; load as float32 by default
        overrides.setdefault("dtype", "float32")
        overrides.setdefault("param_dtype", "float32")
        if not source.is_vl:  # (the VL model has no FP8)
          overrides.setdefault("fp8_recipe", "none")  # an FP8-trained checkpoint loads without FP8 unless asked
      return load_model(path, config=config, mesh=mesh, rules=rules, source=source, **overrides)
    cfg = config.replace(**overrides) if config is not None else source.read_config(**overrides)
    graphdef, abstract = abstract_model(cfg)
    shardings = None
    if mesh is not None:
      shardings = {p: s.get_value() for p, s in flat_state(state_shardings(abstract, mesh, rules or DEFAULT_RULES)).items()}
    flat_abstract = flat_state(abstract)
    params = {p: v for p, v in flat_abstract.items() if not fp8.is_fp8_path(p)}  # FP8 state: not in checkpoints
    bad = _NonFinite(path)
    arrays = {}
    for p, host in iter_params(source.reader, source.layout(cfg), cfg, params):
      bad.check(p, host)  # on the host, before placement
      arrays[p] = _place(host, shardings and shardings[p])
    bad.report()
  for p, host in fresh_fp8_values(flat_abstract).items():  # fresh FP8 scales / histories
    arrays[p] = _place(host, shardings and shardings[p])
  flat = nnx.to_flat_state(abstract)
  for key, var in flat:
    var.set_value(arrays[path_str(key)])
  return with_rules(nnx.merge(graphdef, nnx.from_flat_state(flat)), rules)
