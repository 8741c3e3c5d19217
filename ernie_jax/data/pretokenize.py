"""Tokenize documents once into a flat token file for `data.source=tokens` (the command line is
`ernie_jax.cli.pretokenize`).

Every document is followed by the EOS id (documents are separated by it). The output is raw ids of
`dtype` (uint16 holds vocabularies up to 65536; ERNIE's 103424 ids need uint32) and a sidecar
`<output>.json` ({"format": "ernie_jax.tokens", "dtype", "count", "documents", "eos_id", "vocab_size",
"tokenizer"}) that makes the file self-describing: the reader takes the dtype from it (whatever
`data.token_dtype` says) and refuses a file whose size disagrees with its count. Both are written
to temporary names and renamed into place, so an interrupted run leaves no half-written file
under the output name. Train on it with
  --config.data.source=tokens --config.data.paths=/data/corpus.bin
Documents that are None (bad rows skipped by `TextDocuments(bad_rows="skip")`) are left out.
"""

from __future__ import annotations

import os

import numpy as np

from ernie_jax.data.sources import sidecar_path, write_sidecar
from ernie_jax.data.tokenizers import encode


def pretokenize(docs, tokenizer, output: str, dtype: str = "uint32", eos_id: int | None = None) -> int:
  """Write the documents' ids (+ EOS after each) to `output` and its sidecar; returns the number of tokens."""
  eos = tokenizer.eos_id if eos_id is None else eos_id
  if eos is None:
    raise ValueError("the tokenizer has no EOS id; pass eos_id")
  if output.endswith(".npy"):
    raise ValueError(f"{output}: the output is a raw token file, not .npy; name it e.g. .bin")
  top = np.iinfo(np.dtype(dtype)).max
  if tokenizer.vocab_size - 1 > top:
    raise ValueError(f"--dtype {dtype} cannot hold ids up to {tokenizer.vocab_size - 1}; use uint32")
  n = documents = 0
  tmp = output + ".tmp"
  try:
    with open(tmp, "wb") as f:
      for i in range(len(docs)):
        doc = docs[i]
        if doc is None:
          continue
        ids = np.append(encode(tokenizer, doc), eos).astype(dtype)
        f.write(ids.tobytes())
        n += len(ids)
        documents += 1
    if os.path.exists(sidecar_path(output)):  # a stale sidecar never describes the new file
      os.remove(sidecar_path(output))
    os.replace(tmp, output)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  write_sidecar(output, dtype=np.dtype(dtype).name, count=n, documents=documents, eos_id=int(eos),
                vocab_size=int(tokenizer.vocab_size), tokenizer=str(tokenizer.path))
  return n
