"""Preference pairs for DPO: rows, the training pipeline and per-pair batches (for the reference log-probs).

Rows (JSONL, one pair per line; data.format "auto" picks per row: "messages" if the row has that key, else erniekit):
* "messages": `{"messages": [system?, user, (assistant, user)*], "chosen": answer, "rejected": answer}`. The prompt
  is validated as a conversation (`ernie_jax.data.chat.validate_messages`) and must end with a user turn. An answer
  is a string, an assistant message `{"role": "assistant", "content": ...}`, or a list of messages that starts and
  ends with an assistant turn (TRL's conversational `[{"role": "assistant", ...}]`, or a multi-turn continuation
  assistant, user, ..., assistant). Thinking answers are plain content ("<think>...</think>\\n\\n..." as in SFT).
* "erniekit": ERNIEKit's DPO rows (fields from PaddlePaddle/ERNIE `docs/datasets.md` @da43914, "DPO Dataset"; the
  conversion read from `ernie/dataset/dpo.py::process_session_example` @af226e1):
  `{"system": str?, "src": [user turns], "tgt": [assistant turns, one fewer than src], "response": [a, b],
  "sort": [sa, sb], "is_system": 0 | 1?}`. As ERNIEKit does: a `src` / `tgt` string is one turn; len(src) must be
  len(tgt) + 1; `response` and `sort` hold two items each; the response with the higher `sort` is chosen (equal
  sorts are refused); a response is a string or a list of an odd number of strings (a session: assistant, user,
  ..., assistant); with `is_system: 1` the first `src` item is the system prompt and the first `tgt` item is
  dropped; no text is stripped (ERNIEKit's DPO reader keeps them as they are, unlike its SFT reader). We also
  refuse empty `src` / `tgt` items, which ERNIEKit lets through.
Either way a pair is (prompt messages, chosen continuation, rejected continuation). Bad rows (not JSON, missing
prompt / chosen / rejected, wrong types, a prompt not ending with a user turn, an empty answer, identical chosen and
rejected, ...): a one-line `DataError` naming file:line, or skipped and counted with data.bad_rows="skip" (the
machinery of `ernie_jax.data.sources.TextDocuments` / `ernie_jax.data.chat`). `loss` keys are ignored: a pair's
prompt is never trained (its assistant turns get mask 0) and the assistant turns of its answers always are.

Rendering. The chosen sequence is `ChatRenderer.encode(prompt + chosen)` and the rejected one
`ChatRenderer.encode(prompt + rejected)` (`ernie_jax.data.chat_template`: the SFT template, tokenisation and loss
mask, so the mask covers the answer's tokens and its <|end_of_sentence|>, and not an empty think tag); a sequence of
ids / mask of T tokens gives T - 1 inputs = ids[:-1], targets = ids[1:], loss_mask = mask[1:].

THE ROW LAYOUT (what the DPO loss relies on). Batches are dicts of int32 [batch, seq_len] arrays `KEYS` = inputs,
targets, segment_ids, positions, loss_mask (plus float32 "ref_logps" [batch, seq_len] when reference log-probs are
given). The chosen and the rejected sequence of one pair are two separate sequences in the same row: pair k of a row
(k = 1 .. data.pairs_per_row) has its chosen sequence in segment 2k - 1 and its rejected sequence right after it in
segment 2k; positions restart at 0 for each sequence; padding (the end of a row) has segment 0 and 0 in every key.
So segment s > 0 is a chosen sequence when s is odd, and its rejected partner is segment s + 1; a row never holds
half of a pair. loss_mask[t] = 1 where targets[t] is a supervised answer token of that segment's sequence. A pair
fits in a row when len(chosen inputs) + len(rejected inputs) <= seq_len. packing=True packs whole pairs into rows
(grain `FirstFitPackIterDataset` over `packing_bins` rows at a time, at most `pairs_per_row` pairs per row; one
packed example per pair: chosen ++ rejected); packing=False: one pair per row (segments 1 and 2).
"ref_logps" (only with `ref_logps=` given to `make_preference_pipeline`: an array [num_train_pairs(cfg), 2] of
(chosen, rejected) reference log-probs per row index of the training source, before shuffling): the chosen value at
the first token of the chosen sequence, the rejected value at the first token of the rejected sequence, 0 elsewhere,
so the sum of ref_logps over segment s is the reference log-prob of sequence s. `preference_pair_batches(split=
"train")` gives every training pair (in source order, padded, one per row) with its row index, to compute them.

Length. A pair that does not fit is, with overlong="truncate", shortened by dropping its earliest prompt turns (a
user turn with the assistant turns after it, oldest first; the system prompt and the last user turn are kept) until
it fits, else dropped; with overlong="drop" it is dropped. Both counted (`stats`), as are pairs whose chosen or
rejected sequence has no supervised token (dropped) and skipped bad rows.

Data and splits: as SFT (`ernie_jax.data.sft`): data.paths = "" trains on the embedded pairs
(`ernie_jax.data.stdlib_qa.preference_pairs`, held out: its held-out functions); else JSONL files, held out:
`eval_paths`, or a fixed pseudo-random `eval_fraction` of the rows of `paths`, which training skips.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import grain
import numpy as np

from ernie_jax.data import sft, stdlib_qa
from ernie_jax.data.chat import FORMATS, ChatRows, MemoryRows, _kind, _shown, _string_list, validate_messages
from ernie_jax.data.chat_template import ChatRenderer, ChatTemplateError, render_builtin
from ernie_jax.data.packing import KEYS
from ernie_jax.data.sft import ChatDataConfig, CountedExamples, ExamplePipeline, Subset, example_stream
from ernie_jax.data.sources import BadRow, DataError, expand_paths, parse_json_row
from ernie_jax.data.tokenizers import BEGIN_OF_SENTENCE, END_OF_SENTENCE, Tokenizer, get_tokenizer

EMBEDDED = {"train": "<stdlib_qa_pairs:train>", "heldout": "<stdlib_qa_pairs:heldout>"}
REF_KEY = "ref_logps"
SPLITS = ("train", "heldout")
_FIX = "fix the row"


@dataclasses.dataclass(frozen=True)
class PreferenceDataConfig(ChatDataConfig):
  """The `data` section of a DPO config: `ChatDataConfig`'s fields (same meaning) read as preference pairs."""

  # Training pairs: "" = the embedded stdlib Q&A pairs (`stdlib_qa.preference_pairs`, train split), else
  # comma-separated JSONL files or glob patterns (** allowed), one pair per line.
  paths: str = ""
  # Row format: "messages" ({"messages": prompt, "chosen", "rejected"}), "erniekit" (ERNIEKit DPO {"system"?, "src",
  # "tgt", "response", "sort"}) or "auto" (per row: "messages" if the row has that key, else erniekit).
  format: str = "auto"
  # Tokens per row. A pair -- its chosen and its rejected sequence, each with the prompt -- must fit in one row (the
  # longest embedded pair is 552 byte tokens, the median 306; longer pairs: see `overlong`).
  seq_len: int = 576
  # A pair longer than seq_len: "truncate" (drop its earliest prompt turns, keeping the system prompt and the last
  # user turn; dropped if that does not fit either) or "drop"; both counted in pipeline.stats.
  overlong: str = "truncate"
  pairs_per_row: int = 4  # packing=True: at most this many pairs (2x sequences) in one row; packing=False: 1


