"""The SFT data config and pipelines: chat JSONL (or the embedded stdlib Q&A) -> packed or padded training rows.

`ChatDataConfig` is the `data` section of an SFT config. `make_chat_pipeline` is the training iterator (grain, like
the pretraining `DataPipeline`): rows -> data shard (row i goes to shard i % shard_count, `ernie_jax.data.shards`) -> shuffle
(seeded, reshuffled every epoch) -> repeat -> render + tokenize (`ernie_jax.data.chat_template`) -> pack or pad ->
batch; deterministic and checkpointable (`get_state()` / `set_state()` JSON dicts, `ernie_jax.data.iterator`).
`make_chat_eval_batches` is one pass over the held-out split, one conversation per padded row, in file order.

Rows (keys of `ernie_jax.data.packing.KEYS`, int32 [batch, seq_len]): a conversation's ids / mask from
`ChatRenderer.encode` become inputs = ids[:-1], targets = ids[1:], loss_mask = mask[1:] (so loss_mask[t] = 1 where
targets[t] is an assistant-content or end-of-turn token, see `chat_template`), positions 0.. within the
conversation, segment_ids 1, 2, ... per conversation in the row and 0 on padding (inputs = targets = loss_mask = 0
there). packing=True: conversations are packed whole into rows by first-fit over `packing_bins` rows at a time
(grain `FirstFitPackIterDataset`; attention and loss never cross segments, and no conversation is split across
rows); packing=False: one conversation per row.

Length. A conversation of T tokens fits when T - 1 <= seq_len. One that does not is, with overlong="truncate",
cut at the end of its last assistant turn that fits -- the trailing turns are dropped, never part of a target --
provided the kept turns hold at least one supervised token, else dropped; with overlong="drop" it is dropped.
(ERNIEKit instead keeps the last turns and drops the first ones.) A conversation whose assistant turns all have
"loss": false is dropped too (nothing to learn).

Counting (`pipeline.stats`, a dict of ints): "rows" (rows of this process's shard), and, per distinct row seen so
far by this process, "truncated", "dropped" and "skipped" (bad rows under bad_rows="skip"); a resumed run counts
again from its restart.

Held-out split: `eval_paths` files; else for the embedded data its held-out functions (`stdlib_qa`); else, when
`paths` are given, a fixed pseudo-random `eval_fraction` of their rows (permutation seeded with `EVAL_SPLIT_SEED`,
independent of `seed`, so changing the shuffle seed never moves a row between the splits), which training skips.
"""

from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np

from ernie_jax.data import stdlib_qa
from ernie_jax.data.chat import FORMATS, ChatRows, MemoryRows
from ernie_jax.data.chat_template import TEMPLATES, ChatRenderer, ChatTemplateError, render_builtin
from ernie_jax.data.iterator import GrainIterator
from ernie_jax.data.packing import KEYS
from ernie_jax.data.sources import BAD_ROWS, BadRow, DataError, expand_paths
from ernie_jax.data.tokenizers import BEGIN_OF_SENTENCE, END_OF_SENTENCE, Tokenizer, get_tokenizer

OVERLONG = ("truncate", "drop")
EVAL_SPLIT_SEED = 20250630
EMBEDDED = {"train": "<stdlib_qa:train>", "heldout": "<stdlib_qa:heldout>"}


