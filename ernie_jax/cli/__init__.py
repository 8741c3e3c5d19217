"""Command-line layer above the library (argument parsing and I/O only): `cli.generate` (text
generation), `cli.pretokenize` (token files for `data.source=tokens`)."""
