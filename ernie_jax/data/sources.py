"""Random-access document sources (grain `RandomAccessDataSource`s: `__len__` + `__getitem__`).

* `TextDocuments`: raw text files, one document per file ("file"), per non-empty line ("line") or
  per JSON object of a JSONL file ("jsonl", text under `field`). Only byte offsets (and line
  numbers) are indexed at start-up; documents are read on demand. A bad row (not JSON, no field, a
  non-string text, not UTF-8 where text is decoded) is a one-line `DataError` naming file:line, or
  is skipped and counted (bad_rows="skip"); nothing is turned into "None" or silently replaced.
* `TokenWindows`: pre-tokenized token files, memory-mapped: `.npy` (1-D integer array) or raw
  `.bin` (dtype from the sidecar `<file>.json` written by pretokenize, else given). Documents are
  separated by the EOS id; element i is the window of seq_len + 1 tokens starting at i * seq_len,
  already packed (segment ids restart after each EOS). Negative ids, sizes that are not a whole
  number of ids, and 4-byte ids read as 2-byte ids are refused.
* `stdlib_files()`: the Python standard library's own source files, real text present on every
  machine with Python (the default data of the tiny config).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import sysconfig

import numpy as np

from ernie_jax.data.packing import window_example

log = logging.getLogger(__name__)


class DataError(ValueError):
  """Missing or unusable training data (raised before anything is compiled)."""


def expand_paths(patterns: str | list[str], what: str = "data.paths") -> list[str]:
  """Comma-separated globs (or a list) -> sorted existing files; an error names what is missing."""
  if isinstance(patterns, str):
    patterns = [p.strip() for p in patterns.split(",") if p.strip()]
  if not patterns:
    raise DataError(f"{what} is empty: give one or more files or glob patterns (comma-separated)")
  files: list[str] = []
  for pat in patterns:
    pat = os.path.expanduser(pat)
    found = sorted(f for f in glob.glob(pat, recursive=True) if os.path.isfile(f))
    if not found:
      raise DataError(f"{what}: no file matches {pat!r}")
    files += found
  return list(dict.fromkeys(files))


def stdlib_files() -> list[str]:
  """Sorted *.py files of the standard library (site-/dist-packages excluded)."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
    files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
  if not files:
    raise DataError(f"no Python source files found under the standard library at {root}")
  return files


class BadRow(ValueError):
  """A row that cannot be used: `reason`, at byte `offset` of the row (for the line number of "file" documents)."""

  def __init__(self, reason: str, fix: str, offset: int = 0):
    super().__init__(reason)
    self.reason, self.fix, self.offset = reason, fix, offset


_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
               dict: "an object"}
_UTF8_FIX = "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
_JSONL_FIX = "fix the line"


def _utf8(data: bytes, codec: str = "utf-8") -> str:
  try:
    return data.decode(codec)
  except UnicodeDecodeError as e:
    raise BadRow(f"not UTF-8 (byte 0x{data[e.start]:02x} at column {e.start + 1})", _UTF8_FIX, e.start) from None


def parse_json_row(data: bytes, fields: tuple[str, ...]) -> dict:
  """One JSONL line -> its object, which has every field in `fields` (a string unless the field is
  checked by the caller); raises `BadRow` with a one-line reason."""
  try:
    obj = json.loads(_utf8(data, "utf-8-sig"))
  except json.JSONDecodeError as e:
    raise BadRow(f"not valid JSON ({e.msg}, column {e.colno})", _JSONL_FIX) from None
  if not isinstance(obj, dict):
    raise BadRow(f"is {_JSON_TYPES.get(type(obj), type(obj).__name__)}, not a JSON object", _JSONL_FIX)
  for field in fields:
    if field not in obj:
      found = list(obj)[:10]
      raise BadRow(f"no field {field!r}; found {found}", _JSONL_FIX)
  return obj


def json_text(obj: dict, field: str) -> str:
  """The string under `field` (a null / number / list is refused, never turned into "None" / "12")."""
  value = obj[field]
  if not isinstance(value, str):
    shown = "" if value is None else json.dumps(value)
    shown = f" ({shown if len(shown) <= 40 else shown[:37] + '...'})" if shown else ""
    raise BadRow(f"field {field!r} is {_JSON_TYPES.get(type(value), type(value).__name__)}{shown}, not a string",
                 _JSONL_FIX)
  return value


