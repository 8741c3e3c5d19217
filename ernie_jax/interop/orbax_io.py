"""Model weights + config in an Orbax checkpoint directory.

Layout (an ordinary Orbax composite checkpoint; `ocp.Checkpointer(ocp.CompositeCheckpointHandler())`
restores it with `state=StandardRestore(...)`, `model_config=JsonRestore()`):

  <dir>/state/         the model's variables (Params and Buffers such as the MoE correction bias)
                       as a nested dict keyed by the '/'-separated paths of `nnx.state(model)`
                       (list indices as strings), e.g. state["groups"]["1"]["blocks"]["layers"]["0"]
                       ["mlp"]["experts"]["gate"] of shape [repeats, E, H, I]
  <dir>/model_config/  JSON: {"format": "ernie_jax", "version": 1, "model_config": ModelConfig.to_dict(),
                       "source": {...where it came from...}}; an ERNIE 4.5 VL model adds
                       "architecture": "ernie4_5_vl_moe" and stores VLConfig.to_dict()

  <dir>/checksums.json  {"algorithm": "crc32", "files": {relative path: [bytes, crc32]}} of every
                       other file, written by `save_state` (single process) once the checkpoint is
                       complete and before it is moved into place; `verify_checksums` checks it on
                       load (`ernie_jax.from_pretrained`) and export (`OrbaxReader`), so damaged
                       bytes are refused instead of becoming NaN logits. Checkpoints without it
                       (older ones, training checkpoints) load unchecked.

A CheckpointManager root whose step directories hold these two items is accepted too (the latest
step is used). Paths may be relative (`resolve` makes them absolute, as Orbax requires). Orbax /
TensorStore failures reading a damaged directory become one-line `CheckpointError`s.

Writing without materialising the model: a `StreamedArray` leaf stands for an array whose content
is produced block by block by a `BlockSource` (the converters). A type handler registered for it
writes each block into its chunk of the TensorStore array as it arrives (committing about every
64 MiB), so peak memory is one block plus the source tensor it came from plus <= 64 MiB of
uncommitted writes, never the parameter or the model. The result is a
plain array in the checkpoint: restoring needs no custom code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import threading
from typing import Any, Callable, Iterator, Mapping, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

from ernie_jax.config import ModelConfig
from ernie_jax.interop import checksums
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.model import fp8
from ernie_jax.model.state import abstract_model, flat_state, fresh_fp8_values, path_str
from ernie_jax.config import VLConfig

FORMAT = "ernie_jax"
VERSION = 1
STATE_ITEM = "state"
CONFIG_ITEM = "model_config"
VL_ARCHITECTURE = "ernie4_5_vl_moe"  # info["architecture"] of VL checkpoints (absent: text model)
CHECKSUMS = checksums.CHECKSUMS
_RECONVERT = "the checkpoint is damaged or incomplete: re-convert (or re-save / copy) it"


def _abspath(path: str | os.PathLike) -> str:
  """Orbax needs absolute paths: resolve relative ones (and ~) at every public entry point."""
  return os.path.abspath(os.path.expanduser(os.fspath(path)))


def _first_line(e: BaseException, limit: int = 240) -> str:
  """The root cause of `e` (TensorStore wraps the informative error) as one short line."""
  seen = {id(e)}
  while (nxt := e.__cause__ or e.__context__) is not None and id(nxt) not in seen:
    seen.add(id(nxt))
    e = nxt
  text = (str(e).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
  return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


@contextlib.contextmanager
def _damaged(directory: str, what: str):
  """Turn an Orbax / TensorStore / JSON failure while reading `what` into a one-line CheckpointError."""
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # orbax / tensorstore raise ValueError, FileNotFoundError, KeyError, ...
    raise CheckpointError(f"{directory}: cannot read {what} ({_first_line(e)}); {_RECONVERT}") from None


def write_checksums(directory: str | os.PathLike) -> None:
  """Record every file's size and CRC32 in `<dir>/checksums.json` (see `interop.checksums`)."""
  checksums.write(_abspath(directory))


