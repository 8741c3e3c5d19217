"""Tokenize text / JSONL files once into a flat token file for `data.source=tokens`.

  python -m ernie_jax.cli.pretokenize --input '/data/*.jsonl' --mode jsonl \
      --tokenizer /ckpt/ERNIE-4.5-0.3B-PT --output /data/corpus.bin --dtype uint32

Every document is followed by the EOS id (documents are separated by it). The output is raw ids of
`--dtype` (uint16 holds vocabularies up to 65536; ERNIE's 103424 ids need uint32); train on it with
  --config.data.source=tokens --config.data.paths=/data/corpus.bin --config.data.token_dtype=uint32
"""

from __future__ import annotations

import argparse
import sys

from ernie_jax.data.pretokenize import pretokenize
from ernie_jax.data.sources import TextDocuments, expand_paths, stdlib_files
from ernie_jax.data.tokenizers import get_tokenizer


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", default="", help="comma-separated files / globs ('' with --mode stdlib)")
  p.add_argument("--mode", default="file", choices=("file", "line", "jsonl", "stdlib"))
  p.add_argument("--jsonl-field", default="text")
  p.add_argument("--tokenizer", required=True, help="'bytes', or a tokenizer.model / tokenizer.json / dir")
  p.add_argument("--output", required=True)
  p.add_argument("--dtype", default="uint32", choices=("uint16", "uint32"))
  args = p.parse_args(argv)
  files = stdlib_files() if args.mode == "stdlib" else expand_paths(args.input, "--input")
  docs = TextDocuments(files, "file" if args.mode == "stdlib" else args.mode, args.jsonl_field)
  tok = get_tokenizer(args.tokenizer)
  n = pretokenize(docs, tok, args.output, args.dtype)
  print(f"{len(docs)} documents -> {n} tokens ({args.dtype}) in {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
