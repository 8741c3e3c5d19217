"""Command-line layer above the library (argument parsing and I/O only): the converters
(`cli.convert`) and their `--verify` (`cli.verify`), `cli.generate` (text generation) and
`cli.pretokenize` (token files for `data.source=tokens`). `tools/convert/*.py` are thin shims over
`cli.convert`; `experiments/pretrain.py` is the training entry point."""