def verify_checksums(path: str | os.PathLike) -> bool:
  """Check the checkpoint's files against `checksums.json`; False when it has none (written
  before checksums existed). A missing, truncated or changed file is a one-line CheckpointError
  naming it."""
  directory = resolve(path)
  with _damaged(directory, CHECKSUMS):
    return checksums.verify(directory, _RECONVERT)


# --------------------------------------------------------------------------------------------------
# Paths <-> nested storage tree
def nest(flat: Mapping[str, Any]) -> dict:
  """{'a/0/b': x} -> {'a': {'0': {'b': x}}}."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "/"))
    else:
      out[key] = v
  return out


# --------------------------------------------------------------------------------------------------
# Streaming writes
class BlockSource(Protocol):
  def blocks(self, paths: set[str]) -> Iterator[tuple[str, tuple[int, ...], np.ndarray]]:
    """Yield (path, start, block) covering every requested parameter exactly once.

    `start` (length `StreamedArray.lead`) indexes the leading axes; the block has the array's
    `chunk_shape` and lands at `param[start[0]:start[0]+1, ...]`."""


class StreamedArray:
  """A parameter to be written block by block (see the module docstring).

  The first `lead` axes are written one index at a time: blocks (and storage chunks) have shape
  `(1,) * lead + shape[lead:]`; lead=0 writes the parameter in one block."""

  def __init__(self, path: str, shape, dtype, lead: int, source: BlockSource):
    self.path = path
    self.shape = tuple(int(s) for s in shape)
    self.dtype = np.dtype(dtype)
    if not 0 <= lead <= len(self.shape):
      raise ValueError(f"{path}: lead={lead} for a parameter of rank {len(self.shape)}")
    self.lead = lead
    self.chunk_shape = (1,) * lead + self.shape[lead:]
    self.num_blocks = int(np.prod(self.shape[:lead], dtype=np.int64))
    self.source = source

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __repr__(self):
    return f"StreamedArray({self.path}, {self.shape}, {self.dtype}, chunks={self.chunk_shape})"


_COMMIT_BYTES = 64 << 20


class _StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
  """Writes StreamedArray leaves; the stored arrays are ordinary numpy-typed arrays, so the
  standard handlers read them back (metadata / deserialize are inherited)."""

  async def serialize(self, values, infos, args=None):
    if jax.process_count() > 1:
      raise NotImplementedError("streamed conversion writes from a single process")
    args = args or [ocp.SaveArgs()] * len(values)
    # Like the standard handlers, write in the background commit, which first waits for Orbax's
    # signal that the item directories exist.
    return [ocp.future.CommitFutureAwaitingContractedSignals(
      self._write(list(zip(values, infos, args))), name="streamed_array_handler")]

  async def _write(self, items):
    by_source: dict[int, list] = {}
    for item in items:
      by_source.setdefault(id(item[0].source), []).append(item)
    for group in by_source.values():
      stores = {}
      for value, info, arg in group:
        await info.await_path_creation()
        use_ocdbt = bool(info.is_ocdbt_checkpoint)
        spec = ocp.type_handlers.get_json_tspec_write(
          info, use_ocdbt=use_ocdbt, global_shape=value.shape, local_shape=value.chunk_shape,
          dtype=value.dtype, process_index=jax.process_index() if use_ocdbt else None, arg=arg)
        stores[value.path] = (value, await ts.open(ts.Spec(spec), create=True, open=True,
                                                  context=info.ts_context))
      written = {p: 0 for p in stores}
      # Blocks are committed in transactions of about _COMMIT_BYTES: one OCDBT commit per small
      # block would dominate the time (~20 ms each); the transaction holds a copy of its blocks.
      txn, pending = None, 0
      blocks = _prefetched(group[0][0].source.blocks(set(stores)), _PREFETCH)
      async with contextlib.aclosing(blocks):  # stops the worker thread on errors too
        async for path, start, block in blocks:
          value, store = stores[path]
          if block.shape != value.chunk_shape or block.dtype != value.dtype or len(start) != value.lead:
            raise CheckpointError(f"internal error: block {start} for '{path}' is {block.dtype}"
                                  f"{list(block.shape)}, expected {value.dtype}{list(value.chunk_shape)}")
          index = tuple(slice(s, s + 1) for s in start)
          if txn is None:
            txn = ts.Transaction()
          await store.with_transaction(txn)[index].write(block)
          written[path] += 1
          pending += block.nbytes
          del block
          if pending >= _COMMIT_BYTES:
            await txn.commit_async()
            txn, pending = None, 0
        if txn is not None:
          await txn.commit_async()
      for path, (value, _) in stores.items():
        if written[path] != value.num_blocks:
          raise CheckpointError(f"internal error: {written[path]} of {value.num_blocks} blocks "
                                f"written for '{path}'")


# --------------------------------------------------------------------------------------------------
_END = object()
_PREFETCH = True  # read / transform the next block in a worker thread while writing this one


async def _prefetched(blocks: Iterator, prefetch: bool = True):
  """Iterate `blocks` in a worker thread, one item ahead, so reading / transposing the next block
  overlaps writing this one (numpy and file reads release the GIL). Costs one extra block."""
  if not prefetch:
    for item in blocks:
      yield item
    return
  q: queue.Queue = queue.Queue(maxsize=1)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for item in blocks:
        if not put(item):
          return
      put(_END)
    except BaseException as e:  # handed to the consumer, which re-raises it
      put(e)

  worker = threading.Thread(target=produce, name="convert-blocks", daemon=True)
  worker.start()
  try:
    while True:
      item = await asyncio.to_thread(q.get)
      if item is _END:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
      del item
  finally:
    stop.set()
    worker.join()


def info_for(cfg: ModelConfig | VLConfig, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The `model_config` item of a checkpoint of `cfg` (converters and training checkpoints alike)."""
  info = {"format": FORMAT, "version": VERSION, "model_config": cfg.to_dict(), **(metadata or {})}
  if cfg.is_vl:
    info["architecture"] = VL_ARCHITECTURE
  return info


