"""Chat rows for supervised fine-tuning: parsing and validation.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str, "loss": bool}`
(`loss` is only meaningful on assistant turns: False keeps that turn out of the loss). Two row formats are read:

* OpenAI `messages`: `{"messages": [{"role": ..., "content": ..., "loss": false?}, ...]}` (other keys of a row or of
  a message are ignored). A system message may only come first; there must be at least one assistant turn, the last
  message must be an assistant turn, and no assistant content may be empty or whitespace.
* ERNIEKit SFT (the `erniekit` dataset type of PaddlePaddle/ERNIE: fields from `docs/datasets.md` @da43914, the
  conversion below read from `ernie/dataset/finetuning.py::process_example` @fec4aa6):
  `{"system": str?, "src": [user turns], "tgt": [assistant turns], "label": [1 | 0 per turn]?, "is_system": 0 | 1?}`.
  As ERNIEKit does: a `src` / `tgt` string is one turn; `label` defaults to all 1; `src`, `tgt` and `label` must
  have the same length; no `src` / `tgt` item may be empty or whitespace; with `is_system: 1` the first `src` item
  is the system prompt and the first `tgt` / `label` items are dropped; every user / assistant text is
  `.strip()`ped (the system prompt is not). The row becomes the messages
  `[system], user src[0], assistant tgt[0] (loss = label[0] == 1), user src[1], ...`.

`parse_row(obj, fmt)` turns one decoded JSON object into a conversation or raises `BadRow` (a one-line reason, see
`ernie_jax.data.sources`); `ChatRows` reads JSONL files with the file:line error / skip handling of
`sources.TextDocuments`; `MemoryRows` serves in-memory conversations (the embedded dataset) the same way.
"""

from __future__ import annotations

import json

from ernie_jax.data.sources import BadRow, DataError, TextDocuments, parse_json_row

ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "messages", "erniekit")
_FIX = "fix the row"


def _kind(x) -> str:
  return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
          dict: "an object", str: "a string"}.get(type(x), type(x).__name__)


def _shown(x, n: int = 40) -> str:
  s = json.dumps(x, ensure_ascii=False)
  return s if len(s) <= n else s[:n - 3] + "..."


def validate_messages(messages, where: str = "messages", prompt: bool = False, parse_content=None) -> list[dict]:
  """Check a conversation and return it normalised to [{"role", "content", "loss"}]; raises `BadRow`.
  prompt=True: a conversation to continue (generation), which need not contain or end with an assistant turn.
  parse_content(content, at, role) -> the normalised content of one message, raising `BadRow` (default: the content
  must be a string; `ernie_jax.data.vl_chat` reads lists of text and image parts); an assistant turn's must be a
  string."""
  if not isinstance(messages, list):
    raise BadRow(f"{where} is {_kind(messages)}, not a list of messages", _FIX)
  if not messages:
    raise BadRow(f"{where} is empty", _FIX)
  out = []
  for i, m in enumerate(messages):
    at = f"{where}[{i}]"
    if not isinstance(m, dict):
      raise BadRow(f"{at} is {_kind(m)}, not an object with 'role' and 'content'", _FIX)
    if "role" not in m:
      raise BadRow(f"{at} has no 'role'; found {list(m)[:10]}", _FIX)
    role = m["role"]
    if role not in ROLES:
      raise BadRow(f"{at} has unknown role {_shown(role)} (expected one of {ROLES})", _FIX)
    if "content" not in m:
      raise BadRow(f"{at} ({role}) has no 'content'", _FIX)
    content = m["content"]
    if parse_content is not None:
      content = parse_content(content, at, role)
    elif not isinstance(content, str):
      raise BadRow(f"{at} ({role}) content is {_kind(content)} ({_shown(content)}), not a string", _FIX)
    loss = m.get("loss", True)
    if not isinstance(loss, bool):
      raise BadRow(f"{at} ({role}) 'loss' is {_kind(loss)} ({_shown(loss)}), not true / false", _FIX)
    if role == "system" and i != 0:
      raise BadRow(f"{at} is a system message; only the first message may be one", _FIX)
    if role == "assistant" and not content.strip():
      raise BadRow(f"{at} is an empty assistant turn", _FIX)
    out.append({"role": role, "content": content, "loss": loss if role == "assistant" else False})
  if prompt:
    return out
  if not any(m["role"] == "assistant" for m in out):
    raise BadRow(f"{where} has no assistant turn (nothing to train on)", _FIX)
  if out[-1]["role"] != "assistant":
    raise BadRow(f"{where} ends with a {out[-1]['role']} message that no assistant turn answers; remove it", _FIX)
  return out


def _string_list(obj: dict, key: str) -> list[str]:
  value = obj[key]
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, list):
    raise BadRow(f"field {key!r} is {_kind(value)} ({_shown(value)}), not a list of strings", _FIX)
  for i, s in enumerate(value):
    if not isinstance(s, str):
      raise BadRow(f"{key}[{i}] is {_kind(s)} ({_shown(s)}), not a string", _FIX)
    if not s.strip():
      raise BadRow(f"{key}[{i}] is empty", _FIX)
  return value


