"""Tokenize text / JSONL files once into a flat token file for `data.source=tokens`.

  python -m ernie_jax.cli.pretokenize --input '/data/*.jsonl' --mode jsonl \
      --tokenizer /ckpt/ERNIE-4.5-0.3B-PT --output /data/corpus.bin --dtype uint32

Every document is followed by the EOS id (documents are separated by it). The output is raw ids of
`--dtype` (uint16 holds vocabularies up to 65536; ERNIE's 103424 ids need uint32) plus a sidecar
`<output>.json` with the dtype, token count and EOS id, which the reader uses (so
`data.token_dtype` is not needed for these files); train on it with
  --config.data.source=tokens --config.data.paths=/data/corpus.bin
A bad input row (JSONL: not JSON, no --jsonl-field, a non-string text; a non-UTF-8 line for a text
tokenizer) stops with a one-line error naming file:line, or with --bad-rows skip is left out and
counted. Errors are one line on stderr (exit status 1).
"""

from __future__ import annotations

import argparse
import sys

from ernie_jax.data.pretokenize import pretokenize
from ernie_jax.data.sources import BAD_ROWS, DataError, TextDocuments, expand_paths, stdlib_files
from ernie_jax.data.tokenizers import TokenizerError, get_tokenizer


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", default="", help="comma-separated files / globs ('' with --mode stdlib)")
  p.add_argument("--mode", default="file", choices=("file", "line", "jsonl", "stdlib"))
  p.add_argument("--jsonl-field", default="text")
  p.add_argument("--bad-rows", default="error", choices=BAD_ROWS,
                 help="a bad row stops with an error naming file:line (default), or is skipped and counted")
  p.add_argument("--tokenizer", required=True, help="'bytes', or a tokenizer.model / tokenizer.json / dir")
  p.add_argument("--output", required=True)
  p.add_argument("--dtype", default="uint32", choices=("uint16", "uint32"))
  args = p.parse_args(argv)
  try:
    tok = get_tokenizer(args.tokenizer)
    if args.mode == "stdlib":
      docs = TextDocuments(stdlib_files(), "file")
    else:
      docs = TextDocuments(expand_paths(args.input, "--input"), args.mode, args.jsonl_field, bad_rows=args.bad_rows,
                           decode=tok.kind != "bytes")
    n = pretokenize(docs, tok, args.output, args.dtype)
  except (DataError, TokenizerError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{len(docs) - len(docs.skipped)} documents -> {n} tokens ({args.dtype}) in {args.output} "
        f"(+ {args.output}.json)")
  if docs.skipped:
    print(docs.skip_summary())
  return 0


if __name__ == "__main__":
  sys.exit(main())