def validate(cfg: PreferenceDataConfig) -> None:
  """A one-line DataError naming the first bad field."""
  sft.validate(cfg)
  v = cfg.pairs_per_row
  if not isinstance(v, int) or isinstance(v, bool) or v < 1:
    raise DataError(f"data.pairs_per_row must be an integer >= 1, got {v!r}")


class Pair(NamedTuple):
  """A preference pair: the prompt (ends with a user turn) and the two continuations (start and end with an
  assistant turn), as validated messages {"role", "content", "loss"}."""
  prompt: list[dict]
  chosen: list[dict]
  rejected: list[dict]


def _answer(value, key: str) -> list[dict]:
  """A "messages"-format answer (string, assistant message or list of messages) -> validated messages."""
  if isinstance(value, str):
    if not value.strip():
      raise BadRow(f"{key} is empty", _FIX)
    value = [{"role": "assistant", "content": value}]
  elif isinstance(value, dict):
    if value.get("role") != "assistant":
      raise BadRow(f"{key} is a message with role {_shown(value.get('role'))}; an answer is an assistant message "
                   "(or a string)", _FIX)
    value = [value]
  elif not isinstance(value, list):
    raise BadRow(f"{key} is {_kind(value)} ({_shown(value)}), not a string, an assistant message or a list of "
                 "messages", _FIX)
  out = validate_messages(value, key)
  if out[0]["role"] != "assistant":
    raise BadRow(f"{key} starts with a {out[0]['role']} message; an answer starts with the assistant turn", _FIX)
  return [dict(m, loss=m["role"] == "assistant") for m in out]