BAD_ROWS = ("error", "skip")


class TextDocuments:
  """Documents of text files: mode "file" (bytes of each file), "line" (bytes of each non-empty
  line) or "jsonl" (str under `field` of each JSON line).

  decode=True: "file" / "line" documents are returned as str, decoded as strict UTF-8 (for text
  tokenizers; a byte-level tokenizer takes the bytes as they are). A bad row -- a JSONL line that
  is not JSON, not an object, lacks `field`, or whose `field` is not a string; a line / file that
  is not UTF-8 when decoding -- is refused with a one-line `DataError` naming file:line
  (bad_rows="error"), or skipped (`__getitem__` returns None, which grain drops) and recorded in
  `skipped` (document index -> "file:line: reason"; logged at the 1st, 10th, 100th, ... row; with
  grain worker processes each worker counts and logs its own).
  """

  def __init__(self, files: list[str], mode: str = "file", field: str = "text", bad_rows: str = "error",
               decode: bool = False):
    if mode not in ("file", "line", "jsonl"):
      raise DataError(f"data.text_mode must be 'file', 'line' or 'jsonl', got {mode!r}")
    if bad_rows not in BAD_ROWS:
      raise DataError(f"data.bad_rows must be one of {BAD_ROWS}, got {bad_rows!r}")
    self.files, self.mode, self.field = list(files), mode, field
    self.bad_rows, self.decode = bad_rows, decode
    self.skipped: dict[int, str] = {}
    ids, starts, ends, lines = [], [], [], []
    for i, f in enumerate(self.files):
      if mode == "file":
        size = os.path.getsize(f)
        if size:
          ids.append(i), starts.append(0), ends.append(size), lines.append(1)
        continue
      offset = 0
      with open(f, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
          if line.strip():
            ids.append(i), starts.append(offset), ends.append(offset + len(line)), lines.append(lineno)
          offset += len(line)
    if not ids:
      raise DataError(f"no non-empty documents in {len(self.files)} file(s): {self.files[:3]}")
    self._file = np.asarray(ids, np.int32)
    self._start = np.asarray(starts, np.int64)
    self._end = np.asarray(ends, np.int64)
    self._line = np.asarray(lines, np.int64)
    if mode == "jsonl":
      self._check_jsonl()

  def _check_jsonl(self):
    """The first row must be usable (bad_rows="error"), or one of the first 100 ("skip"): catches
    a wrong data.jsonl_field or a file that is not JSONL before anything is compiled."""
    first = None
    for i in range(min(len(self), 1 if self.bad_rows == "error" else 100)):
      try:
        self._parse(i, self._read(i))
        return
      except BadRow as e:
        first = first or (i, e)
    i, e = first
    rows = "first line" if self.bad_rows == "error" else f"first {min(len(self), 100)} rows (all bad)"
    raise DataError(f"{self.where(i)}: {e.reason} ({self._jsonl_hint()}; {rows})")

  def _jsonl_hint(self) -> str:
    """The setting to check when no row parses (named in the error)."""
    return f"data.jsonl_field={self.field!r}"

  def __len__(self) -> int:
    return len(self._file)

  def file_of(self, i: int) -> str:
    """The file document i comes from."""
    return self.files[self._file[int(i)]]

  def where(self, i: int, offset: int = 0) -> str:
    """The "file:line" of document i (of its byte `offset` for "file" documents)."""
    line = int(self._line[int(i)])
    if offset and self.mode == "file":
      line += self._read(int(i))[:offset].count(b"\n")
    return f"{self.file_of(i)}:{line}"

  def _read(self, i: int) -> bytes:
    with open(self.files[self._file[i]], "rb") as fh:
      fh.seek(self._start[i])
      return fh.read(self._end[i] - self._start[i])

  def _parse(self, i: int, data: bytes) -> str | bytes:
    if self.mode == "jsonl":
      return json_text(parse_json_row(data, (self.field,)), self.field)
    if self.mode == "line":
      data = data.rstrip(b"\n")
    return _utf8(data) if self.decode else data

  def __getitem__(self, i: int) -> str | bytes | None:
    i = int(i)
    try:
      return self._parse(i, self._read(i))
    except BadRow as e:
      msg = f"{self.where(i, e.offset)}: {e.reason}"
      if self.bad_rows == "error":
        raise DataError(f"{msg}; {e.fix}, or set data.bad_rows=skip to skip and count such rows") from None
      self.skip(i, msg)
      return None

  def skip(self, i: int, msg: str) -> None:
    """Record a skipped row (once per row, however many epochs read it)."""
    if i in self.skipped:
      return
    self.skipped[i] = msg
    n = len(self.skipped)
    if math.log10(n).is_integer():
      log.warning("data.bad_rows=skip: %d bad row(s) skipped so far, e.g. %s", n, msg)

  def skip_summary(self) -> str:
    """One line with the count of skipped rows and the first of them; empty if none was skipped."""
    if not self.skipped:
      return ""
    return f"skipped {len(self.skipped)} bad row(s) (data.bad_rows=skip), first: {self.skipped[min(self.skipped)]}"

  def __repr__(self):
    return f"TextDocuments({len(self)} documents in {len(self.files)} files, mode={self.mode!r})"


SIDECAR_FORMAT = "ernie_jax.tokens"


def sidecar_path(path: str) -> str:
  """The JSON sidecar that describes a raw token file: `<path>.json`."""
  return path + ".json"


def write_sidecar(path: str, **meta) -> None:
  """Write `<path>.json` atomically: {"format", "version", **meta} (meta: dtype, count, eos_id, ...)."""
  tmp = sidecar_path(path) + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"format": SIDECAR_FORMAT, "version": 1, **meta}, f, indent=1)
    f.write("\n")
  os.replace(tmp, sidecar_path(path))