def erniekit_to_messages(obj: dict) -> list[dict]:
  """An ERNIEKit SFT row -> messages (the conversion of ERNIEKit's `process_example`, see the module docstring)."""
  for key in ("src", "tgt"):
    if key not in obj:
      raise BadRow(f"ERNIEKit row has no field {key!r}; found {list(obj)[:10]}", _FIX)
  src, tgt = _string_list(obj, "src"), _string_list(obj, "tgt")
  if not src or not tgt:
    raise BadRow(f"ERNIEKit row has an empty {'src' if not src else 'tgt'}", _FIX)
  label = obj.get("label", [1] * len(src))
  if not isinstance(label, list) or any(type(v) is not int or v not in (0, 1) for v in label):
    raise BadRow(f"field 'label' is {_shown(label)}, not a list of 0 / 1 per turn", _FIX)
  if not len(src) == len(tgt) == len(label):
    raise BadRow(f"ERNIEKit row has len(src)={len(src)}, len(tgt)={len(tgt)}, len(label)={len(label)}; they must "
                 "be equal (one assistant answer and one label per user turn)", _FIX)
  system = obj.get("system")
  is_system = obj.get("is_system", 0)
  if is_system not in (0, 1) or type(is_system) is not int:
    raise BadRow(f"field 'is_system' is {_shown(is_system)}, not 0 / 1", _FIX)
  if is_system == 1:
    system, src, tgt, label = src[0], src[1:], tgt[1:], label[1:]
  if system is not None and not isinstance(system, str):
    raise BadRow(f"field 'system' is {_kind(system)} ({_shown(system)}), not a string", _FIX)
  messages = [{"role": "system", "content": system}] if system is not None else []
  for q, a, lab in zip(src, tgt, label):
    messages += [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": a.strip(), "loss": lab == 1}]
  return validate_messages(messages, "ERNIEKit row")


def detect_format(obj: dict) -> str:
  if "messages" in obj:
    return "messages"
  if "src" in obj or "tgt" in obj:
    return "erniekit"
  raise BadRow(f"neither 'messages' (OpenAI form) nor 'src' / 'tgt' (ERNIEKit form); found {list(obj)[:10]}", _FIX)


def parse_row(obj, fmt: str = "auto") -> list[dict]:
  """One decoded JSON row -> a validated conversation (see the module docstring); raises `BadRow`."""
  if not isinstance(obj, dict):
    raise BadRow(f"is {_kind(obj)}, not a JSON object", _FIX)
  fmt = detect_format(obj) if fmt == "auto" else fmt
  if fmt == "messages":
    if "messages" not in obj:
      raise BadRow(f"no field 'messages'; found {list(obj)[:10]} (format=messages)", _FIX)
    return validate_messages(obj["messages"])
  if fmt == "erniekit":
    return erniekit_to_messages(obj)
  raise DataError(f"data.format must be one of {FORMATS}, got {fmt!r}")


class ChatRows(TextDocuments):
  """Conversations of JSONL files, one row per non-empty line (format "auto" | "messages" | "erniekit").

  `rows[i]` is the validated conversation of row i, or None for a bad row under bad_rows="skip" (recorded in
  `skipped`, i -> "file:line: reason"); under bad_rows="error" a bad row raises `DataError` naming file:line.
  `where(i)` is the row's "file:line"."""

  def __init__(self, files: list[str], fmt: str = "auto", bad_rows: str = "error"):
    if fmt not in FORMATS:
      raise DataError(f"data.format must be one of {FORMATS}, got {fmt!r}")
    self.fmt = fmt
    super().__init__(files, "jsonl", field="", bad_rows=bad_rows)

  def _jsonl_hint(self) -> str:  # (the first rows are checked at construction, by TextDocuments)
    return f"data.format={self.fmt!r}"

  def _parse(self, i: int, data: bytes) -> list[dict]:
    return parse_row(parse_json_row(data, ()), self.fmt)


class MemoryRows:
  """In-memory conversations (e.g. the embedded dataset) with the `ChatRows` interface; `name` labels `where`."""

  def __init__(self, conversations: list, name: str = "<embedded>", bad_rows: str = "error"):
    self.rows, self.name, self.bad_rows = list(conversations), name, bad_rows
    self.skipped: dict[int, str] = {}

  def __len__(self) -> int:
    return len(self.rows)

  def where(self, i: int, offset: int = 0) -> str:
    return f"{self.name}:{int(i) + 1}"

  def parse(self, row):
    """One in-memory row -> its validated form (a conversation here; subclasses read other rows); raises BadRow."""
    return validate_messages(row)

  def __getitem__(self, i: int) -> list[dict] | None:
    i = int(i)
    try:
      return self.parse(self.rows[i])
    except BadRow as e:
      if self.bad_rows == "error":
        raise DataError(f"{self.where(i)}: {e.reason}") from None
      self.skip(i, f"{self.where(i)}: {e.reason}")
      return None

  def skip(self, i: int, msg: str) -> None:
    self.skipped.setdefault(i, msg)