def is_vl_info(info: Mapping[str, Any]) -> bool:
  """Whether a checkpoint's info (`read_info`) describes an ERNIE 4.5 VL model: the architecture
  tag, or (checkpoints written without it, e.g. by a training loop) a VLConfig-shaped config."""
  config = info.get("model_config") or {}
  return info.get("architecture") == VL_ARCHITECTURE or ("vision" in config and "mrope_section" in config)


def config_from_info(info: Mapping[str, Any]) -> ModelConfig | VLConfig:
  """The model config recorded in a checkpoint's info (`read_info`)."""
  if is_vl_info(info):
    return VLConfig.from_dict(info["model_config"])
  return ModelConfig.from_dict(info["model_config"])


def save_state(path: str | os.PathLike, arrays: Mapping[str, Any], cfg: ModelConfig, *,
               metadata: Mapping[str, Any] | None = None, overwrite: bool = False,
               extra_files: Callable[[str], Any] | None = None) -> None:
  """Write `arrays` ({flat parameter path: jax / numpy array or StreamedArray}) and `cfg`.

  Orbax writes into a temporary sibling and renames it into place when complete. extra_files(dir):
  called once the items are written and before the checksums, to add files next to them (the
  tokenizer files and generation_config.json, `interop.assets`), which the checksums then cover.
  """
  path = epath.Path(_abspath(path))
  streamed = any(isinstance(a, StreamedArray) for a in arrays.values())
  state = nest(arrays)
  if streamed:
    registry = ocp.type_handlers.create_type_handler_registry(
      (StreamedArray, _StreamedArrayHandler()), (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (jax.Array, ocp.type_handlers.ArrayHandler()))
    handlers = ocp.DefaultCheckpointHandlerRegistry()
    handlers.add(STATE_ITEM, ocp.args.PyTreeSave,
                 ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry))
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=handlers))
    state_args = ocp.args.PyTreeSave(state)
  else:
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    state_args = ocp.args.StandardSave(state)
  try:
    checkpointer.save(path, ocp.args.Composite(**{STATE_ITEM: state_args,
                                                  CONFIG_ITEM: ocp.args.JsonSave(info_for(cfg, metadata))}),
                      force=overwrite)
  finally:
    checkpointer.close()
  if extra_files is not None and jax.process_index() == 0:
    extra_files(os.fspath(path))
  if jax.process_count() == 1:  # (other hosts' files may not be visible here)
    write_checksums(path)