@dataclasses.dataclass(frozen=True)
class ChatDataConfig:
  # Training conversations: "" = the embedded Python-stdlib Q&A (`ernie_jax.data.stdlib_qa`, train split), else
  # comma-separated JSONL files or glob patterns (** allowed), one conversation per line.
  paths: str = ""
  # Row format: "messages" (OpenAI {"messages": [{"role", "content", "loss"?}]}), "erniekit" (ERNIEKit SFT
  # {"system"?, "src", "tgt", "label"?}) or "auto" (per row: "messages" if the row has that key, else erniekit).
  format: str = "auto"
  # "auto": the tokenizer directory's chat_template (chat_template.jinja / tokenizer_config.json) if it has one,
  # else the built-in ERNIE 4.5 template; "builtin": always the built-in one (`ernie_jax.data.chat_template`).
  template: str = "auto"
  # As DataConfig.tokenizer: "bytes" (byte-level, vocab 259; ERNIE's <|begin_of_sentence|> / <|end_of_sentence|>
  # become its <s> / </s>), "bpe" (trained once on the training conversations, cached as <workdir>/tokenizer.json)
  # or a path to tokenizer.model / tokenizer.json / a tokenizer directory (e.g. a converted ERNIE 4.5 model).
  tokenizer: str = "bytes"
  bpe_vocab_size: int = 4096
  bpe_train_rows: int = 2000  # conversations (from the start of the training rows) the BPE is trained on
  seq_len: int = 256  # tokens per row (the model sees seq_len inputs and predicts seq_len targets)
  packing: bool = True  # several whole conversations per row (segment ids), else one per row, padded
  packing_bins: int = 8  # packing=True: rows filled at a time by first-fit (more: less padding, more reordering)
  # A conversation longer than seq_len: "truncate" (drop trailing turns at a turn boundary, keeping at least one
  # supervised assistant turn; dropped if even the first does not fit) or "drop"; both counted in pipeline.stats.
  overlong: str = "truncate"
  # A bad row (not JSON, no messages / src+tgt, unknown role, non-string content, empty or no assistant turn,
  # ERNIEKit src / tgt / label lengths differ, ...): "error" stops with a one-line DataError naming file:line;
  # "skip" skips it and counts it (pipeline.stats["skipped"]).
  bad_rows: str = "error"
  shuffle: bool = True  # shuffle conversations (reshuffled every epoch) and the packed rows of each bin group
  seed: int = 0  # shuffle seed
  # Held-out conversations for the held-out assistant loss: "" = the embedded held-out split when paths="",
  # else `eval_fraction` of the rows of `paths`; or comma-separated JSONL files / globs (then all of `paths` trains).
  eval_paths: str = ""
  # paths set and eval_paths="": this fraction of their rows (a fixed pseudo-random choice, at least 1 row) is
  # held out and not trained on; 0 = no held-out split (make_chat_eval_batches returns []).
  eval_fraction: float = 0.05
  max_examples: int = 0  # train on only the first N training conversations; 0 = all
  read_threads: int = 2  # grain threads that render and tokenize conversations ahead of the trainer


def validate(cfg: ChatDataConfig) -> None:
  """A one-line DataError naming the first bad field."""
  choices = {"format": FORMATS, "template": TEMPLATES, "overlong": OVERLONG, "bad_rows": BAD_ROWS}
  for name, allowed in choices.items():
    if getattr(cfg, name) not in allowed:
      raise DataError(f"data.{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
  for name, low in (("seq_len", 2), ("packing_bins", 1), ("bpe_vocab_size", 259), ("bpe_train_rows", 1),
                    ("max_examples", 0), ("read_threads", 0)):
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
      raise DataError(f"data.{name} must be an integer >= {low}, got {v!r}")
  if not isinstance(cfg.eval_fraction, (int, float)) or not 0 <= cfg.eval_fraction < 1:
    raise DataError(f"data.eval_fraction must be in [0, 1), got {cfg.eval_fraction!r}")
  for name in ("paths", "eval_paths", "tokenizer"):
    if not isinstance(getattr(cfg, name), str):
      raise DataError(f"data.{name} must be a string, got {getattr(cfg, name)!r}")


class Subset:
  """Rows `indices` of a row source (`ChatRows` / `MemoryRows`), with its `where` / `skipped`."""

  def __init__(self, rows, indices):
    self.rows, self.indices = rows, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self.rows[int(self.indices[int(i)])]

  def where(self, i: int) -> str:
    return self.rows.where(int(self.indices[int(i)]))

  def skip(self, i: int, msg: str) -> None:
    self.rows.skip(int(self.indices[int(i)]), msg)

  @property
  def skipped(self) -> dict:
    return self.rows.skipped

  @property
  def bad_rows(self) -> str:
    return self.rows.bad_rows


def _split(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, held-out indices) of n rows: a fixed pseudo-random `fraction` held out (at least 1)."""
  if fraction <= 0 or n < 2:
    return np.arange(n), np.arange(0)
  k = min(max(1, round(fraction * n)), n - 1)
  perm = np.random.default_rng(EVAL_SPLIT_SEED).permutation(n)
  return np.sort(perm[k:]), np.sort(perm[:k])


def _file_rows(cfg: ChatDataConfig, paths: str, what: str):
  return ChatRows(expand_paths(paths, what), cfg.format, cfg.bad_rows)


def _embedded_rows(cfg: ChatDataConfig, split: str):
  return MemoryRows(stdlib_qa.conversations(split), EMBEDDED[split], cfg.bad_rows)


def train_rows(cfg: ChatDataConfig, file_rows=_file_rows, embedded=_embedded_rows):
  """The training conversations (a row source: len, [i] -> conversation | None, where(i)). file_rows(cfg, paths,
  what) reads files, embedded(cfg, split) is the embedded data set (`ernie_jax.data.vl_chat` passes its own)."""
  if not cfg.paths:
    return embedded(cfg, "train")
  rows = file_rows(cfg, cfg.paths, "data.paths")
  if cfg.eval_paths:
    return rows
  return Subset(rows, _split(len(rows), cfg.eval_fraction)[0])


def eval_rows(cfg: ChatDataConfig, file_rows=_file_rows, embedded=_embedded_rows):
  """The held-out conversations (see the module docstring); None when there is no held-out split."""
  if cfg.eval_paths:
    return file_rows(cfg, cfg.eval_paths, "data.eval_paths")
  if not cfg.paths:
    return embedded(cfg, "heldout")
  rows = file_rows(cfg, cfg.paths, "data.paths")
  held = _split(len(rows), cfg.eval_fraction)[1]
  return Subset(rows, held) if len(held) else None


class CountedExamples:
  """What the chat and the preference examples share: the rows, the renderer, the truncated / dropped row
  indices and the usability check. `what` names the rows in messages; `__getitem__` is the subclass's."""

  what = "conversations"

  def __init__(self, rows, renderer: ChatRenderer, seq_len: int, overlong: str):
    self.rows, self.renderer, self.seq_len, self.overlong = rows, renderer, seq_len, overlong
    self.truncated: set[int] = set()
    self.dropped: set[int] = set()

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int):
    raise NotImplementedError

  def stats(self) -> dict[str, int]:
    return {"rows": len(self), "truncated": len(self.truncated), "dropped": len(self.dropped),
            "skipped": len(self.rows.skipped)}

  def check_usable(self, n: int = 100) -> None:
    """One of the first n rows must give an example (else the repeating pipeline would never yield a row)."""
    for i in range(min(n, len(self))):
      if self[i] is not None:
        return
    raise DataError(f"none of the first {min(n, len(self))} {self.what} ({self.rows.where(0)} ...) is usable: "
                    f"{self.stats()} (data.seq_len={self.seq_len}, data.overlong={self.overlong!r})")


