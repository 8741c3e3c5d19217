"""Per-file checksums of a checkpoint directory: `<dir>/checksums.json` holds
{"algorithm": "crc32", "files": {relative path: [bytes, crc32]}} for every other file.

`write` hashes the complete directory (files read in 16 MiB pieces, several files at once: zlib
releases the GIL) and writes the record under a temporary name renamed into place, so it is whole
or absent. `verify` re-hashes and compares: sizes first (a truncated file is named without hashing
anything), then contents. `orbax_io` writes and checks them for the checkpoints it saves.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor

from ernie_jax.interop.safetensors_io import CheckpointError

CHECKSUMS = "checksums.json"
_HASH_CHUNK = 16 << 20


def _crc32(path: str) -> tuple[int, int]:
  crc, size = 0, 0
  with open(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK):  # bounded memory; zlib releases the GIL
      crc = zlib.crc32(chunk, crc)
      size += len(chunk)
  return size, crc


def _checkpoint_files(directory: str) -> list[str]:
  out = []
  for root, _, files in os.walk(directory):
    for f in files:
      rel = os.path.relpath(os.path.join(root, f), directory)
      if rel != CHECKSUMS and not rel.startswith(CHECKSUMS + "."):
        out.append(rel)
  return sorted(out)


def _hash_all(directory: str, files: list[str]) -> dict[str, tuple[int, int]]:
  with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    return dict(zip(files, pool.map(lambda f: _crc32(os.path.join(directory, f)), files)))


def write(directory: str) -> None:
  """Record the size and CRC32 of every file of the checkpoint in `<dir>/checksums.json`
  (written to a temporary name and renamed, so it is complete or absent)."""
  sums = _hash_all(directory, _checkpoint_files(directory))
  tmp = os.path.join(directory, f"{CHECKSUMS}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump({"algorithm": "crc32", "files": {k: list(v) for k, v in sums.items()}}, f, indent=0)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(directory, CHECKSUMS))


def verify(directory: str, remedy: str) -> bool:
  """Check the files of `directory` against its `checksums.json`; False when it has none. A
  missing, truncated or changed file is a one-line CheckpointError naming it and `remedy`."""
  fn = os.path.join(directory, CHECKSUMS)
  if not os.path.exists(fn):
    return False
  with open(fn) as f:
    recorded = {k: (int(v[0]), int(v[1])) for k, v in json.load(f)["files"].items()}
  present = [f for f in recorded if os.path.isfile(os.path.join(directory, f))]
  missing = sorted(set(recorded) - set(present))
  if missing:
    raise CheckpointError(f"{directory}: file '{missing[0]}' is missing"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + f"; {remedy}")
  for f in present:  # sizes first: cheap, and names a truncated file
    size = os.path.getsize(os.path.join(directory, f))
    if size != recorded[f][0]:
      raise CheckpointError(f"{directory}: file '{f}' has {size} bytes, {recorded[f][0]} when written "
                            f"(checksum mismatch); {remedy}")
  actual = _hash_all(directory, present)
  bad = [f for f in present if actual[f] != recorded[f]]
  if bad:
    raise CheckpointError(f"{directory}: checksum mismatch in file '{bad[0]}'"
                          + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "") + f"; {remedy}")
  return True
