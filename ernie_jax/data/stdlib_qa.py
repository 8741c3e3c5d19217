"""The embedded SFT dataset: questions and answers about Python standard-library functions, from their docstrings.

No download and no files: built at run time with `inspect` from `MODULES`, deterministic. For every public function
of those modules whose docstring's first paragraph yields one sentence ending with "." (5 to `MAX_ANSWER`
characters, no markup left after unquoting ``x``) the answer is that sentence, e.g. "What does `json.dumps` do?" ->
"Serialize obj to a JSON formatted str.". Functions whose summary differs between Python 3.11, 3.12 and 3.13 are
left out (`UNSTABLE`, found by running `python ernie_jax/data/stdlib_qa.py` under each), so the data are the same on
those versions.

Rows (OpenAI messages; every assistant turn carries a think block, the ERNIE 4.5 fusion of both modes):
* non-thinking: [user question, assistant "<think>\\n\\n</think>\\n\\n" + answer] (the empty tag is masked from the
  loss, see `ernie_jax.data.chat_template`);
* thinking: [system `THINK_SYSTEM`, user question, assistant "<think>\\n" + reasoning + "\\n</think>\\n\\n" + answer],
  where the reasoning names the module and the call signature (parameter names from `inspect.signature`);
* every third function also with system `BRIEF_SYSTEM` (non-thinking);
* multi-turn: two consecutive functions of the same module asked in one conversation (non-thinking).
The held-out split is the functions with crc32(name) % `HELDOUT_EVERY` == 0 (a function is in exactly one split,
and the split of a function does not depend on which other functions exist): their non-thinking and thinking rows.

Preference pairs for DPO (`preference_pairs`): every conversation above, with its last assistant answer as the
chosen answer and the same answer's words in a shuffled order as the rejected one (see `shuffled_words`).

This module uses only the standard library, so it can be run as a script under any Python to list the data.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import re
import zlib

MODULES = ("base64", "binascii", "bisect", "calendar", "cmath", "colorsys", "copy", "difflib", "fnmatch", "glob",
           "gzip", "heapq", "html", "ipaddress", "json", "keyword", "math", "operator", "os.path", "platform",
           "random", "re", "secrets", "shlex", "shutil", "statistics", "string", "struct", "tempfile", "textwrap",
           "unicodedata", "urllib.parse", "uuid", "zlib")
MAX_ANSWER = 100
MAX_ANSWER_MULTI = 60  # multi-turn rows only pair functions with answers this short (most fit 256 bytes)
HELDOUT_EVERY = 8
THINK_SYSTEM = "Think first, then answer."
BRIEF_SYSTEM = "Answer in one sentence."
EMPTY_THINK = "<think>\n\n</think>\n\n"
QUESTIONS = ("What does `{}` do?", "What is `{}` for?", "Explain `{}` briefly.", "Describe `{}`.")
# summaries that differ between Python 3.11, 3.12 and 3.13
# (or that exist only in some of them): kept out so the data do not depend on the version
UNSTABLE = frozenset(("base64.z85encode", "calendar.monthrange", "copy.replace", "glob.translate", "math.fma",
                      "math.fsum", "math.isclose", "math.nextafter", "math.sumprod", "os.path.isdevdrive",
                      "os.path.splitroot", "shutil.chown", "uuid.main"))


def _clean(text: str) -> str:
  return re.sub(r"\s+", " ", re.sub(r"``([^`]+)``", r"\1", text)).strip()


def summary(obj, name: str) -> str | None:
  """The first sentence of the docstring's first paragraph, or None if there is no usable one."""
  doc = inspect.getdoc(obj)
  if not doc:
    return None
  para = _clean(doc.split("\n\n")[0])
  if para.startswith(name + "(") or "->" in para or ">>>" in para:
    return None  # an old-style signature line, not a summary
  first = re.split(r"(?<=\.)\s+(?=[A-Z])", para)[0]
  if not first.endswith(".") or not 5 <= len(first) <= MAX_ANSWER or not first[0].isupper():
    return None
  if any(c in first for c in "`*:|\\") or "e.g." in first or "i.e." in first:
    return None
  return first


def signature(obj, name: str, max_params: int = 3) -> str:
  """`name(p1, p2, p3, ...)` from the parameter names (`name(...)` when there is no signature)."""
  try:
    params = [p.name for p in inspect.signature(obj).parameters.values()]
  except (TypeError, ValueError):
    return f"{name}(...)"
  shown = params[:max_params] + (["..."] if len(params) > max_params else [])
  return f"{name}({', '.join(shown)})"


@functools.lru_cache(maxsize=1)
def functions() -> tuple[tuple[str, str, str, str], ...]:
  """(module, qualified name, signature, summary) of every usable function, sorted by qualified name."""
  out = []
  for modname in MODULES:
    mod = importlib.import_module(modname)
    names = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
    for name in sorted(set(names)):
      obj = getattr(mod, name, None)
      if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
        continue
      qual = f"{modname}.{name}"
      text = summary(obj, name)
      if text is None or qual in UNSTABLE:
        continue
      out.append((modname, qual, signature(obj, name), text))
  return tuple(sorted(out, key=lambda f: f[1]))


def is_heldout(qual: str) -> bool:
  return zlib.crc32(qual.encode()) % HELDOUT_EVERY == 0


