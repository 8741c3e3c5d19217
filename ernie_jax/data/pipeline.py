"""The training data config and the pipelines it selects.

`DataConfig` is the `data` section of the training config. `make_pipeline` picks the pipeline of
`data.source` (`SOURCES`): the text pipeline `DataPipeline` below, or the image-caption pipeline
`ernie_jax.data.vl.VLDataPipeline` for `VL_SOURCES`; `load_tokenizer_for` and `unigram_entropy`
dispatch the same way. (`data.vl` does not import this module, so there is no cycle.)

The text pipeline (grain): source -> data shard -> shuffle -> repeat -> tokenize -> pack ->
batch, deterministic and checkpointable (`ernie_jax.data.iterator.GrainIterator`: the position is
a JSON dict saved with every checkpoint). Each process reads a disjoint slice of the documents
(index i goes to shard i % shard_count, see `ernie_jax.data.shards`) and yields its rows of the global batch.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from ernie_jax.data import packing, sources, vl
from ernie_jax.data.iterator import GrainIterator
from ernie_jax.data.tokenizers import Tokenizer, encode, get_tokenizer

TEXT_SOURCES = ("stdlib", "text", "jsonl", "tokens")
VL_SOURCES = ("shapes", "image_jsonl")  # image-caption sources (ernie_jax.data.vl), model_family="vl"
SOURCES = TEXT_SOURCES + VL_SOURCES
VL_FIELDS = ("image_size", "images_per_row", "jsonl_image_field")  # used by the VL sources only


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # Where documents come from: "stdlib" (the Python standard library's *.py files; needs nothing),
  # "text" (raw text files), "jsonl" (one JSON object per line, text under `jsonl_field`) or
  # "tokens" (pre-tokenized, memory-mapped .npy / .bin token files, documents separated by EOS);
  # for model_family="vl" (ernie_jax.data.vl): "shapes" (built-in drawn shapes with captions) or
  # "image_jsonl" (JSONL lines {"image": "path.png", "text": "caption"}, paths relative to the file).
  source: str = "stdlib"
  paths: str = ""  # comma-separated files or glob patterns (** allowed) for text / jsonl / tokens
  text_mode: str = "file"  # source=text: one document per "file" or per non-empty "line"
  jsonl_field: str = "text"  # source=jsonl: the field holding the document text
  # source=text|jsonl: a bad row (JSONL: not JSON, no `jsonl_field`, a null / number / list instead
  # of a string; text read by a non-byte tokenizer: not UTF-8) stops the run with a one-line error
  # naming file:line ("error"), or is skipped and counted ("skip": logged at the 1st, 10th, 100th,
  # ... skipped row). The stdlib corpus is used as it is.
  bad_rows: str = "error"
  # "bytes" (byte-level, vocab 259), "bpe" (train a byte-level BPE of bpe_vocab_size once on the
  # data, cached as <workdir>/tokenizer.json) or a path to tokenizer.model / tokenizer.json / a dir.
  tokenizer: str = "bytes"
  bpe_vocab_size: int = 4096
  bpe_train_documents: int = 2000  # documents (from the start of the source) used to train the BPE
  # source=tokens, raw .bin files without a sidecar: dtype of the stored ids. Files written by
  # ernie_jax.cli.pretokenize carry a sidecar <file>.json with their dtype, which wins over this.
  token_dtype: str = "uint16"
  eos_id: int = -1  # document separator / end token; -1: the tokenizer's EOS (else the model's)
  add_bos: bool = False  # prepend <s> to every document (text sources)
  add_eos: bool = True  # append </s> to every document (text sources), so the model learns to end
  seq_len: int = 256  # tokens per packed row
  shuffle: bool = True  # shuffle documents (windows for source=tokens); reshuffled every epoch
  # Packed rows are further shuffled in windows of this many rows, so that the rows of a batch come
  # from different documents (a long document fills many consecutive rows); 0 = off.
  shuffle_window: int = 1024
  seed: int = 0  # shuffle seed
  max_documents: int = 0  # use only the first N documents (windows); 0 = all (shapes: 100,000 drawn)
  read_threads: int = 2  # grain threads that read and tokenize documents ahead of the trainer
  worker_processes: int = 0  # grain worker processes (mp_prefetch) for heavy tokenization; 0 = none
  # VL sources: every image is resized to image_size x image_size (a multiple of 28 = patch 14 x
  # merge 2, so all grids are the same static (1, s/14, s/14)); each row packs images_per_row
  # (image, caption) examples; source=image_jsonl: the field holding the image path.
  image_size: int = 56
  images_per_row: int = 1
  jsonl_image_field: str = "image"


def build_source(cfg: DataConfig, eos_id: int, decode: bool = False):
  """The document source of `cfg.source`; decode: text documents as strict UTF-8 str (for a text
  tokenizer; see `sources.TextDocuments`)."""
  if cfg.source == "stdlib":
    return sources.TextDocuments(sources.stdlib_files(), "file")
  if cfg.source == "text":
    return sources.TextDocuments(sources.expand_paths(cfg.paths), cfg.text_mode, bad_rows=cfg.bad_rows,
                                 decode=decode)
  if cfg.source == "jsonl":
    return sources.TextDocuments(sources.expand_paths(cfg.paths), "jsonl", cfg.jsonl_field, bad_rows=cfg.bad_rows)
  if cfg.source == "tokens":
    return sources.TokenWindows(sources.expand_paths(cfg.paths), cfg.seq_len, eos_id, cfg.token_dtype)
  raise sources.DataError(f"data.source must be one of {SOURCES}, got {cfg.source!r}")


def load_tokenizer_for(cfg: DataConfig, workdir: str | None) -> Tokenizer | None:
  """The tokenizer of text sources (None for pre-tokenized data)."""
  if cfg.source == "tokens":
    return None

  def training_texts():
    if cfg.source in VL_SOURCES:  # the captions
      src = vl.build_source(cfg)
      return (src.caption(i) for i in range(min(len(src), cfg.bpe_train_documents)))
    docs = build_source(cfg, -1, decode=True)
    return (d for d in (docs[i] for i in range(min(len(docs), cfg.bpe_train_documents))) if d is not None)

  return get_tokenizer(cfg.tokenizer, workdir=workdir, bpe_vocab_size=cfg.bpe_vocab_size,
                       training_texts=training_texts)


def is_text_tokenizer(tokenizer: Tokenizer | None) -> bool:
  """Whether the tokenizer reads text (decoded UTF-8) rather than raw bytes."""
  return tokenizer is not None and tokenizer.kind != "bytes"


def resolve_eos(cfg: DataConfig, tokenizer: Tokenizer | None, model_eos: int) -> int:
  if cfg.eos_id >= 0:
    return cfg.eos_id
  if tokenizer is not None and tokenizer.eos_id is not None:
    return int(tokenizer.eos_id)
  return model_eos


class DataPipeline(GrainIterator):
  """Iterator over one data shard's rows of each global batch: dicts of int32 [rows, seq_len]."""

  def __init__(self, cfg: DataConfig, tokenizer: Tokenizer | None, *, batch_size: int, eos_id: int,
               shard_index: int = 0, shard_count: int = 1):
    self.cfg, self.tokenizer, self.eos_id = cfg, tokenizer, eos_id
    self.source = build_source(cfg, eos_id, decode=is_text_tokenizer(tokenizer))
    ds = grain.MapDataset.source(self.source)
    if cfg.max_documents:
      ds = ds[:cfg.max_documents]
    ds = ds[shard_index::shard_count]
    if len(ds) == 0:
      raise sources.DataError(f"data shard {shard_index} of {shard_count} (run.data_shards) got no documents "
                              f"({len(self.source)} in total)")
    self.num_documents = len(ds)
    if cfg.shuffle:
      ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(None)
    if cfg.source != "tokens":
      bos = tokenizer.bos_id
      ds = ds.map(lambda doc: packing.document_example(
        encode(tokenizer, doc), bos_id=bos, eos_id=eos_id, add_bos=cfg.add_bos, add_eos=cfg.add_eos))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(cfg.read_threads, 1),
                                              prefetch_buffer_size=max(4 * batch_size, 16)))
    if cfg.source != "tokens":
      it = packing.pack_documents(it, cfg.seq_len)
      if cfg.shuffle and cfg.shuffle_window > 1:
        it = grain.experimental.WindowShuffleIterDataset(it, window_size=cfg.shuffle_window, seed=cfg.seed + 1)
    it = it.batch(batch_size, drop_remainder=True)
    if cfg.worker_processes:
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_processes))
    self.dataset = it
    self._it = iter(it)