class ChatExamples(CountedExamples):
  """Random access: row i -> its (truncated) example {"inputs", "targets", "loss_mask"} of <= seq_len tokens, or
  None (bad row skipped, or dropped); counts truncated / dropped / skipped rows once per row index."""

  def __getitem__(self, i: int) -> dict[str, np.ndarray] | None:
    i = int(i)
    encoded = self.encoded(i)
    if encoded is None:
      return None
    _, ids, mask, turns = encoded
    end = self.kept_end(i, ids, mask, turns)
    if end is None:
      return None
    return {"inputs": ids[:end - 1], "targets": ids[1:end], "loss_mask": mask[1:end]}

  def encoded(self, i: int):
    """(conversation, ids, mask, turns) of row i (`ChatRenderer.encode`), or None for a bad row skipped."""
    conv = self.rows[i]
    if conv is None:
      return None
    try:
      return (conv, *self.renderer.encode(conv))
    except ChatTemplateError as e:
      raise DataError(f"{self.rows.where(i)}: {e}") from None
    except BadRow as e:  # a template that fails on this row
      return self.bad_row(i, e)

  def bad_row(self, i: int, e: BadRow) -> None:
    """A row found bad while building its example: a DataError naming file:line (bad_rows="error"), or skipped
    and counted (returns None)."""
    if self.rows.bad_rows == "error":
      raise DataError(f"{self.rows.where(i)}: {e.reason}; {e.fix}, or set data.bad_rows=skip to skip and count such "
                      "rows") from None
    self.rows.skip(i, f"{self.rows.where(i)}: {e.reason}")
    return None

  def fits(self, ids: np.ndarray, end: int) -> bool:
    """Whether the first `end` tokens of a conversation fit one row (VL adds the image budget)."""
    return end - 1 <= self.seq_len

  def kept_end(self, i: int, ids: np.ndarray, mask: np.ndarray, turns) -> int | None:
    """How many tokens of row i's conversation are kept: all when they fit, else (overlong="truncate") up to the
    end of its last supervised assistant turn that fits; None (counted as dropped) when none fits, with
    overlong="drop", or when no kept token is supervised."""
    end = len(ids)
    if not self.fits(ids, end):
      ends = [e for e, supervised in turns if supervised and self.fits(ids, e)]
      if self.overlong == "drop" or not ends:
        self.dropped.add(i)
        return None
      self.truncated.add(i)
      end = ends[-1]
    if not mask[1:end].any():
      self.dropped.add(i)
      return None
    return end