def _question(qual: str, k: int) -> str:
  return QUESTIONS[(zlib.crc32(qual.encode()) + k) % len(QUESTIONS)].format(qual)


def _thinking(module: str, qual: str, sig: str, answer: str) -> str:
  return f"<think>\nIn module {module}, signature {sig}.\n</think>\n\n{answer}"


def _pair(qual: str, answer: str, k: int) -> list[dict]:
  return [{"role": "user", "content": _question(qual, k)}, {"role": "assistant", "content": EMPTY_THINK + answer}]


@functools.lru_cache(maxsize=2)
def _conversations(split: str) -> tuple:
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
  funcs = [f for f in functions() if is_heldout(f[1]) == (split == "heldout")]
  rows = []
  for i, (module, qual, sig, answer) in enumerate(funcs):
    rows.append(_pair(qual, answer, 0))
    rows.append([{"role": "system", "content": THINK_SYSTEM}, {"role": "user", "content": _question(qual, 1)},
                 {"role": "assistant", "content": _thinking(module, qual, sig, answer)}])
    if split == "train" and i % 3 == 0:
      rows.append([{"role": "system", "content": BRIEF_SYSTEM}] + _pair(qual, answer, 2))
    if (split == "train" and i % 2 == 0 and i + 1 < len(funcs) and funcs[i + 1][0] == module
        and max(len(answer), len(funcs[i + 1][3])) <= MAX_ANSWER_MULTI):
      rows.append(_pair(qual, answer, 3) + _pair(funcs[i + 1][1], funcs[i + 1][3], 3))
  return tuple(tuple(tuple(sorted(m.items())) for m in row) for row in rows)


def conversations(split: str = "train") -> list[list[dict]]:
  """The conversations of `split` ("train" | "heldout"), a fresh list of message dicts each call."""
  return [[dict(m) for m in row] for row in _conversations(split)]


def shuffled_words(text: str, name: str) -> str | None:
  """The words of `text` (split at spaces) in a pseudo-random order seeded by crc32(`name`), never their own order;
  None when no other order exists (one word, or all words equal). Fisher-Yates driven by `random.Random.random()`,
  whose sequence for an integer seed Python keeps the same across versions (unlike `shuffle`'s)."""
  words = text.split(" ")
  if len(set(words)) < 2:
    return None
  rng = random.Random(zlib.crc32(name.encode()))
  while True:
    out = list(words)
    for i in range(len(out) - 1, 0, -1):
      j = int(rng.random() * (i + 1))
      out[i], out[j] = out[j], out[i]
    if out != words:
      return " ".join(out)


@functools.lru_cache(maxsize=2)
def _preference_pairs(split: str) -> tuple:
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
  funcs = [f for f in functions() if is_heldout(f[1]) == (split == "heldout")]
  rows = []

  def add(prompt: list[dict], chosen: str, rejected: str | None, wrap=lambda a: EMPTY_THINK + a) -> None:
    if rejected is not None:  # (an answer whose words have no other order gives no pair)
      rows.append((tuple(tuple(sorted(m.items())) for m in prompt), wrap(chosen), wrap(rejected)))

  for i, (module, qual, sig, answer) in enumerate(funcs):
    shuffled = shuffled_words(answer, qual)
    add([{"role": "user", "content": _question(qual, 0)}], answer, shuffled)
    add([{"role": "system", "content": THINK_SYSTEM}, {"role": "user", "content": _question(qual, 1)}], answer,
        shuffled, lambda a: _thinking(module, qual, sig, a))
    if split == "train" and i % 3 == 0:
      add([{"role": "system", "content": BRIEF_SYSTEM}, {"role": "user", "content": _question(qual, 2)}], answer,
          shuffled)
    if (split == "train" and i % 2 == 0 and i + 1 < len(funcs) and funcs[i + 1][0] == module
        and max(len(answer), len(funcs[i + 1][3])) <= MAX_ANSWER_MULTI):
      _, qual2, _, answer2 = funcs[i + 1]
      add(_pair(qual, answer, 3) + [{"role": "user", "content": _question(qual2, 3)}], answer2,
          shuffled_words(answer2, qual2))
  return tuple(rows)


def preference_pairs(split: str = "train") -> list[dict]:
  """DPO preference rows of `split` ("train" | "heldout"), fresh dicts each call:
  {"messages": prompt, "chosen": answer, "rejected": answer} (the row format of `ernie_jax.data.preference`).

  Each conversation of `conversations(split)` gives one pair (but the few whose answer has no other word order, e.g.
  one word): its messages up to the last user turn are the prompt,
  its last assistant answer is chosen, and the same answer with the words of its summary in a shuffled order
  (`shuffled_words`, seeded by the function's name; for a thinking answer only the part after </think> is
  shuffled, the reasoning and the empty think tag stay as they are) is rejected. Why: a fluency preference that a
  tiny randomly-initialised model can learn in minutes, and that generalises to the held-out functions; rejecting
  another function's summary instead would ask for knowledge of each function, which a tiny model cannot get. The
  held-out split is that of the SFT data (`is_heldout`), so it is the same across Python 3.11 / 3.12 / 3.13."""
  return [{"messages": [dict(m) for m in prompt], "chosen": chosen, "rejected": rejected}
          for prompt, chosen, rejected in _preference_pairs(split)]


if __name__ == "__main__":  # list the functions (compare the output of several Python versions for UNSTABLE)
  for f in functions():
    print("\t".join(f))
