"""The pretraining config: one ml-collections tree whose sections mirror typed dataclasses.

  (top level)  RunConfig        workdir, steps, batch size, accumulation, seed, init_from, NaN policy,
                                model_family ("text" | "vl": what the `model` section describes)
  model        ModelConfig      every field of `ernie_jax.config.ModelConfig` (architecture, dtype
                                policy `param_dtype` / `dtype`, `remat`, MoE, `num_mtp_layers`);
               or VLConfig      with model_family="vl": every field of
                                `ernie_jax.config.VLConfig`, the ViT in `model.vision`
  train        PrecisionConfig  `precision`: fp32 / bf16 / fp8 in one switch (sets model.dtype and
                                model.fp8_recipe)
  groups       GroupsConfig     frozen or slower parameter groups: MoE routers, the VL vision tower
                                (`ernie_jax.train.param_groups`; e.g. continued VL training of a
                                checkpoint with a frozen ViT)
  mesh         MeshConfig       device mesh axes (`ernie_jax.parallel.MeshConfig`)
  distributed  DistributedConfig  multi-process start-up (`ernie_jax.parallel.distributed`)
  data         DataConfig       `ernie_jax.data.pipeline.DataConfig`
  optim        OptimConfig      `ernie_jax.train.optimizer.OptimConfig`
  loss         LossConfig       `ernie_jax.train.losses.LossConfig`
  checkpoint   CheckpointConfig below
  metrics      MetricsConfig    below
Each field is documented where its dataclass defines it. `parse(config)` builds the dataclasses
and validates everything that can be checked without devices or compilation; a problem raises
`TrainConfigError` naming the field (e.g. `config field 'optim.lr': must be > 0, got -1.0`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from ernie_jax.config import ConfigError, ModelConfig
from ernie_jax.data.pipeline import SOURCES, TEXT_SOURCES, VL_SOURCES, DataConfig
from ernie_jax.config import VLConfig
from ernie_jax.parallel import MeshConfig
from ernie_jax.parallel.distributed import DistributedConfig
from ernie_jax.train.losses import LossConfig
from ernie_jax.train.optimizer import SCHEDULES, OptimConfig
from ernie_jax.train.param_groups import GroupsConfig


class TrainConfigError(ConfigError):
  """A training config field is invalid: `config field '<section.field>': <message>` (a ConfigError,
  so a ValueError, with the dotted field name in `.field`)."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
  workdir: str = "/tmp/ernie_jax/run"  # checkpoints, metrics.jsonl, TensorBoard events, tokenizer
  steps: int = 1000  # total optimizer steps (a resumed run continues up to this number)
  global_batch_size: int = 16  # rows of data.seq_len tokens per optimizer step, over all processes
  grad_accum_steps: int = 1  # micro-batches per step (global_batch_size must be divisible by it)
  # The global batch is drawn from this many data shards (ernie_jax.data.shards), each process reading
  # data_shards / processes of them: the batches and their order are the same for any process count that
  # divides it, and a checkpoint resumes on any such count. Must divide global_batch_size / grad_accum_steps.
  data_shards: int = 1
  seed: int = 0  # parameter initialisation and the RNG key of the train state
  # A model checkpoint to start from (loaded with ernie_jax.from_pretrained; architecture from the
  # checkpoint, dtype / remat / MoE implementation fields from `model`). Ignored when the workdir
  # already holds a training checkpoint (the run resumes from that instead).
  init_from: str = ""
  # What the `model` section describes: "text" (ModelConfig: ERNIE 4.5 dense / MoE, text data) or
  # "vl" (VLConfig: ERNIE 4.5 VL, vision tower + resampler + text/vision experts, image-caption data
  # `data.source` "shapes" / "image_jsonl").
  model_family: str = "text"
  nonfinite: str = "stop"  # non-finite loss / gradient / parameters: "stop" the run or "skip" the step
  max_skipped_steps: int = 10  # nonfinite="skip": stop after this many consecutive skipped steps
  peak_tflops_per_device: float = 0.0  # for MFU; 0 = from a table of accelerators (CPU: measured)
  # JAX persistent compilation cache (restarts and resumed runs skip compilation); "" = off.
  compilation_cache_dir: str = "~/.cache/ernie_jax/xla"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 500  # save every N steps (and always at the end / on SIGTERM); 0 = only then
  keep: int = 3  # keep the last K checkpoints
  async_save: bool = True  # write in the background while training continues


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
  log_every: int = 10  # log metrics every N steps (and at the last step)
  tensorboard: bool = True  # write TensorBoard event files under <workdir>/tensorboard
  progress_bar: bool = True  # tqdm progress bar with ETA (only on a terminal)


