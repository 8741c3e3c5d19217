"""Tokenizers for pretraining data.

`data.tokenizer` in the training config is one of
* "bytes": byte-level, no files, no training: ids 0 <pad>, 1 <s>, 2 </s>, then byte b -> b + 3
  (vocabulary 259). The default of the tiny config.
* "bpe": a byte-level BPE of `bpe_vocab_size` trained once with Hugging Face `tokenizers` on the
  first documents of the training data and cached as `<workdir>/tokenizer.json` (reused on resume).
* a path to a SentencePiece `tokenizer.model` (what ERNIE 4.5 ships), a Hugging Face
  `tokenizer.json`, or a directory holding one (loaded by `ernie_jax.tokenizer.load_tokenizer`).
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

from ernie_jax.tokenizer import Tokenizer, TokenizerError, load_tokenizer

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