def read_sidecar(path: str) -> dict | None:
  """The sidecar of a raw token file (None if it has none); a sidecar that cannot be used is refused."""
  side = sidecar_path(path)
  if not os.path.isfile(side):
    return None
  try:
    with open(side) as f:
      meta = json.load(f)
    np.dtype(meta["dtype"])
    int(meta["count"])
  except (OSError, ValueError, TypeError, KeyError) as e:
    raise DataError(f"{side}: not a usable token-file sidecar ({type(e).__name__}: {e}); re-create {path} with "
                    "python -m ernie_jax.cli.pretokenize, or remove the sidecar and set data.token_dtype") from None
  if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
    raise DataError(f"{side}: not a token-file sidecar (no \"format\": {SIDECAR_FORMAT!r}); remove or rename it")
  return meta


def _looks_wider(arr: np.ndarray, sample: int = 1 << 16) -> bool:
  """Ids of 4 bytes read as 2-byte ids: every other id (the high halves) is 0 or 1, the others are not."""
  head = np.asarray(arr[:sample - sample % 2])
  if len(head) < 128:
    return False
  return bool(np.mean(head[1::2] <= 1) > 0.95 and np.mean(head[0::2] <= 1) < 0.5)


def open_tokens(path: str, dtype: str = "uint16") -> np.ndarray:
  """A 1-D memory-mapped token array. `.npy` carries its dtype; a raw file is read with the dtype of
  its sidecar `<path>.json` (written by `ernie_jax.cli.pretokenize`; it wins over `dtype`, and its
  token count must match the file), else with `dtype` (= data.token_dtype). A raw file whose size is
  not a multiple of the dtype's size, or that looks like 4-byte ids read as 2-byte ids, is refused."""
  if path.endswith(".npy"):
    try:
      arr = np.load(path, mmap_mode="r")
    except ValueError as e:
      raise DataError(f"{path}: not a readable .npy file ({e})") from None
  else:
    meta = read_sidecar(path)
    dt = np.dtype(meta["dtype"] if meta else dtype)
    if meta and dt != np.dtype(dtype):
      log.info("%s: reading %s ids as its sidecar says (data.token_dtype=%s applies to files without one)",
               path, dt.name, dtype)
    size = os.path.getsize(path)
    if size % dt.itemsize:
      raise DataError(f"{path}: its {size} bytes are not a whole number of {dt.name} ids: wrong data.token_dtype "
                      "or a truncated file")
    if meta and int(meta["count"]) != size // dt.itemsize:
      raise DataError(f"{path}: holds {size // dt.itemsize} {dt.name} ids but {sidecar_path(path)} says "
                      f"{meta['count']}: the file was changed or its writing was cut short; re-create it with "
                      "python -m ernie_jax.cli.pretokenize")
    arr = np.memmap(path, dtype=dt, mode="r") if size else np.zeros(0, dt)
    if meta is None and dt.itemsize == 2 and _looks_wider(arr):
      raise DataError(f"{path}: every other id is 0 or 1, as when 4-byte ids are read as {dt.name}: set "
                      "data.token_dtype=uint32 (files written by ernie_jax.cli.pretokenize carry a sidecar "
                      f"{os.path.basename(sidecar_path(path))} that says their dtype)")
  if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
    raise DataError(f"{path}: expected a 1-D integer token array, got {arr.dtype} {arr.shape}")
  return arr


