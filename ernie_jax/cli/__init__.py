"""Command-line layer above the library: the converters (`cli.convert`) and their `--verify`
(`cli.verify`). `tools/convert/*.py` are thin shims over `cli.convert`."""