def _prompt(messages: list[dict], where: str) -> list[dict]:
  out = validate_messages(messages, where, prompt=True)
  if out[-1]["role"] != "user":
    raise BadRow(f"{where} ends with a {out[-1]['role']} message; the prompt must end with the user turn that "
                 "chosen and rejected answer", _FIX)
  return [dict(m, loss=False) for m in out]


def _pair(prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> Pair:
  if [(m["role"], m["content"]) for m in chosen] == [(m["role"], m["content"]) for m in rejected]:
    raise BadRow("chosen and rejected are identical (nothing to prefer)", _FIX)
  return Pair(prompt, chosen, rejected)


def messages_to_pair(obj: dict) -> Pair:
  """A "messages"-format row -> a `Pair` (see the module docstring); raises `BadRow`."""
  for key in ("messages", "chosen", "rejected"):
    if key not in obj:
      raise BadRow(f"no field {key!r}; found {list(obj)[:10]} (a preference row has 'messages' (the prompt), "
                   "'chosen' and 'rejected')", _FIX)
  return _pair(_prompt(obj["messages"], "messages"), _answer(obj["chosen"], "chosen"),
               _answer(obj["rejected"], "rejected"))


def _session(value, key: str) -> list[dict]:
  """An ERNIEKit DPO response (string or odd-length list of strings) -> assistant, user, ..., assistant."""
  value = [value] if isinstance(value, str) else value
  if not isinstance(value, list) or not value:
    raise BadRow(f"{key} is {_kind(value)} ({_shown(value)}), not a string or a list of strings", _FIX)
  for j, s in enumerate(value):
    if not isinstance(s, str):
      raise BadRow(f"{key}[{j}] is {_kind(s)} ({_shown(s)}), not a string", _FIX)
    if not s.strip():
      raise BadRow(f"{key}[{j}] is empty", _FIX)
  if len(value) % 2 != 1:
    raise BadRow(f"{key} holds {len(value)} strings; a session answer alternates assistant, user, ..., assistant "
                 "(an odd number)", _FIX)
  return [{"role": "assistant" if j % 2 == 0 else "user", "content": s, "loss": j % 2 == 0}
          for j, s in enumerate(value)]


def erniekit_to_pair(obj: dict) -> Pair:
  """An ERNIEKit DPO row -> a `Pair` (the conversion of ERNIEKit's `process_session_example`, see the module
  docstring); raises `BadRow`."""
  for key in ("src", "tgt", "response", "sort"):
    if key not in obj:
      raise BadRow(f"ERNIEKit DPO row has no field {key!r}; found {list(obj)[:10]}", _FIX)
  src, tgt = _string_list(obj, "src"), _string_list(obj, "tgt")
  if len(src) != len(tgt) + 1:
    raise BadRow(f"ERNIEKit DPO row has len(src)={len(src)}, len(tgt)={len(tgt)}; src must hold one more turn than "
                 "tgt (tgt answers every user turn but the last)", _FIX)
  response, sort = obj["response"], obj["sort"]
  if not isinstance(response, list) or len(response) != 2:
    raise BadRow(f"field 'response' is {_shown(response)}, not a list of two answers", _FIX)
  if (not isinstance(sort, list) or len(sort) != 2
      or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in sort)):
    raise BadRow(f"field 'sort' is {_shown(sort)}, not a list of two numbers (the higher marks the chosen)", _FIX)
  if sort[0] == sort[1]:
    raise BadRow(f"field 'sort' is {_shown(sort)}: equal scores, so neither response is chosen", _FIX)
  answers = [_session(r, f"response[{k}]") for k, r in enumerate(response)]
  chosen, rejected = answers if sort[0] > sort[1] else answers[::-1]
  is_system = obj.get("is_system", 0)
  if type(is_system) is not int or is_system not in (0, 1):
    raise BadRow(f"field 'is_system' is {_shown(is_system)}, not 0 / 1", _FIX)
  system = obj.get("system")
  if is_system == 1:
    if not tgt:
      raise BadRow("ERNIEKit DPO row has is_system=1 but an empty tgt (its first item goes with the system prompt)",
                   _FIX)
    system, src, tgt = src[0], src[1:], tgt[1:]
  if system is not None and not isinstance(system, str):
    raise BadRow(f"field 'system' is {_kind(system)} ({_shown(system)}), not a string", _FIX)
  prompt = [{"role": "system", "content": system}] if system is not None else []
  for q, a in zip(src, tgt):
    prompt += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
  prompt.append({"role": "user", "content": src[-1]})
  return _pair(_prompt(prompt, "ERNIEKit row"), chosen, rejected)