PRECISIONS = ("", "fp32", "bf16", "fp8")


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
  # One switch for the numerics of training (applied to the model config by `parse`):
  #   ""     as model.dtype / model.fp8_recipe say;
  #   "fp32" fp32 matmuls (model.dtype=float32, no FP8);
  #   "bf16" bf16 matmuls, master weights in model.param_dtype (fp32 by default);
  #   "fp8"  as bf16, plus FP8 matmuls (E4M3 operands, E5M2 gradients) in the attention projections,
  #          MLPs and experts with model.fp8_recipe scaling ("delayed" when it is "none"); the scales
  #          and amax histories are saved with the model and overwritten (not trained) each step.
  precision: str = ""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  run: RunConfig
  model: ModelConfig
  mesh: MeshConfig
  data: DataConfig
  optim: OptimConfig
  loss: LossConfig
  checkpoint: CheckpointConfig
  metrics: MetricsConfig
  train: PrecisionConfig = PrecisionConfig()
  groups: GroupsConfig = GroupsConfig()
  distributed: DistributedConfig = DistributedConfig()


_SECTIONS = {"train": PrecisionConfig, "mesh": MeshConfig, "data": DataConfig, "optim": OptimConfig,
             "loss": LossConfig, "checkpoint": CheckpointConfig, "metrics": MetricsConfig, "groups": GroupsConfig,
             "distributed": DistributedConfig}


def model_fields(cfg: ModelConfig) -> dict[str, Any]:
  """ModelConfig -> plain dict for the config tree (moe_layer_end_index back to -1 = last layer,
  so overriding num_hidden_layers on the command line keeps working)."""
  d = dataclasses.asdict(cfg)
  if d["moe_layer_end_index"] == cfg.num_hidden_layers - 1:
    d["moe_layer_end_index"] = -1
  return d


def vl_model_fields(cfg) -> dict[str, Any]:
  """VLConfig -> plain dict for the config tree (mlp_layer_types back to () when it is the default
  layout, layer 0 dense and the rest MoE, so overriding num_hidden_layers keeps working)."""
  d = dataclasses.asdict(cfg)
  if tuple(cfg.mlp_layer_types) == ("dense",) + ("sparse",) * (cfg.num_hidden_layers - 1):
    d["mlp_layer_types"] = ()
  return d


MODEL_FAMILIES = ("text", "vl")


def family_of(model_dict: dict[str, Any]) -> str:
  """"vl" for a VLConfig dict (it has a `vision` section), else "text"."""
  return "vl" if "vision" in model_dict else "text"


def model_from_dict(d: dict[str, Any], family: str = "text"):
  """The `model` section as a ModelConfig (family "text") or VLConfig ("vl"); a bad field raises
  TrainConfigError naming it (`model.<field>`, `model.vision.<field>`)."""
  _check(family in MODEL_FAMILIES, "model_family", f"must be one of {MODEL_FAMILIES}, got {family!r}")
  try:
    if family == "vl":
      return VLConfig.from_dict(d)
    return ModelConfig.from_dict(d)
  except ConfigError as e:
    field = e.field.replace("vision_config.", "vision.")
    raise TrainConfigError(f"model.{field}", str(e).split(": ", 1)[-1]) from None
  except TypeError as e:
    raise TrainConfigError("model", str(e)) from None


def default_config(model=None) -> ml_collections.ConfigDict:
  """Every field with its default; experiment configs start from this and change a few.
  model: a ModelConfig, or a VLConfig (sets model_family="vl")."""
  c = ml_collections.ConfigDict(dataclasses.asdict(RunConfig()))
  if model is not None and model.is_vl:
    c.model_family = "vl"
    c.model = vl_model_fields(model)
  else:
    c.model = model_fields(model or ModelConfig.tiny_dense())
  for name, cls in _SECTIONS.items():
    setattr(c, name, dataclasses.asdict(cls()))
  return c