def pad_example(ex: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """One conversation -> a row of `seq_len` (segment 1, positions from 0; zeros after it)."""
  n = len(ex["inputs"])
  row = {k: np.zeros(seq_len, np.int32) for k in KEYS}
  row["inputs"][:n], row["targets"][:n], row["loss_mask"][:n] = ex["inputs"], ex["targets"], ex["loss_mask"]
  row["segment_ids"][:n] = 1
  row["positions"][:n] = np.arange(n)
  return row


def _canonical(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"inputs": np.asarray(ex["inputs"], np.int32), "targets": np.asarray(ex["targets"], np.int32),
          "segment_ids": np.asarray(ex["inputs_segment_ids"], np.int32),
          "positions": np.asarray(ex["inputs_positions"], np.int32),
          "loss_mask": np.asarray(ex["loss_mask"], np.int32)}


def example_stream(examples: CountedExamples, cfg: ChatDataConfig, batch_size: int) -> grain.IterDataset:
  """Examples -> shuffled (seeded, reshuffled every epoch) -> repeated -> usable ones only, read by
  `cfg.read_threads` threads ahead of the trainer."""
  ds = grain.MapDataset.source(examples)
  if cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)
  ds = ds.repeat(None).filter(lambda ex: ex is not None)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=max(cfg.read_threads, 1),
                                              prefetch_buffer_size=max(4 * batch_size, 16)))


class ExamplePipeline(GrainIterator):
  """A training iterator over `self.examples` (a `CountedExamples`) rendered by `self.renderer`."""

  @property
  def stats(self) -> dict[str, int]:
    """{"rows", "truncated", "dropped", "skipped"} of this process's shard (see the module docstring)."""
    return self.examples.stats()

  @property
  def template(self) -> str:
    """The chat template in use ("builtin" or the file it came from)."""
    return self.renderer.template.name


def make_renderer(cfg: ChatDataConfig, tokenizer: Tokenizer) -> ChatRenderer:
  try:
    return ChatRenderer(tokenizer, cfg.template)
  except ChatTemplateError as e:
    raise DataError(str(e)) from None


class ChatPipeline(ExamplePipeline):
  """Iterator over this process's rows of each global batch: dicts of int32 [batch_size, seq_len] (`KEYS`).
  Subclasses (`ernie_jax.data.vl_chat.VLChatPipeline`) change the renderer, rows, examples and row layout through
  `make_renderer`, `rows`, `make_examples` and `to_rows`."""

  def __init__(self, cfg: ChatDataConfig, tokenizer: Tokenizer, *, batch_size: int, shard_index: int = 0,
               shard_count: int = 1):
    validate(cfg)
    if batch_size < 1:
      raise DataError(f"batch_size must be >= 1, got {batch_size}")
    self.cfg, self.tokenizer = cfg, tokenizer
    self.renderer = self.make_renderer()
    rows = self.rows()
    if cfg.max_examples:
      rows = Subset(rows, np.arange(min(cfg.max_examples, len(rows))))
    rows = Subset(rows, np.arange(len(rows))[shard_index::shard_count])
    if len(rows) == 0:
      raise DataError(f"data shard {shard_index} of {shard_count} (run.data_shards) got no training conversations")
    self.examples = self.make_examples(rows)
    self.examples.check_usable()
    it = self.to_rows(example_stream(self.examples, cfg, batch_size))
    self.dataset = it.batch(batch_size, drop_remainder=True)
    self._it = iter(self.dataset)

  def make_renderer(self) -> ChatRenderer:
    return make_renderer(self.cfg, self.tokenizer)

  def rows(self):
    return train_rows(self.cfg)

  def make_examples(self, rows) -> CountedExamples:
    return ChatExamples(rows, self.renderer, self.cfg.seq_len, self.cfg.overlong)

  def to_rows(self, it: grain.IterDataset) -> grain.IterDataset:
    """Examples -> rows of seq_len: packed (first-fit) or padded."""
    cfg = self.cfg
    if not cfg.packing:
      return it.map(lambda ex: pad_example(ex, cfg.seq_len))
    length = {"inputs": cfg.seq_len, "targets": cfg.seq_len, "loss_mask": cfg.seq_len}
    return grain.experimental.FirstFitPackIterDataset(it, length_struct=length, num_packing_bins=cfg.packing_bins,
                                                      seed=cfg.seed, shuffle_bins=cfg.shuffle).map(_canonical)