def detect_format(obj: dict) -> str:
  if "messages" in obj:
    return "messages"
  if any(k in obj for k in ("src", "tgt", "response")):
    return "erniekit"
  raise BadRow(f"neither 'messages' + 'chosen' + 'rejected' nor ERNIEKit's 'src' / 'tgt' / 'response' / 'sort'; "
               f"found {list(obj)[:10]}", _FIX)


def parse_pair_row(obj, fmt: str = "auto") -> Pair:
  """One decoded JSON row -> a validated `Pair` (see the module docstring); raises `BadRow`."""
  if not isinstance(obj, dict):
    raise BadRow(f"is {_kind(obj)}, not a JSON object", _FIX)
  fmt = detect_format(obj) if fmt == "auto" else fmt
  if fmt == "messages":
    return messages_to_pair(obj)
  if fmt == "erniekit":
    return erniekit_to_pair(obj)
  raise DataError(f"data.format must be one of {FORMATS}, got {fmt!r}")


class PairRows(ChatRows):
  """Preference pairs of JSONL files (`ChatRows`' file:line errors / skipping; rows[i] is a `Pair` or None)."""

  def _parse(self, i: int, data: bytes) -> Pair:
    return parse_pair_row(parse_json_row(data, ()), self.fmt)


class MemoryPairRows(MemoryRows):
  """In-memory preference rows (the embedded pairs) with the `PairRows` interface."""

  def parse(self, row) -> Pair:
    return parse_pair_row(row)


def _file_rows(cfg: PreferenceDataConfig, paths: str, what: str) -> PairRows:
  return PairRows(expand_paths(paths, what), cfg.format, cfg.bad_rows)


def train_rows(cfg: PreferenceDataConfig):
  """The training pairs, max_examples applied (a row source: len, [i] -> Pair | None, where(i)); its row index is
  the index of `ref_logps`."""
  if not cfg.paths:
    rows = MemoryPairRows(stdlib_qa.preference_pairs("train"), EMBEDDED["train"], cfg.bad_rows)
  else:
    rows = _file_rows(cfg, cfg.paths, "data.paths")
    if not cfg.eval_paths:
      rows = Subset(rows, sft._split(len(rows), cfg.eval_fraction)[0])
  if cfg.max_examples:
    rows = Subset(rows, np.arange(min(cfg.max_examples, len(rows))))
  return rows


