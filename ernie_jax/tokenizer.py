"""Text <-> token ids for generation: a thin wrapper over SentencePiece or HF `tokenizers`.

`load_tokenizer(path)` accepts a `tokenizer.model` (SentencePiece, what ERNIE 4.5 ships), a
`tokenizer.json` (Hugging Face `tokenizers`), or a directory holding one of them (the SentencePiece
model is preferred when both exist and `sentencepiece` is installed).

Like ERNIE's own tokenizer, `encode` adds no BOS/EOS unless asked (`add_bos=True`).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"

_EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_sentence|>")
_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_sentence|>", "<|startoftext|>")


class TokenizerError(ValueError):
  """No usable tokenizer at the given path."""


class Tokenizer:
  """Common interface: encode(text) -> ids, decode(ids) -> text, eos_id / bos_id (None if unknown)."""

  kind: str = ""
  path: str = ""
  eos_id: int | None = None
  bos_id: int | None = None
  vocab_size: int = 0

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    raise NotImplementedError

  def __repr__(self):
    return (f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id})")


class SentencePieceTokenizer(Tokenizer):
  kind = "sentencepiece"

  def __init__(self, path: str):
    try:
      import sentencepiece as spm
    except ImportError:
      raise TokenizerError(f"{path} is a SentencePiece model but the 'sentencepiece' package is not "
                           "installed (pip install sentencepiece)") from None
    self.path = path
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except Exception as e:  # sentencepiece raises OSError / RuntimeError on bad files
      raise TokenizerError(f"cannot load SentencePiece model {path}: {e}") from None
    self.vocab_size = int(self._sp.GetPieceSize())
    self.eos_id = _or_none(self._sp.eos_id())
    self.bos_id = _or_none(self._sp.bos_id())
    self._special = {i for i in range(self.vocab_size)
                     if self._sp.IsControl(i) or self._sp.IsUnknown(i)}

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = list(self._sp.EncodeAsIds(text))
    return _with_bos(ids, add_bos, self.bos_id)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    if skip_special_tokens:
      ids = [i for i in ids if i not in self._special]
      return self._sp.DecodeIds(ids)
    # Keep control pieces (e.g. "</s>") as text; decode the runs between them normally.
    parts, run = [], []
    for i in ids:
      if i in self._special:
        parts += [self._sp.DecodeIds(run), self._sp.IdToPiece(i)]
        run = []
      else:
        run.append(i)
    return "".join(parts + [self._sp.DecodeIds(run)])


class HFTokenizer(Tokenizer):
  kind = "tokenizers"

  def __init__(self, path: str):
    try:
      from tokenizers import Tokenizer as _Tok
    except ImportError:
      raise TokenizerError(f"{path} is a Hugging Face tokenizer.json but the 'tokenizers' package "
                           "is not installed (pip install tokenizers)") from None
    self.path = path
    try:
      self._tok = _Tok.from_file(path)
    except Exception as e:
      raise TokenizerError(f"cannot load tokenizer.json {path}: {e}") from None
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    cfg = _read_tokenizer_config(os.path.dirname(os.path.abspath(path)))
    self.eos_id = self._special_id(cfg.get("eos_token"), _EOS_NAMES)
    self.bos_id = self._special_id(cfg.get("bos_token"), _BOS_NAMES)

  def _special_id(self, configured, fallbacks) -> int | None:
    if isinstance(configured, dict):
      configured = configured.get("content")
    names = ([configured] if isinstance(configured, str) else []) + list(fallbacks)
    for name in names:
      i = self._tok.token_to_id(name)
      if i is not None:
        return int(i)
    return None

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = list(self._tok.encode(text, add_special_tokens=False).ids)
    return _with_bos(ids, add_bos, self.bos_id)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _or_none(i: int) -> int | None:
  return None if i is None or i < 0 else int(i)


def _with_bos(ids: list[int], add_bos: bool, bos_id: int | None) -> list[int]:
  if not add_bos:
    return ids
  if bos_id is None:
    raise TokenizerError("add_bos=True but the tokenizer defines no BOS token")
  return [bos_id] + ids


def _read_tokenizer_config(directory: str) -> dict:
  """Special-token names from tokenizer_config.json / special_tokens_map.json, if present."""
  out: dict = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    p = os.path.join(directory, name)
    if os.path.isfile(p):
      try:
        with open(p) as f:
          d = json.load(f)
      except (OSError, json.JSONDecodeError):
        continue
      out.update({k: d[k] for k in ("eos_token", "bos_token") if d.get(k)})
  return out


def _have(module: str) -> bool:
  import importlib.util
  return importlib.util.find_spec(module) is not None


def find_tokenizer_file(path: str | os.PathLike) -> str | None:
  """The tokenizer file `load_tokenizer` would use for `path`, or None if there is none."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    return None
  spm_file, hf_file = os.path.join(path, SPM_FILE), os.path.join(path, HF_FILE)
  have_spm, have_hf = os.path.isfile(spm_file), os.path.isfile(hf_file)
  if have_spm and (_have("sentencepiece") or not have_hf):
    return spm_file
  if have_hf:
    return hf_file
  return None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Load a tokenizer from a `tokenizer.model` / `tokenizer.json` file or a directory holding one.

  Raises TokenizerError if nothing usable is found or the needed package is missing.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise TokenizerError(f"tokenizer path not found: {path}")
  file = find_tokenizer_file(path)
  if file is None:
    raise TokenizerError(f"no {SPM_FILE} (SentencePiece) or {HF_FILE} (Hugging Face tokenizers) "
                         f"in {path}")
  if file.endswith(".json"):
    return HFTokenizer(file)
  if file.endswith(".model") or _looks_like_spm(file):
    return SentencePieceTokenizer(file)
  raise TokenizerError(f"unrecognised tokenizer file {file}: expected a SentencePiece .model or a "
                       "Hugging Face tokenizer.json")


def _looks_like_spm(file: str) -> bool:
  # A SentencePiece model is a protobuf; a tokenizer.json starts with '{'.
  with open(file, "rb") as f:
    head = f.read(1)
  return head not in (b"{", b"")
