"""Tokenizers: text <-> token ids for pretraining data and for generation.

`load_tokenizer(path)` accepts a `tokenizer.model` (SentencePiece, what ERNIE 4.5 ships), a
`tokenizer.json` (Hugging Face `tokenizers`), or a directory holding one of them (the SentencePiece
model is preferred when both exist and `sentencepiece` is installed). Every tokenizer implements
`Tokenizer` (encode / decode, bos_id / eos_id / vocab_size); like ERNIE's own tokenizer, `encode` adds
no BOS/EOS unless asked (`add_bos=True`). A missing or unusable tokenizer raises `TokenizerError`.

`data.tokenizer` in the training config (`get_tokenizer`) is one of
* "bytes": `ByteTokenizer`, byte-level, no files, no training: ids 0 <pad>, 1 <s>, 2 </s>, then byte
  b -> b + 3 (vocabulary 259). The default of the tiny config.
* "bpe": a byte-level BPE of `bpe_vocab_size` trained once with Hugging Face `tokenizers` on the
  first documents of the training data and cached as `<workdir>/tokenizer.json` (reused on resume).
* a path to a SentencePiece `tokenizer.model`, a Hugging Face `tokenizer.json`, or a directory
  holding one (`load_tokenizer`).
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Iterable, Sequence

import numpy as np

SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"

_EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_sentence|>")
# ERNIE 4.5's chat-template tokens (spec §6); `Tokenizer.special_id` maps them to BOS / EOS where the vocabulary
# lacks them (the byte-level and trained BPE tokenizers)
BEGIN_OF_SENTENCE, END_OF_SENTENCE = "<|begin_of_sentence|>", "<|end_of_sentence|>"
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

  def special_id(self, token: str) -> int | None:
    """The id of a special token such as "<|end_of_sentence|>" (None if unknown). `BEGIN_OF_SENTENCE` /
    `END_OF_SENTENCE` fall back to bos_id / eos_id when the vocabulary lacks them."""
    i = self._token_id(token)
    if i is None:
      i = {BEGIN_OF_SENTENCE: self.bos_id, END_OF_SENTENCE: self.eos_id}.get(token)
    return i

  def _token_id(self, token: str) -> int | None:
    return None

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

  def _token_id(self, token: str) -> int | None:
    i = int(self._sp.PieceToId(token))
    return i if 0 <= i < self.vocab_size and (not self._sp.IsUnknown(i) or self._sp.IdToPiece(i) == token) else None


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

  def _token_id(self, token: str) -> int | None:
    i = self._tok.token_to_id(token)
    return None if i is None else int(i)


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


# --------------------------------------------------------------------------------------------------
# Pretraining tokenizers
PAD, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes shifted by 3 past <pad>=0, <s>=1, </s>=2."""

  kind = "bytes"
  offset = 3

  def __init__(self):
    self.path = "bytes"
    self.vocab_size = 256 + self.offset
    self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS

  def encode(self, text: str | bytes, add_bos: bool = False) -> list[int]:
    return self.encode_array(text, add_bos).tolist()

  def encode_array(self, text: str | bytes, add_bos: bool = False) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids = np.frombuffer(data, np.uint8).astype(np.int32) + self.offset
    return np.concatenate([[self.bos_id], ids]).astype(np.int32) if add_bos else ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    out = bytearray()
    for i in ids:
      i = int(i)
      if i >= self.offset and i < self.vocab_size:
        out.append(i - self.offset)
      elif not skip_special_tokens and 0 <= i < self.offset:
        out += SPECIAL_TOKENS[i].encode()
    return out.decode("utf-8", errors="replace")

  def _token_id(self, token: str) -> int | None:
    return {name: i for i, name in enumerate(SPECIAL_TOKENS)}.get(token)


def encode(tokenizer: Tokenizer, doc: str | bytes) -> np.ndarray:
  """Token ids of one document as int32 (bytes are decoded as UTF-8 for text tokenizers)."""
  if isinstance(tokenizer, ByteTokenizer):
    return tokenizer.encode_array(doc)
  if isinstance(doc, bytes):
    doc = doc.decode("utf-8", errors="replace")
  return np.asarray(tokenizer.encode(doc), np.int32)


def train_bpe(texts: Iterable[str | bytes], vocab_size: int, path: str) -> str:
  """Train a byte-level BPE (special tokens <pad>=0, <s>=1, </s>=2) and save it as `path`."""
  try:
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers
  except ImportError:
    raise TokenizerError("data.tokenizer='bpe' needs the 'tokenizers' package "
                         "(pip install tokenizers, or pip install -e '.[tokenizers]')") from None
  tok = HFTok(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  as_text = (t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts)
  tok.train_from_iterator(as_text, trainer=trainer)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  tok.save(tmp)
  os.replace(tmp, path)
  return path


def get_tokenizer(spec: str, *, workdir: str | None = None, bpe_vocab_size: int = 4096,
                  training_texts=None) -> Tokenizer:
  """The tokenizer named by `data.tokenizer` (see the module docstring).

  training_texts: a callable returning an iterable of documents, used only to train a new BPE.
  """
  if spec == "bytes":
    return ByteTokenizer()
  if spec == "bpe":
    if not workdir:
      raise TokenizerError("data.tokenizer='bpe' needs a workdir to cache tokenizer.json in")
    path = os.path.join(workdir, "tokenizer.json")
    if not os.path.isfile(path):
      if training_texts is None:
        raise TokenizerError(f"no cached BPE tokenizer at {path} and no training data to train one")
      train_bpe(training_texts(), bpe_vocab_size, path)
    return load_tokenizer(path)
  return load_tokenizer(spec)