def eval_rows(cfg: PreferenceDataConfig):
  """The held-out pairs (see the module docstring); None when there is no held-out split."""
  if cfg.eval_paths:
    return _file_rows(cfg, cfg.eval_paths, "data.eval_paths")
  if not cfg.paths:
    return MemoryPairRows(stdlib_qa.preference_pairs("heldout"), EMBEDDED["heldout"], cfg.bad_rows)
  rows = _file_rows(cfg, cfg.paths, "data.paths")
  held = sft._split(len(rows), cfg.eval_fraction)[1]
  return Subset(rows, held) if len(held) else None


def num_train_pairs(cfg: PreferenceDataConfig) -> int:
  """Rows of the training source (bad / dropped ones included): the length of `ref_logps`."""
  validate(cfg)
  return len(train_rows(cfg))


def _prompt_cuts(prompt: list[dict]) -> list[list[dict]]:
  """The prompt, then the prompt without its earliest turns, one turn more each time, down to system + last user."""
  head = prompt[:1] if prompt[0]["role"] == "system" else []
  body = prompt[len(head):]
  starts = [k for k, m in enumerate(body) if m["role"] == "user" and k > 0]
  return [prompt] + [head + body[k:] for k in starts]


class PairExamples(CountedExamples):
  """Random access: row i -> its packed-pair example (chosen ++ rejected: "inputs", "targets", "loss_mask", "half"
  (1 chosen / 2 rejected), "positions", and "ref" (float32) when `ref` [len(rows), 2] is given), or None (bad row
  skipped, or dropped); counts truncated / dropped / skipped rows once per row index."""

  what = "preference pairs"

  def __init__(self, rows, renderer: ChatRenderer, seq_len: int, overlong: str, ref: np.ndarray | None = None):
    super().__init__(rows, renderer, seq_len, overlong)
    self.ref = ref

  def _encode(self, prompt: list[dict], pair: Pair):
    c_ids, c_mask, _ = self.renderer.encode(prompt + pair.chosen)
    r_ids, r_mask, _ = self.renderer.encode(prompt + pair.rejected)
    return c_ids, c_mask, r_ids, r_mask

  def _fits(self, enc) -> bool:
    return len(enc[0]) - 1 + len(enc[2]) - 1 <= self.seq_len

  def _fit(self, i: int, pair: Pair):
    """The encodings of the pair, its prompt cut to fit (see the module docstring), or None (dropped)."""
    enc = self._encode(pair.prompt, pair)
    if self._fits(enc):
      return enc
    cuts = _prompt_cuts(pair.prompt)
    if self.overlong == "drop" or len(cuts) == 1:
      return None
    lo, hi, best = 1, len(cuts) - 1, None  # the fewest turns dropped that fit (shorter prompts: shorter pairs)
    while lo <= hi:
      mid = (lo + hi) // 2
      cand = self._encode(cuts[mid], pair)
      if self._fits(cand):
        best, hi = cand, mid - 1
      else:
        lo = mid + 1
    if best is not None:
      self.truncated.add(i)
    return best

  def __getitem__(self, i: int) -> dict[str, np.ndarray] | None:
    i = int(i)
    pair = self.rows[i]
    if pair is None:
      return None
    try:
      enc = self._fit(i, pair)
    except ChatTemplateError as e:
      raise DataError(f"{self.rows.where(i)}: {e}") from None
    except BadRow as e:  # a template that fails on this row
      if self.rows.bad_rows == "error":
        raise DataError(f"{self.rows.where(i)}: {e}") from None
      self.rows.skip(i, f"{self.rows.where(i)}: {e}")
      return None
    if enc is None or not enc[1][1:].any() or not enc[3][1:].any():
      self.truncated.discard(i)
      self.dropped.add(i)
      return None
    c_ids, c_mask, r_ids, r_mask = enc
    nc, nr = len(c_ids) - 1, len(r_ids) - 1
    ex = {"inputs": np.concatenate([c_ids[:-1], r_ids[:-1]]), "targets": np.concatenate([c_ids[1:], r_ids[1:]]),
          "loss_mask": np.concatenate([c_mask[1:], r_mask[1:]]),
          "half": np.repeat(np.asarray([1, 2], np.int32), [nc, nr]),
          "positions": np.concatenate([np.arange(nc), np.arange(nr)]).astype(np.int32)}
    if self.ref is not None:
      value = self.ref[i]
      if not np.all(np.isfinite(value)):
        raise DataError(f"{self.rows.where(i)}: its reference log-probs {value.tolist()} are not finite; compute "
                        "ref_logps for every pair that preference_pair_batches returns")
      ex["ref"] = np.zeros(nc + nr, np.float32)
      ex["ref"][0], ex["ref"][nc] = value
    return ex


