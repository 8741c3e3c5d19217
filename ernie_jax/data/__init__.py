"""Pretraining data: document sources, tokenizers, packing with segment ids, the grain pipeline."""

from ernie_jax.data.packing import KEYS, document_example, pack_documents, window_example
from ernie_jax.data.pipeline import (DataConfig, DataPipeline, load_tokenizer_for, make_pipeline, resolve_eos,
                                     unigram_entropy)
from ernie_jax.data.sources import DataError, TextDocuments, TokenWindows, stdlib_files
from ernie_jax.data.tokenizers import ByteTokenizer, get_tokenizer, train_bpe

__all__ = ["KEYS", "ByteTokenizer", "DataConfig", "DataError", "DataPipeline", "TextDocuments",
           "TokenWindows", "document_example", "get_tokenizer", "load_tokenizer_for",
           "make_pipeline", "pack_documents", "resolve_eos", "stdlib_files", "train_bpe", "unigram_entropy",
           "window_example"]