def max_token_id(arr: np.ndarray, chunk: int = 1 << 24) -> int:
  return max(int(arr[i:i + chunk].max()) for i in range(0, len(arr), chunk)) if len(arr) else -1


def min_token_id(arr: np.ndarray, chunk: int = 1 << 24) -> int:
  return min(int(arr[i:i + chunk].min()) for i in range(0, len(arr), chunk)) if len(arr) else 0


def first_negative(arr: np.ndarray, chunk: int = 1 << 24) -> int:
  """Index of the first negative id (-1 if none)."""
  for i in range(0, len(arr), chunk):
    neg = np.flatnonzero(np.asarray(arr[i:i + chunk]) < 0)
    if len(neg):
      return i + int(neg[0])
  return -1


class TokenWindows:
  """Fixed windows of seq_len + 1 tokens over memory-mapped token files (no window crosses files).

  Element i: a packed example (see `ernie_jax.data.packing.window_example`). Files of a signed
  dtype are scanned once for negative ids (refused); a sidecar's EOS id must equal `eos_id`.
  """

  def __init__(self, files: list[str], seq_len: int, eos_id: int, dtype: str = "uint16"):
    self.files, self.seq_len, self.eos_id = list(files), seq_len, eos_id
    self.arrays = [open_tokens(f, dtype) for f in self.files]
    for f, a in zip(self.files, self.arrays):
      if np.issubdtype(a.dtype, np.signedinteger):
        self._check_nonnegative(f, a)
      meta = None if f.endswith(".npy") else read_sidecar(f)
      if meta and meta.get("eos_id") is not None and int(meta["eos_id"]) != eos_id:
        raise DataError(f"{f}: documents are separated by id {meta['eos_id']} ({sidecar_path(f)}) but the run "
                        f"uses EOS id {eos_id}: set data.eos_id={meta['eos_id']}")
    counts = [max((len(a) - 1) // seq_len, 0) for a in self.arrays]
    if sum(counts) == 0:
      raise DataError(f"token files {self.files[:3]} hold fewer than seq_len + 1 = {seq_len + 1} tokens")
    self._cum = np.cumsum([0] + counts)

  @staticmethod
  def _check_nonnegative(path: str, arr: np.ndarray) -> None:
    at = first_negative(arr)
    if at >= 0:
      raise DataError(f"{path}: token id {int(arr[at])} at position {at} is negative (ids must lie in "
                      "[0, model.vocab_size)): the file holds bad ids or is read with the wrong dtype; re-create "
                      "it with python -m ernie_jax.cli.pretokenize")

  def __len__(self) -> int:
    return int(self._cum[-1])

  def tokens(self, i: int) -> np.ndarray:
    f = int(np.searchsorted(self._cum, i, side="right") - 1)
    start = (i - int(self._cum[f])) * self.seq_len
    return np.asarray(self.arrays[f][start:start + self.seq_len + 1], np.int32)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return window_example(self.tokens(int(i)), self.eos_id)

  def max_token_id(self) -> int:
    return max(max_token_id(a) for a in self.arrays)

  def min_token_id(self) -> int:
    return min(min_token_id(a) for a in self.arrays)

  def check_vocab(self, vocab_size: int) -> None:
    """Every id must lie in [0, vocab_size): a one-line `DataError` naming the file otherwise."""
    for f, a in zip(self.files, self.arrays):
      self._check_nonnegative(f, a)
      top = max_token_id(a)
      if top >= vocab_size:
        raise DataError(f"{f}: holds token id {top} >= model.vocab_size {vocab_size}: use the model the file "
                        "was tokenized for, or re-tokenize it with that model's tokenizer")

  def __repr__(self):
    return f"TokenWindows({len(self)} windows of {self.seq_len + 1} tokens in {len(self.files)} files)"