def save_model(model, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None,
               overwrite: bool = False, extra_files: Callable[[str], Any] | None = None) -> None:
  """Save an `ErnieForCausalLM` or `Ernie45VLForConditionalGeneration` (possibly sharded,
  multi-host) with its config. extra_files: see `save_state`."""
  flat = {p: v.get_value() for p, v in flat_state(nnx.state(model)).items()}
  save_state(path, flat, model.config, metadata=metadata, overwrite=overwrite, extra_files=extra_files)


# --------------------------------------------------------------------------------------------------
# Reading
def _is_item_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, STATE_ITEM)) and os.path.isdir(os.path.join(path, CONFIG_ITEM))


def _looks_like_orbax(path: str) -> bool:
  """Whether `path` holds pieces of an Orbax checkpoint (an item, or Orbax's own metadata)."""
  return any(os.path.exists(os.path.join(path, n)) for n in (STATE_ITEM, CONFIG_ITEM, "_CHECKPOINT_METADATA"))


def resolve(path: str | os.PathLike) -> str:
  """The checkpoint directory (absolute): `path` itself, or the latest step of a CheckpointManager
  root."""
  path = _abspath(path)
  if _is_item_dir(path):
    return path
  if os.path.isdir(path):
    steps = sorted((int(d) for d in os.listdir(path) if d.isdigit() and _is_item_dir(os.path.join(path, d))))
    if steps:
      return os.path.join(path, str(steps[-1]))
    partial = [path] + [os.path.join(path, d) for d in sorted((d for d in os.listdir(path) if d.isdigit()),
                                                              key=int, reverse=True)]
    for p in partial:
      if os.path.isdir(p) and _looks_like_orbax(p):
        absent = [n for n in (STATE_ITEM, CONFIG_ITEM) if not os.path.isdir(os.path.join(p, n))]
        raise CheckpointError(f"{p} looks like an ernie_jax Orbax checkpoint but is missing its "
                              f"{' and '.join(repr(a) for a in absent)} item; {_RECONVERT}")
  raise CheckpointError(f"{path} is not an ernie_jax Orbax checkpoint (no '{STATE_ITEM}' and "
                        f"'{CONFIG_ITEM}' items)")


def looks_like_orbax(path: str | os.PathLike) -> bool:
  """Whether `path` is, or is a damaged, Orbax checkpoint (or CheckpointManager root)."""
  path = _abspath(path)
  return os.path.isdir(path) and (_looks_like_orbax(path) or any(
    d.isdigit() and _looks_like_orbax(os.path.join(path, d)) for d in os.listdir(path)))


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
  try:
    resolve(path)
    return True
  except CheckpointError:
    return False


def read_info(path: str | os.PathLike) -> dict[str, Any]:
  """The JSON recorded next to the weights (format, version, model_config, source)."""
  directory = resolve(path)
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    with _damaged(directory, f"its '{CONFIG_ITEM}' item"):
      info = checkpointer.restore(directory, ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))[CONFIG_ITEM]
  finally:
    checkpointer.close()
  if not isinstance(info, dict) or info.get("format") != FORMAT or "model_config" not in info:
    raise CheckpointError(f"{directory}/{CONFIG_ITEM} does not hold an ernie_jax model config")
  if info.get("version", 0) > VERSION:
    raise CheckpointError(f"{directory}: checkpoint format version {info['version']} is newer than this "
                          f"ernie_jax understands ({VERSION})")
  return info


def load_config(path: str | os.PathLike, **overrides) -> ModelConfig | VLConfig:
  return config_from_info(read_info(path)).replace(**overrides)


