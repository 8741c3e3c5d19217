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
  chat           SFT chat rows (OpenAI messages / ERNIEKit), parsed and validated
  chat_template  rendering conversations (ERNIE 4.5 template or the tokenizer's chat_template) to ids + loss mask
  sft            `ChatDataConfig`, the SFT training pipeline and held-out batches (`make_chat_pipeline`, ...)
  preference     `PreferenceDataConfig`, DPO preference pairs: rows, the training pipeline and per-pair batches
  stdlib_qa      the embedded SFT dataset: Q&A from the Python standard library's docstrings (and DPO pairs)
  vl_chat        `VLChatDataConfig`, VL SFT: chats with images (multimodal messages / ERNIEKit VL rows), rendering,
                 image-slot rows, the training pipeline and held-out batches (`make_vl_chat_pipeline`, ...)
  shapes_chat    the embedded VL SFT dataset: questions about drawn shapes, with a text-only bound
"""

from ernie_jax.data.chat import ChatRows, parse_row
from ernie_jax.data.chat_template import ChatRenderer, ChatTemplateError, render_chat, render_prompt, render_text
from ernie_jax.data.packing import KEYS, document_example, pack_documents, window_example
from ernie_jax.data.pipeline import (DataConfig, DataPipeline, load_tokenizer_for, make_pipeline, resolve_eos,
                                     unigram_entropy)
from ernie_jax.data.preference import (PreferenceDataConfig, PreferencePipeline, load_preference_tokenizer,
                                       make_preference_pipeline, num_train_pairs, preference_pair_batches)
from ernie_jax.data.sft import (ChatDataConfig, ChatPipeline, load_chat_tokenizer, make_chat_eval_batches,
                                make_chat_pipeline)
from ernie_jax.data.sources import DataError, TextDocuments, TokenWindows, stdlib_files
from ernie_jax.data.tokenizers import ByteTokenizer, get_tokenizer, train_bpe

__all__ = ["KEYS", "ByteTokenizer", "ChatDataConfig", "ChatPipeline", "ChatRenderer", "ChatRows", "ChatTemplateError",
           "DataConfig", "DataError", "DataPipeline", "PreferenceDataConfig", "PreferencePipeline", "TextDocuments",
           "TokenWindows", "document_example", "get_tokenizer", "load_chat_tokenizer", "load_preference_tokenizer",
           "load_tokenizer_for", "make_chat_eval_batches", "make_chat_pipeline", "make_pipeline",
           "make_preference_pipeline", "num_train_pairs", "pack_documents", "parse_row", "preference_pair_batches",
           "render_chat", "render_prompt", "render_text", "resolve_eos", "stdlib_files", "train_bpe",
           "unigram_entropy", "window_example"]