def make_pipeline(cfg: DataConfig, tokenizer: Tokenizer | None, model_cfg=None, **kw) -> GrainIterator:
  """The pipeline of `cfg.source`: `DataPipeline` (text), or `ernie_jax.data.vl.VLDataPipeline`
  (image-caption sources; needs the VLConfig `model_cfg` for its special tokens and patch sizes).
  kw: batch_size, eos_id, shard_index, shard_count."""
  if cfg.source in VL_SOURCES:
    return vl.VLDataPipeline(cfg, tokenizer, model_cfg, **kw)
  return DataPipeline(cfg, tokenizer, **kw)


def unigram_entropy(cfg: DataConfig, tokenizer: Tokenizer | None, eos_id: int, vocab_size: int,
                    max_tokens: int = 2_000_000) -> float:
  """Entropy (nats) of the unigram distribution of training targets, over up to `max_tokens`
  targets from the start of the data: the loss of the best model that ignores context (VL sources:
  the caption targets, see `ernie_jax.data.vl.caption_unigram_entropy`)."""
  if cfg.source in VL_SOURCES:
    return vl.caption_unigram_entropy(cfg, tokenizer, eos_id, vocab_size)
  src = build_source(cfg, eos_id, decode=is_text_tokenizer(tokenizer))
  n = min(len(src), cfg.max_documents or len(src))
  counts = np.zeros(vocab_size, np.int64)
  total = 0
  for i in range(n):
    if cfg.source == "tokens":
      ex = src[i]
      t = ex["targets"][ex["loss_mask"] > 0]
    else:
      doc = src[i]
      if doc is None:  # a bad row, skipped (data.bad_rows=skip)
        continue
      ex = packing.document_example(encode(tokenizer, doc), bos_id=tokenizer.bos_id, eos_id=eos_id,
                                    add_bos=cfg.add_bos, add_eos=cfg.add_eos)
      if ex is None:
        continue
      t = ex["targets"]
    counts += np.bincount(np.clip(t, 0, vocab_size - 1), minlength=vocab_size)
    total += len(t)
    if total >= max_tokens:
      break
  p = counts[counts > 0] / max(total, 1)
  return float(-(p * np.log(p)).sum())