def pad_pair(ex: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """One pair -> a row of `seq_len` (chosen segment 1, rejected segment 2, positions from 0 each; zeros after)."""
  n = len(ex["inputs"])
  row = {k: np.zeros(seq_len, np.int32) for k in KEYS}
  for key in ("inputs", "targets", "loss_mask", "positions"):
    row[key][:n] = ex[key]
  row["segment_ids"][:n] = ex["half"]
  if "ref" in ex:
    row[REF_KEY] = np.zeros(seq_len, np.float32)
    row[REF_KEY][:n] = ex["ref"]
  return row


def _canonical(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A packed row (grain's per-pair segment ids s = 1, 2, ...) -> the row layout: segment 2(s - 1) + half."""
  pair = np.asarray(ex["inputs_segment_ids"], np.int32)
  out = {"inputs": np.asarray(ex["inputs"], np.int32), "targets": np.asarray(ex["targets"], np.int32),
         "segment_ids": np.where(pair > 0, 2 * (pair - 1) + np.asarray(ex["half"], np.int32), 0).astype(np.int32),
         "positions": np.asarray(ex["positions"], np.int32), "loss_mask": np.asarray(ex["loss_mask"], np.int32)}
  if "ref" in ex:
    out[REF_KEY] = np.asarray(ex["ref"], np.float32)
  return out


def _renderer(cfg: PreferenceDataConfig, tokenizer: Tokenizer) -> ChatRenderer:
  try:
    return ChatRenderer(tokenizer, cfg.template)
  except ChatTemplateError as e:
    raise DataError(str(e)) from None


def _check_ref(ref_logps, n: int) -> np.ndarray:
  try:
    ref = np.asarray(ref_logps, np.float32)
  except (TypeError, ValueError) as e:
    raise DataError(f"ref_logps is not an array of numbers ({e})") from None
  if ref.shape != (n, 2):
    raise DataError(f"ref_logps has shape {ref.shape}, expected ({n}, 2): one (chosen, rejected) reference log-prob "
                    "per row of the training source (num_train_pairs(cfg); see preference_pair_batches)")
  return ref


class PreferencePipeline(ExamplePipeline):
  """Iterator over this process's rows of each global batch (the row layout of the module docstring)."""

  def __init__(self, cfg: PreferenceDataConfig, tokenizer: Tokenizer, *, batch_size: int, shard_index: int = 0,
               shard_count: int = 1, ref_logps: np.ndarray | None = None):
    validate(cfg)
    if batch_size < 1:
      raise DataError(f"batch_size must be >= 1, got {batch_size}")
    self.cfg, self.tokenizer = cfg, tokenizer
    self.renderer = _renderer(cfg, tokenizer)
    rows = train_rows(cfg)
    ref = None if ref_logps is None else _check_ref(ref_logps, len(rows))
    mine = np.arange(len(rows))[shard_index::shard_count]
    rows = Subset(rows, mine)
    if len(rows) == 0:
      raise DataError(f"data shard {shard_index} of {shard_count} (run.data_shards) got no training pairs")
    self.examples = PairExamples(rows, self.renderer, cfg.seq_len, cfg.overlong, None if ref is None else ref[mine])
    self.examples.check_usable()
    it = example_stream(self.examples, cfg, batch_size)
    if cfg.packing:
      features = ("inputs", "targets", "loss_mask", "half", "positions") + (("ref",) if ref is not None else ())
      it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={k: cfg.seq_len for k in features}, num_packing_bins=cfg.packing_bins, seed=cfg.seed,
        shuffle_bins=cfg.shuffle, meta_features=[k for k in features if k in ("half", "positions", "ref")],
        max_sequences_per_bin=cfg.pairs_per_row).map(_canonical)
    else:
      it = it.map(lambda ex: pad_pair(ex, cfg.seq_len))
    self.dataset = it.batch(batch_size, drop_remainder=True)
    self._it = iter(self.dataset)


def make_preference_pipeline(cfg: PreferenceDataConfig, tokenizer: Tokenizer, *, batch_size: int,
                             shard_index: int = 0, shard_count: int = 1,
                             ref_logps: np.ndarray | None = None) -> PreferencePipeline:
  """The DPO training iterator: rows -> data shard (row i to shard i % shard_count) -> shuffle (reshuffled every
  epoch) -> repeat -> render -> pack / pad pairs -> batch; deterministic, checkpointable (get_state / set_state).
  `ref_logps` [num_train_pairs(cfg), 2]: reference log-probs per training row, placed as "ref_logps" (see the
  module docstring)."""
  return PreferencePipeline(cfg, tokenizer, batch_size=batch_size, shard_index=shard_index,
                            shard_count=shard_count, ref_logps=ref_logps)


def preference_pair_batches(cfg: PreferenceDataConfig, tokenizer: Tokenizer, *, batch_size: int,
                            split: str = "train", stats: dict | None = None
                            ) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
  """(batches, indices): the pairs of `split` ("train": the whole training source, all processes' rows; "heldout":
  the held-out split) as padded batches, one pair per row (chosen segment 1, rejected segment 2), in source order,
  the last batch filled with all-zero rows; indices[b] int64 [batch_size] is each row's index in the split's source
  (for "train" the index of `ref_logps`), -1 for filler rows. Pairs skipped or dropped (as in training, with the same
  truncation) have no row. ([], []) when split="heldout" and there is no held-out split. Pass a dict as `stats` to
  receive the counts ({"rows", "truncated", "dropped", "skipped"})."""
  validate(cfg)
  if split not in SPLITS:
    raise DataError(f"split must be one of {SPLITS}, got {split!r}")
  rows = train_rows(cfg) if split == "train" else eval_rows(cfg)
  if rows is None:
    return [], []
  examples = PairExamples(rows, _renderer(cfg, tokenizer), cfg.seq_len, cfg.overlong)
  kept = [(i, ex) for i, ex in ((i, examples[i]) for i in range(len(examples))) if ex is not None]
  if stats is not None:
    stats.update(examples.stats())
  batches, indices = [], []
  empty = {k: np.zeros(cfg.seq_len, np.int32) for k in KEYS}
  for b in range(math.ceil(len(kept) / batch_size)):
    group = kept[b * batch_size:(b + 1) * batch_size]
    padded = [pad_pair(ex, cfg.seq_len) for _, ex in group] + [empty] * (batch_size - len(group))
    batches.append({k: np.stack([r[k] for r in padded]) for k in KEYS})
    indices.append(np.asarray([i for i, _ in group] + [-1] * (batch_size - len(group)), np.int64))
  return batches, indices


def load_preference_tokenizer(cfg: PreferenceDataConfig, workdir: str | None) -> Tokenizer:
  """The tokenizer of `cfg.tokenizer` (as `ernie_jax.data.sft.load_chat_tokenizer`); "bpe" is trained on the
  training prompts with their chosen answers (rendered with the built-in template, without its two special tokens)."""
  validate(cfg)

  def training_texts():
    rows = train_rows(cfg)
    for i in range(min(len(rows), cfg.bpe_train_rows)):
      pair = rows[i]
      if pair is not None:
        yield render_builtin(pair.prompt + pair.chosen).replace(BEGIN_OF_SENTENCE, "").replace(END_OF_SENTENCE, "\n")

  return get_tokenizer(cfg.tokenizer, workdir=workdir, bpe_vocab_size=cfg.bpe_vocab_size,
                       training_texts=training_texts)
