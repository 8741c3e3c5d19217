"""The files that travel with a model besides its weights: tokenizer files and generation_config.json.

Every converter and exporter carries them from its input to its output (a converted or merged model
that loses its tokenizer is the common complaint about ERNIE tooling): `find` lists those present in a
directory (an HF / Paddle checkpoint, or an Orbax checkpoint written here, which keeps them next to its
`state` / `model_config` items), `generation_config` gives the generation config to write (the source's
own when it has one, else bos / eos / pad ids from the model config) and `write` copies them into an
output directory that is being assembled (inside `convert.atomic_output`, so nothing is half-written).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any, Mapping

from ernie_jax.interop.safetensors_io import CheckpointError

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "preprocessor_config.json", "processor_config.json")
TOKENIZER_CODE = "tokenization_*.py"  # ERNIE 4.5's remote-code tokenizer (trust_remote_code)


def find(directory: str | os.PathLike | None) -> dict[str, str]:
  """{file name: path} of the tokenizer files and generation_config.json present in `directory`
  (nothing for None or a directory without them)."""
  if directory is None:
    return {}
  directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
  if not os.path.isdir(directory):
    raise CheckpointError(f"tokenizer directory {directory} does not exist")
  names = [n for n in TOKENIZER_FILES + (GENERATION_CONFIG,) if os.path.isfile(os.path.join(directory, n))]
  names += sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, TOKENIZER_CODE)))
  return {n: os.path.join(directory, n) for n in names}


def generation_config(cfg, source: Mapping[str, Any] | str | os.PathLike | None = None) -> dict:
  """The generation config to write: `source` (a dict, or a generation_config.json path) when given,
  else bos / eos / pad token ids from the model config."""
  if source is None:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
  if isinstance(source, Mapping):
    return dict(source)
  try:
    with open(source) as f:
      out = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read generation config {source}: {e}") from None
  if not isinstance(out, dict):
    raise CheckpointError(f"generation config {source} is not a JSON object")
  return out


def write(out_dir: str, cfg, files: Mapping[str, str], generation: Mapping[str, Any] | str | None = None) -> list[str]:
  """Copy `files` ({name: path}, from `find`) into `out_dir` and write its generation_config.json: the
  explicit `generation` if given, else the copied one, else one from `cfg`. Returns the names written."""
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for name, path in files.items():
    if name == GENERATION_CONFIG:
      continue
    shutil.copyfile(path, os.path.join(out_dir, name))
    written.append(name)
  gen = generation_config(cfg, generation if generation is not None else files.get(GENERATION_CONFIG))
  with open(os.path.join(out_dir, GENERATION_CONFIG), "w") as f:
    json.dump(gen, f, indent=2)
  return written + [GENERATION_CONFIG]
