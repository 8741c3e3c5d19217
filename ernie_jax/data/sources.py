"""Random-access document sources (grain `RandomAccessDataSource`s: `__len__` + `__getitem__`).

* `TextDocuments`: raw text files, one document per file ("file"), per non-empty line ("line") or
  per JSON object of a JSONL file ("jsonl", text under `field`). Only byte offsets are indexed at
  start-up; documents are read on demand.
* `TokenWindows`: pre-tokenized token files, memory-mapped: `.npy` (1-D integer array) or raw
  `.bin` (dtype given). Documents are separated by the EOS id; element i is the window of
  seq_len + 1 tokens starting at i * seq_len, already packed (segment ids restart after each EOS).
* `stdlib_files()`: the Python standard library's own source files, real text present on every
  machine with Python (the default data of the tiny config).
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig

import numpy as np

from ernie_jax.data.packing import window_example


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


class TextDocuments:
  """Documents of text files: mode "file" (bytes of each file), "line" (bytes of each non-empty
  line) or "jsonl" (str under `field` of each JSON line)."""

  def __init__(self, files: list[str], mode: str = "file", field: str = "text"):
    if mode not in ("file", "line", "jsonl"):
      raise DataError(f"data.text_mode must be 'file', 'line' or 'jsonl', got {mode!r}")
    self.files, self.mode, self.field = list(files), mode, field
    ids, starts, ends = [], [], []
    for i, f in enumerate(self.files):
      if mode == "file":
        size = os.path.getsize(f)
        if size:
          ids.append(i), starts.append(0), ends.append(size)
        continue
      offset = 0
      with open(f, "rb") as fh:
        for line in fh:
          if line.strip():
            ids.append(i), starts.append(offset), ends.append(offset + len(line))
          offset += len(line)
    if not ids:
      raise DataError(f"no non-empty documents in {len(self.files)} file(s): {self.files[:3]}")
    self._file = np.asarray(ids, np.int32)
    self._start = np.asarray(starts, np.int64)
    self._end = np.asarray(ends, np.int64)
    if mode == "jsonl":
      self._check_jsonl()

  def _check_jsonl(self):
    doc = self._read(0)
    try:
      obj = json.loads(doc)
    except json.JSONDecodeError as e:
      raise DataError(f"{self.files[self._file[0]]}: first line is not JSON ({e})") from None
    if not isinstance(obj, dict) or self.field not in obj:
      keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
      raise DataError(f"{self.files[self._file[0]]}: JSON lines have no field {self.field!r} "
                      f"(data.jsonl_field); found {keys}")

  def __len__(self) -> int:
    return len(self._file)

  def file_of(self, i: int) -> str:
    """The file document i comes from."""
    return self.files[self._file[int(i)]]

  def _read(self, i: int) -> bytes:
    with open(self.files[self._file[i]], "rb") as fh:
      fh.seek(self._start[i])
      return fh.read(self._end[i] - self._start[i])

  def __getitem__(self, i: int) -> str | bytes:
    data = self._read(int(i))
    if self.mode == "jsonl":
      return str(json.loads(data)[self.field])
    return data.rstrip(b"\n") if self.mode == "line" else data

  def __repr__(self):
    return f"TextDocuments({len(self)} documents in {len(self.files)} files, mode={self.mode!r})"


def open_tokens(path: str, dtype: str = "uint16") -> np.ndarray:
  """A 1-D memory-mapped token array: `.npy` carries its dtype, anything else is raw `dtype`."""
  if path.endswith(".npy"):
    arr = np.load(path, mmap_mode="r")
  else:
    arr = np.memmap(path, dtype=np.dtype(dtype), mode="r")
  if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
    raise DataError(f"{path}: expected a 1-D integer token array, got {arr.dtype} {arr.shape}")
  return arr


def max_token_id(arr: np.ndarray, chunk: int = 1 << 24) -> int:
  return max(int(arr[i:i + chunk].max()) for i in range(0, len(arr), chunk)) if len(arr) else -1


class TokenWindows:
  """Fixed windows of seq_len + 1 tokens over memory-mapped token files (no window crosses files).

  Element i: a packed example (see `ernie_jax.data.packing.window_example`).
  """

  def __init__(self, files: list[str], seq_len: int, eos_id: int, dtype: str = "uint16"):
    self.files, self.seq_len, self.eos_id = list(files), seq_len, eos_id
    self.arrays = [open_tokens(f, dtype) for f in self.files]
    counts = [max((len(a) - 1) // seq_len, 0) for a in self.arrays]
    if sum(counts) == 0:
      raise DataError(f"token files {self.files[:3]} hold fewer than seq_len + 1 = {seq_len + 1} tokens")
    self._cum = np.cumsum([0] + counts)

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

  def __repr__(self):
    return f"TokenWindows({len(self)} windows of {self.seq_len + 1} tokens in {len(self.files)} files)"
