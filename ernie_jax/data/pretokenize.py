"""Tokenize documents once into a flat token file for `data.source=tokens` (the command line is
`ernie_jax.cli.pretokenize`).

Every document is followed by the EOS id (documents are separated by it). The output is raw ids of
`--dtype` (uint16 holds vocabularies up to 65536; ERNIE's 103424 ids need uint32); train on it with
  --config.data.source=tokens --config.data.paths=/data/corpus.bin --config.data.token_dtype=uint32
"""

from __future__ import annotations

import os

import numpy as np

from ernie_jax.data.tokenizers import encode


def pretokenize(docs, tokenizer, output: str, dtype: str = "uint32", eos_id: int | None = None) -> int:
  """Write the documents' ids (+ EOS after each) to `output`; returns the number of tokens."""
  eos = tokenizer.eos_id if eos_id is None else eos_id
  if eos is None:
    raise ValueError("the tokenizer has no EOS id; pass eos_id")
  top = np.iinfo(np.dtype(dtype)).max
  if tokenizer.vocab_size - 1 > top:
    raise ValueError(f"--dtype {dtype} cannot hold ids up to {tokenizer.vocab_size - 1}; use uint32")
  n = 0
  tmp = output + ".tmp"
  with open(tmp, "wb") as f:
    for i in range(len(docs)):
      ids = np.append(encode(tokenizer, docs[i]), eos).astype(dtype)
      f.write(ids.tobytes())
      n += len(ids)
  os.replace(tmp, output)
  return n