def _build(cls, values: dict, prefix: str):
  """`cls(**values)` with the field names and types checked (int -> float; a list, e.g. from a JSON
  copy of the config, or a comma-separated string -> tuple); a section's own ConfigError becomes a
  TrainConfigError naming `<prefix><field>`."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise TrainConfigError(f"{prefix}{unknown[0]}", f"unknown field (known: {', '.join(sorted(names))})")
  for f in dataclasses.fields(cls):
    if f.name in values and f.default is not dataclasses.MISSING:
      v, want = values[f.name], type(f.default)
      if want is float and isinstance(v, int) and not isinstance(v, bool):
        values[f.name] = float(v)
      elif want is tuple and isinstance(v, (list, str)):
        values[f.name] = tuple(x.strip() for x in v.split(",") if x.strip()) if isinstance(v, str) else tuple(v)
      elif not isinstance(v, want) or (want is int and isinstance(v, bool)):
        raise TrainConfigError(f"{prefix}{f.name}", f"expected {want.__name__}, got {v!r}")
  try:
    return cls(**values)
  except ConfigError as e:
    if isinstance(e, TrainConfigError):
      raise
    field = e.field if e.field.startswith(prefix) else f"{prefix}{e.field}"
    raise TrainConfigError(field, str(e).split(": ", 1)[-1]) from None


def parse_sections(config: ml_collections.ConfigDict | dict, sections: dict[str, type]):
  """(RunConfig, model config with `train.precision` applied, {section name: dataclass}) of a config
  tree whose sections are `sections` (plus `model` and the top-level run fields)."""
  d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  raw = {k: dict(d.pop(k, {}) or {}) for k in ("model",) + tuple(sections)}
  run = _build(RunConfig, d, "")
  model = model_from_dict(raw.pop("model"), run.model_family)
  parts = {name: _build(cls, raw[name], f"{name}.") for name, cls in sections.items()}
  return run, apply_precision(parts["train"].precision, model), parts


def parse(config: ml_collections.ConfigDict | dict) -> TrainConfig:
  """Typed, validated config (raises TrainConfigError naming the field)."""
  run, model, parts = parse_sections(config, _SECTIONS)
  cfg = TrainConfig(run=run, model=model, **parts)
  validate(cfg)
  return cfg


def apply_precision(precision: str, model):
  """The model config (ModelConfig, or VLConfig: no FP8) with `train.precision` applied (see
  PrecisionConfig)."""
  has_fp8 = hasattr(model, "fp8_recipe")  # the VL model has no FP8 matmuls
  if has_fp8:
    _check(precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}, got {precision!r}")
  else:
    _check(precision in ("", "fp32", "bf16"), "train.precision",
           f"must be '', 'fp32' or 'bf16' for model_family='vl' (no FP8 VL model), got {precision!r}")
  if not precision:
    return model
  if precision in ("fp32", "bf16"):
    _check(not has_fp8 or model.fp8_recipe == "none", "train.precision",
           f"{precision!r} conflicts with model.fp8_recipe={getattr(model, 'fp8_recipe', None)!r} (use "
           "precision 'fp8', or set model.fp8_recipe='none')")
    return model.replace(dtype="float32" if precision == "fp32" else "bfloat16")
  return model.replace(dtype="bfloat16", fp8_recipe="delayed" if model.fp8_recipe == "none" else model.fp8_recipe)


def _check(ok: bool, field: str, message: str):
  if not ok:
    raise TrainConfigError(field, message)


def validate_common(c) -> None:
  """The checks of the sections every training config shares (run, optim, loss, checkpoint, metrics,
  mesh); `c` is a TrainConfig or an SFTConfig."""
  r, o, l = c.run, c.optim, c.loss
  _check(bool(r.workdir), "workdir", "must be a directory path")
  _check(r.steps > 0, "steps", f"must be > 0, got {r.steps}")
  _check(r.global_batch_size > 0, "global_batch_size", f"must be > 0, got {r.global_batch_size}")
  _check(r.grad_accum_steps > 0, "grad_accum_steps", f"must be > 0, got {r.grad_accum_steps}")
  _check(r.global_batch_size % r.grad_accum_steps == 0, "grad_accum_steps",
         f"global_batch_size={r.global_batch_size} is not divisible by grad_accum_steps={r.grad_accum_steps}")
  _check(r.data_shards >= 1, "data_shards", f"must be >= 1, got {r.data_shards}")
  _check(r.global_batch_size % (r.data_shards * r.grad_accum_steps) == 0, "data_shards",
         f"{r.data_shards} does not divide global_batch_size / grad_accum_steps = {r.global_batch_size} / "
         f"{r.grad_accum_steps} (each shard gives the same rows to every micro-batch)")
  _check(r.nonfinite in ("stop", "skip"), "nonfinite", f"must be 'stop' or 'skip', got {r.nonfinite!r}")
  _check(r.max_skipped_steps > 0, "max_skipped_steps", f"must be > 0, got {r.max_skipped_steps}")
  _check(r.peak_tflops_per_device >= 0, "peak_tflops_per_device", "must be >= 0")

  _check(math.isfinite(o.lr) and o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
  _check(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
  _check(o.decay_steps >= 0, "optim.decay_steps", f"must be >= 0, got {o.decay_steps}")
  _check(o.schedule in SCHEDULES, "optim.schedule", f"must be one of {SCHEDULES}, got {o.schedule!r}")
  _check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
  for name in ("b1", "b2"):
    v = getattr(o, name)
    _check(0.0 <= v < 1.0, f"optim.{name}", f"must be in [0, 1), got {v}")
  _check(o.eps > 0, "optim.eps", f"must be > 0, got {o.eps}")
  _check(math.isfinite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
  _check(math.isfinite(o.clip_norm) and o.clip_norm >= 0, "optim.clip_norm", f"must be >= 0 (0 = off), got {o.clip_norm}")

  for f in dataclasses.fields(LossConfig):
    v = getattr(l, f.name)
    _check(math.isfinite(v) and v >= 0, f"loss.{f.name}", f"must be a finite number >= 0, got {v}")

  ck = c.checkpoint
  _check(ck.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0, got {ck.every_steps}")
  _check(ck.keep >= 1, "checkpoint.keep", f"must be >= 1, got {ck.keep}")
  _check(c.metrics.log_every >= 1, "metrics.log_every", f"must be >= 1, got {c.metrics.log_every}")
  sizes = {k: getattr(c.mesh, k) for k in ("data", "fsdp", "tensor", "expert")}
  for k, v in sizes.items():
    _check(v == -1 or v > 0, f"mesh.{k}", f"must be a positive size or -1 (all remaining devices), got {v}")
  _check(sum(v == -1 for v in sizes.values()) <= 1, "mesh", f"at most one axis may be -1, got {sizes}")


def validate_groups(groups: GroupsConfig, model_cfg) -> None:
  """Raises TrainConfigError naming the `groups.*` field that does not fit the model."""
  for name in ("router_lr_ratio", "vision_lr_ratio"):
    v = getattr(groups, name)
    if not (math.isfinite(v) and v > 0):
      raise TrainConfigError(f"groups.{name}", f"must be > 0, got {v}")
  if not model_cfg.is_vl and (groups.freeze_vision or groups.vision_lr_ratio != 1.0):
    raise TrainConfigError("groups.freeze_vision", "the vision tower settings need model_family='vl'")
  if getattr(model_cfg, "fp8_recipe", "none") != "none" and (groups.freeze_router or groups.freeze_vision):
    raise TrainConfigError("train.precision", "FP8 trains every Param: it cannot be combined with frozen groups")


def validate(c: TrainConfig) -> None:
  validate_common(c)
  validate_groups(c.groups, c.model)
  r, d = c.run, c.data
  _check(d.source in SOURCES, "data.source", f"must be one of {SOURCES}, got {d.source!r}")
  if r.model_family == "vl":
    _check(d.source in VL_SOURCES, "data.source", f"model_family='vl' trains on image-caption data: one of "
           f"{VL_SOURCES}, got {d.source!r}")
    validate_vl(c)
  else:
    _check(d.source in TEXT_SOURCES, "data.source", f"{d.source!r} is an image-caption source: it needs "
           f"model_family='vl' (text sources: {TEXT_SOURCES})")
  _check(d.source in ("stdlib", "shapes") or bool(d.paths), "data.paths", f"data.source={d.source!r} needs files")
  _check(d.source == "tokens" or bool(d.tokenizer), "data.tokenizer",
         "set a tokenizer: 'bytes', 'bpe', or the path of a tokenizer.model / tokenizer.json (e.g. the "
         "directory of an ERNIE 4.5 checkpoint)")
  _check(d.text_mode in ("file", "line"), "data.text_mode", f"must be 'file' or 'line', got {d.text_mode!r}")
  _check(d.seq_len >= 2, "data.seq_len", f"must be >= 2, got {d.seq_len}")
  _check(d.seq_len <= c.model.max_position_embeddings, "data.seq_len",
         f"{d.seq_len} exceeds model.max_position_embeddings={c.model.max_position_embeddings}")
  _check(d.bpe_vocab_size >= 259, "data.bpe_vocab_size", f"must be >= 259 (256 bytes + 3 specials), got {d.bpe_vocab_size}")
  _check(d.max_documents >= 0, "data.max_documents", "must be >= 0")
  _check(d.read_threads >= 0 and d.worker_processes >= 0, "data.read_threads", "must be >= 0")
  _check(d.eos_id < c.model.vocab_size, "data.eos_id", f"{d.eos_id} is outside the model vocabulary")
  if d.source == "tokens" and not d.paths.endswith(".npy"):
    import numpy as np
    try:
      np.dtype(d.token_dtype)
    except TypeError:
      raise TrainConfigError("data.token_dtype", f"not a numpy dtype: {d.token_dtype!r}") from None


def validate_vl(c: TrainConfig) -> None:
  """The VL data layout against the VLConfig: static image grids that fit the rows; special token
  ids that do not collide with the ids of a byte-level / trained BPE tokenizer."""
  d, m = c.data, c.model
  unit = m.vision.patch_size * m.vision.spatial_merge_size
  _check(d.image_size > 0 and d.image_size % unit == 0, "data.image_size",
         f"must be a positive multiple of {unit} (vision patch_size x spatial_merge_size), got {d.image_size}")
  _check(d.images_per_row >= 1, "data.images_per_row", f"must be >= 1, got {d.images_per_row}")
  tokens = (d.image_size // unit) ** 2 + 2  # placeholders + image start / end
  need = d.images_per_row * (tokens + int(d.add_bos) + 2)  # + at least one caption token and </s>
  _check(d.seq_len >= need, "data.seq_len", f"{d.seq_len} cannot hold {d.images_per_row} image(s) of "
         f"{tokens} tokens with a caption each (data.image_size={d.image_size}); needs >= {need}")
  check_vl_token_ids(m, d.tokenizer, d.bpe_vocab_size)


def check_vl_token_ids(m, tokenizer: str, bpe_vocab_size: int) -> None:
  """The VL special token ids of the VLConfig `m` must not be text ids of a byte-level / trained BPE tokenizer."""
  text_ids = {"bytes": 259, "bpe": bpe_vocab_size}.get(tokenizer)
  if text_ids is not None:
    for name in ("image_token_id", "image_start_token_id", "image_end_token_id", "video_token_id",
                 "video_start_token_id", "video_end_token_id"):
      v = getattr(m, name)
      _check(v >= text_ids, f"model.{name}", f"{v} is a text token of data.tokenizer={tokenizer!r} (ids "
             f"0..{text_ids - 1}); put the VL special tokens after them (e.g. {text_ids}..{text_ids + 5}) "
             f"and model.vocab_size above")


def check_batch_layout(c: TrainConfig, mesh, process_count: int) -> None:
  """Batch divisibility against the actual mesh and process count (before compiling)."""
  r = c.run
  micro = r.global_batch_size // r.grad_accum_steps
  shards = 1
  for axis in ("data", "fsdp", "expert"):
    shards *= mesh.shape.get(axis, 1)
  _check(micro % shards == 0, "global_batch_size",
         f"{r.global_batch_size} rows / grad_accum_steps {r.grad_accum_steps} = {micro} rows per micro-batch, "
         f"not divisible by the {shards} batch shards of the mesh {dict(mesh.shape)}")
  _check(r.data_shards % process_count == 0, "data_shards",
         f"{r.data_shards} is not a multiple of the {process_count} processes (each process reads data_shards / "
         f"processes of them): set --config.data_shards to a multiple of {process_count} that divides "
         f"global_batch_size / grad_accum_steps = {micro}")
