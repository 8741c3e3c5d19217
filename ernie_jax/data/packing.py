"""Packing documents into fixed-length rows with segment ids.

A packed example has S positions and the keys
  inputs       token ids fed to the model
  targets      the next token of the same document (what position t must predict)
  segment_ids  1, 2, ... per document piece in the row, 0 = padding (attention never crosses them)
  positions    position inside the document piece (restarts at 0), used for RoPE
  loss_mask    1 where `targets` is a real next token of the same document, else 0
so no position is trained to predict the first token of the next document.

Variable-length documents are packed by grain's `ConcatThenSplitIterDataset` (documents split at
row ends; the remainder starts the next row). Pre-tokenized windows are already contiguous and are
cut at EOS tokens by `window_example`.
"""

from __future__ import annotations

import grain
import numpy as np

KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def document_example(ids: np.ndarray, *, bos_id: int | None, eos_id: int | None,
                     add_bos: bool, add_eos: bool) -> dict[str, np.ndarray] | None:
  """One document's (inputs, targets) pairs: [<s>] ids [</s>] shifted by one; None if < 2 tokens."""
  parts = ([[bos_id]] if add_bos and bos_id is not None else []) + [ids] + (
    [[eos_id]] if add_eos and eos_id is not None else [])
  seq = np.concatenate([np.asarray(p, np.int32) for p in parts])
  if len(seq) < 2:
    return None
  return {"inputs": seq[:-1], "targets": seq[1:]}


def pack_documents(ds: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Document examples -> packed rows of `seq_len` (canonical keys, see the module docstring)."""
  packed = grain.experimental.ConcatThenSplitIterDataset(
    ds, length_struct={"inputs": seq_len, "targets": seq_len})
  return packed.map(_canonical)


def _canonical(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  seg = np.asarray(ex["inputs_segment_ids"], np.int32)
  return {"inputs": np.asarray(ex["inputs"], np.int32), "targets": np.asarray(ex["targets"], np.int32),
          "segment_ids": seg, "positions": np.asarray(ex["inputs_positions"], np.int32),
          "loss_mask": (seg > 0).astype(np.int32)}


def window_example(window: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
  """A contiguous window of S + 1 tokens of EOS-separated documents -> a packed example of S.

  The EOS token ends its document: position t with inputs[t] == EOS is not trained (its target is
  the next document's first token); segment ids and positions restart after it.
  """
  window = np.asarray(window, np.int32)
  inputs, targets = window[:-1], window[1:]
  is_eos = inputs == eos_id
  ends_before = np.concatenate([[0], np.cumsum(is_eos)[:-1]]).astype(np.int32)  # EOS seen before t
  segment_ids = ends_before + 1
  idx = np.arange(len(inputs))
  doc_start = np.maximum.accumulate(np.where(np.concatenate([[True], is_eos[:-1]]), idx, 0))
  return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
          "positions": (idx - doc_start).astype(np.int32), "loss_mask": (~is_eos).astype(np.int32)}