def make_chat_pipeline(cfg: ChatDataConfig, tokenizer: Tokenizer, *, batch_size: int, shard_index: int = 0,
                       shard_count: int = 1) -> ChatPipeline:
  """The SFT training iterator (see `ChatPipeline` and the module docstring)."""
  return ChatPipeline(cfg, tokenizer, batch_size=batch_size, shard_index=shard_index,
                      shard_count=shard_count)


def make_chat_eval_batches(cfg: ChatDataConfig, tokenizer: Tokenizer, *, batch_size: int,
                           stats: dict | None = None) -> list[dict[str, np.ndarray]]:
  """The held-out split as padded batches (one conversation per row, in order; the last batch filled with all-zero
  rows), [] when there is no held-out split. Overlong conversations are truncated / dropped as in training; pass a
  dict as `stats` to receive the counts ({"rows", "truncated", "dropped", "skipped"})."""
  validate(cfg)
  rows = eval_rows(cfg)
  if rows is None:
    return []
  examples = ChatExamples(rows, make_renderer(cfg, tokenizer), cfg.seq_len, cfg.overlong)
  return padded_batches(examples, lambda ex: pad_example(ex, cfg.seq_len), batch_size, stats)


def padded_batches(examples: CountedExamples, pad, batch_size: int, stats: dict | None = None
                   ) -> list[dict[str, np.ndarray]]:
  """Every usable example, in order, one per row (`pad(example)` -> a row), as batches of `batch_size` rows (the
  last one filled with all-zero rows); `stats` receives the examples' counts."""
  padded = [pad(ex) for ex in (examples[i] for i in range(len(examples))) if ex is not None]
  if stats is not None:
    stats.update(examples.stats())
  batches = []
  for b in range(math.ceil(len(padded) / batch_size)):
    group = padded[b * batch_size:(b + 1) * batch_size]
    group += [{k: np.zeros_like(v) for k, v in group[0].items()}] * (batch_size - len(group))
    batches.append({k: np.stack([r[k] for r in group]) for k in group[0]})
  return batches


def describe_heldout(cfg: ChatDataConfig, stats: dict, what: str = "conversations") -> str:
  """The start-up line for a held-out split whose counts are `stats` ({"rows", "truncated", "dropped", "skipped"}; the
  rows neither dropped nor skipped are evaluated); a DataError naming the split and `data.seq_len` when it has rows
  but none is usable (so no evaluation would run at all)."""
  usable = stats["rows"] - stats["dropped"] - stats["skipped"]
  where = (f"data.eval_paths ({cfg.eval_paths})" if cfg.eval_paths else
           f"the held-out split (data.eval_fraction={cfg.eval_fraction} of data.paths)" if cfg.paths else
           "the embedded held-out split")
  counts = f"{stats['truncated']} truncated, {stats['dropped']} dropped, {stats['skipped']} skipped"
  if stats["rows"] and not usable:
    raise DataError(f"{where}: none of its {stats['rows']} {what} can be evaluated ({counts}; data.seq_len="
                    f"{cfg.seq_len}, data.overlong={cfg.overlong!r}): raise data.seq_len or shorten them")
  return f"held-out: {where}, {usable} of {stats['rows']} {what} evaluated ({counts})"


def load_chat_tokenizer(cfg: ChatDataConfig, workdir: str | None) -> Tokenizer:
  """The tokenizer of `cfg.tokenizer` (as `load_tokenizer_for`); "bpe" is trained on the training conversations
  (rendered with the built-in template, without its two special tokens)."""
  validate(cfg)

  def training_texts():
    rows = train_rows(cfg)
    for i in range(min(len(rows), cfg.bpe_train_rows)):
      conv = rows[i]
      if conv is not None:
        yield render_builtin(conv).replace(BEGIN_OF_SENTENCE, "").replace(END_OF_SENTENCE, "\n")

  return get_tokenizer(cfg.tokenizer, workdir=workdir, bpe_vocab_size=cfg.bpe_vocab_size,
                       training_texts=training_texts)