def _saved_arrays(directory: str) -> dict[str, tuple[tuple[str, ...], Any]]:
  """{normalised flat path: (saved key tuple, ArrayMetadata)} from the checkpoint metadata.

  A trailing 'value' key (an `nnx.State` saved as is) is dropped from the normalised path."""
  state_dir = os.path.join(directory, STATE_ITEM)
  ocdbt = os.path.isdir(os.path.join(state_dir, "d")) or any(n.startswith("ocdbt.process_") for n in os.listdir(state_dir))
  for required in ("_METADATA",) + (("manifest.ocdbt",) if ocdbt else ()):
    if not os.path.isfile(os.path.join(state_dir, required)):  # checked here: Orbax fails on it noisily
      raise CheckpointError(f"{directory}: file '{STATE_ITEM}/{required}' is missing; {_RECONVERT}")
  handler = ocp.PyTreeCheckpointHandler()
  try:
    with _damaged(directory, f"the metadata of its '{STATE_ITEM}' item"):
      meta = handler.metadata(epath.Path(directory) / STATE_ITEM)
  finally:
    handler.close()
  tree = meta.tree if hasattr(meta, "tree") else meta
  out = {}
  for keypath, m in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = tuple(path_str((k,)) for k in keypath)
    norm = keys[:-1] if keys and keys[-1] == "value" else keys
    out[path_str(norm)] = (keys, m)
  return out


