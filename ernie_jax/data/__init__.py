"""Data: tokenizers and the pretraining pipelines.

  tokenizers     `Tokenizer` (SentencePiece / HF tokenizers / bytes / trained BPE), `load_tokenizer`,
                 `get_tokenizer` (the `data.tokenizer` setting)
  sources        document sources (text files, JSONL, token files, the stdlib corpus)
  packing        packing documents into rows with segment ids
  iterator       `GrainIterator`: a checkpointable (JSON state) grain iterator
  pipeline       `DataConfig`, the text pipeline and the source dispatch (`make_pipeline`)
  vl             image-caption rows for ERNIE 4.5 VL; vl_preprocess: image / video preprocessing and
                 VL prompt building
  pretokenize    token files for `data.source=tokens` (command line: `ernie_jax.cli.pretokenize`)
"""

from ernie_jax.data.packing import KEYS, document_example, pack_documents, window_example
from ernie_jax.data.pipeline import (DataConfig, DataPipeline, load_tokenizer_for, make_pipeline, resolve_eos,
                                     unigram_entropy)
from ernie_jax.data.sources import DataError, TextDocuments, TokenWindows, stdlib_files
from ernie_jax.data.tokenizers import ByteTokenizer, get_tokenizer, train_bpe

__all__ = ["KEYS", "ByteTokenizer", "DataConfig", "DataError", "DataPipeline", "TextDocuments",
           "TokenWindows", "document_example", "get_tokenizer", "load_tokenizer_for",
           "make_pipeline", "pack_documents", "resolve_eos", "stdlib_files", "train_bpe", "unigram_entropy",
           "window_example"]