def check_arrays(directory: str, saved: Mapping[str, tuple[Any, Any]], expected: Mapping[str, tuple[int, ...]],
                 expecter: str = "the model") -> None:
  """The stored arrays (`_saved_arrays`) are exactly `expected` ({path: shape}): the first missing,
  unexpected or misshaped array is a CheckpointError naming it. Shared by loading (`load_state`)
  and export (`OrbaxReader`), so a config that disagrees with the weights is refused by both."""
  missing = sorted(set(expected) - set(saved))
  if missing:
    raise CheckpointError(f"{directory}: no array for parameter '{missing[0]}'"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  unexpected = sorted(set(saved) - set(expected))
  if unexpected:
    raise CheckpointError(f"{directory}: unexpected array '{unexpected[0]}' not in the model"
                          + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
  for name, shape in expected.items():
    stored = tuple(saved[name][1].shape)
    if stored != tuple(shape):
      raise CheckpointError(f"{directory}: array '{name}' has shape {list(stored)}, {expecter} expects {list(shape)}")


def load_state(path: str | os.PathLike, abstract_state, shardings=None):
  """Restore the checkpoint into `abstract_state` (an `nnx.State` of ShapeDtypeStructs, e.g. from
  `nnx.eval_shape`), each array read straight into its sharding.

  shardings: an `nnx.State` of the same structure holding `NamedSharding`s (see
  `ernie_jax.parallel.state_shardings`); default: the first local device. Arrays are cast to the
  abstract dtypes. Names and shapes are checked first; a mismatch names the parameter.
  """
  directory = resolve(path)
  saved = _saved_arrays(directory)
  flat = nnx.to_flat_state(abstract_state)
  sharding_of = {}
  if shardings is not None:
    sharding_of = {p: v.get_value() if isinstance(v, nnx.Variable) else v for p, v in flat_state(shardings).items()}
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  wanted = {path_str(p): v for p, v in flat}
  # FP8 scaling state: kept when both sides have it, fresh when only the model has it, dropped
  # when only the checkpoint has it (an FP8-trained checkpoint loaded without FP8)
  fresh = {n: v for n, v in wanted.items() if fp8.is_fp8_path(n) and n not in saved}
  dropped = any(fp8.is_fp8_path(n) and n not in wanted for n in saved)
  saved = {n: v for n, v in saved.items() if not fp8.is_fp8_path(n) or n in wanted}
  wanted = {n: v for n, v in wanted.items() if n not in fresh}
  check_arrays(directory, saved, {n: tuple(v.shape) for n, v in wanted.items()})
  target = {}
  for name, var in wanted.items():
    keys = saved[name][0]
    node = target
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding_of.get(name, default))
  if dropped:  # read only what the model has
    item = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
  else:
    item = ocp.args.StandardRestore(target)
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    with _damaged(directory, f"the arrays of its '{STATE_ITEM}' item"):
      restored = checkpointer.restore(directory, ocp.args.Composite(**{STATE_ITEM: item}))[STATE_ITEM]
  finally:
    checkpointer.close()
  for name, var in wanted.items():
    node = restored
    for k in saved[name][0]:
      node = node[k]
    var.set_value(node)
  for name, value in fresh_fp8_values(fresh).items():
    fresh[name].set_value(jax.device_put(value, sharding_of.get(name, default)))
  return nnx.from_flat_state(flat)


class OrbaxReader:
  """Reads slices of single arrays of a checkpoint through TensorStore (for streaming export):
  `read(path, index)` returns `param[index]` without reading the rest of the parameter."""

  def __init__(self, path: str | os.PathLike, *, verify: bool = True):
    """verify: check the files' checksums (`verify_checksums`) first. The stored arrays are always
    checked against the recorded config (`check_arrays`), so nothing inconsistent is exported."""
    self.directory = resolve(path)
    if verify:
      verify_checksums(self.directory)
    self.info = read_info(self.directory)
    self.config = config_from_info(self.info)
    self.arrays = _saved_arrays(self.directory)
    _, abstract = abstract_model(self.config)
    expected = {p: tuple(v.shape) for p, v in flat_state(abstract).items() if not fp8.is_fp8_path(p)}
    check_arrays(self.directory, {n: v for n, v in self.arrays.items() if not fp8.is_fp8_path(n)}, expected,
                 f"its '{CONFIG_ITEM}'")
    self._context = ocp.type_handlers.get_ts_context(use_ocdbt=True)
    self._open: dict[str, Any] = {}
    self._cached: tuple | None = None
    state_dir = epath.Path(self.directory) / STATE_ITEM
    self._ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(state_dir)
    with _damaged(self.directory, f"'{STATE_ITEM}/_METADATA'"), open(state_dir / "_METADATA") as f:
      self._zarr3 = bool(json.load(f).get("use_zarr3", False))

  def shape(self, path: str) -> tuple[int, ...]:
    return tuple(self.arrays[path][1].shape)

  def dtype(self, path: str) -> np.dtype:
    return np.dtype(self.arrays[path][1].dtype)

  def _store(self, path: str):
    if path not in self._open:
      if path not in self.arrays:
        raise CheckpointError(f"{self.directory}: no array '{path}'")
      meta = self.arrays[path][1]
      info = ocp.type_handlers.ParamInfo(
        name=meta.name, parent_dir=epath.Path(meta.directory), is_ocdbt_checkpoint=self._ocdbt,
        use_zarr3=self._zarr3, ts_context=self._context)
      spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
      with _damaged(self.directory, f"array '{path}'"):
        self._open[path] = ts.open(ts.Spec(spec), open=True, read=True, context=self._context).result()
    return self._open[path]

  def read(self, path: str, index: tuple[int, ...] = ()) -> np.ndarray:
    """`param[index]`. Storage chunks are read whole, so the chunk-aligned region around `index`
    is read once and kept until a read falls outside it: reading a parameter's slices in order
    reads each chunk once (memory: one chunk region)."""
    if not index:
      with _damaged(self.directory, f"array '{path}'"):
        return np.asarray(self._store(path).read().result())
    meta = self.arrays[path][1]
    chunks = tuple(meta.storage.chunk_shape) if meta.storage is not None else tuple(meta.shape)
    region = tuple((i // c * c, min(i // c * c + c, n)) for i, c, n in zip(index, chunks, meta.shape))
    key = (path, region)
    if self._cached is None or self._cached[0] != key:
      self._cached = None  # free the old region before reading the next
      sel = tuple(slice(a, b) for a, b in region)
      store = self._store(path)
      with _damaged(self.directory, f"array '{path}'"):
        self._cached = (key, np.asarray(store[sel].read().result()))
    return self._cached[1][tuple(i - a for i, (a, _) in zip(index, region))]

  def close(self):
    self._open.clear()
    self._cached = None
