"""Rendering conversations with a chat template into token ids and a per-token loss mask.

Templates (`template=`):
* "builtin": ERNIE 4.5's template (spec §6, the HF tokenizer's default and ERNIEKit's SFT format):
  `<|begin_of_sentence|>` + [system + "\\n"] + per turn user -> "User: " + content + "\\n", assistant ->
  "Assistant: " + content + `<|end_of_sentence|>`; the generation prompt is "Assistant: ".
* "auto": the tokenizer directory's own chat template when it has one -- `chat_template.jinja`, else the
  `chat_template` of `tokenizer_config.json` (a list of named templates: the one named "default"), the precedence
  transformers uses -- rendered as transformers' `apply_chat_template` renders it (a sandboxed jinja2 environment
  with trim_blocks / lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` filter without
  HTML escaping; variables `messages` ([{"role", "content"}]), `add_generation_prompt`, `tools` = `documents` =
  None, and the named special tokens `bos_token`, `eos_token`, ... of tokenizer_config.json /
  special_tokens_map.json); else "builtin".

Pieces. A conversation is split into text pieces by rendering its prefixes (as ERNIEKit's tokenizer does in
`encode_chat_inputs`): for the assistant turn k, the prompt piece is render(messages[:k], generation prompt) minus
what was rendered before, and the target piece is render(messages[:k+1]) minus that prompt -- the assistant content
and whatever the template closes the turn with (`<|end_of_sentence|>` for ERNIE). Text after the last assistant turn
is a prompt piece. A template whose renderings of successive prefixes are not prefixes of each other (e.g. one that
drops earlier reasoning) is refused with a `ChatTemplateError`.

Tokenization. Each piece is tokenised on its own and the ids are concatenated (as ERNIEKit does: its
`encode_chat_inputs` tokenises the query and the answer of every turn separately), so a training sample's prompt
tokens are exactly what `render_prompt` gives at generation time, and no token straddles the prompt / target
boundary. Inside a piece the
special tokens (`<|begin_of_sentence|>`, `<|end_of_sentence|>` and the tokenizer's named special tokens) are cut
out and mapped to their ids (`Tokenizer.special_id`: the byte-level and trained BPE tokenizers map ERNIE's two
tokens to their BOS / EOS); the text between them goes through `tokenizer.encode` (no BOS added) -- as ERNIE's
own tokenizer does (it splits on its special tokens, then SentencePiece-encodes each run).

Differences from ERNIEKit (`ernie/dataset/finetuning.py` @fec4aa6), by choice: its labels replace the
`<|end_of_sentence|>` target by `</s>`, ours are the real next tokens (what the template renders and what
generation stops on); it truncates an overlong conversation by dropping its first turns, we drop its last ones
(`ernie_jax.data.sft`).

Loss mask (`mask[i]` = 1: token i is trained as a prediction target, so the model learns to produce it):
* 0 on every prompt piece (system, user turns, the "User: " / "Assistant: " markup, the leading
  `<|begin_of_sentence|>`, text after the last turn);
* 1 on every target piece -- the assistant content and its end-of-turn token -- of every assistant turn, except
  * a turn with `"loss": false` (ERNIEKit `label` 0): 0 on its whole target piece;
  * the empty think tag of a non-thinking answer: when the assistant content starts with `<think>`, only
    whitespace, `</think>` (regex `<think>\\s*</think>\\s*` at the start of the content, e.g.
    `<think>\\n\\n</think>\\n\\n`), that text, including the whitespace after `</think>`, is its own piece with
    mask 0; the answer after it keeps mask 1. A non-empty `<think>...</think>` block (thinking data) is part of
    the target and trained.
"""

from __future__ import annotations

import functools
import json
import os
import re
from datetime import datetime

import numpy as np

from ernie_jax.data.chat import validate_messages
from ernie_jax.data.sources import BadRow
from ernie_jax.data.tokenizers import BEGIN_OF_SENTENCE, END_OF_SENTENCE, ByteTokenizer, Tokenizer

TEMPLATES = ("auto", "builtin")
GENERATION_PROMPT = "Assistant: "
EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
  """A chat template that cannot be used (not found, not jinja, not prefix-stable, fails to render)."""


def render_builtin(messages: list[dict], add_generation_prompt: bool = False) -> str:
  """ERNIE 4.5's chat template (spec §6), see the module docstring."""
  out = [BEGIN_OF_SENTENCE]
  for m in messages:
    if m["role"] == "system":
      out.append(m["content"] + "\n")
    elif m["role"] == "user":
      out.append("User: " + m["content"] + "\n")
    else:
      out.append("Assistant: " + m["content"] + END_OF_SENTENCE)
  if add_generation_prompt:
    out.append(GENERATION_PROMPT)
  return "".join(out)


def tokenizer_dir(tokenizer: Tokenizer | None) -> str | None:
  """The directory a file-based tokenizer was loaded from (None for the byte tokenizer)."""
  if tokenizer is None or isinstance(tokenizer, ByteTokenizer) or not tokenizer.path:
    return None
  path = os.path.abspath(tokenizer.path)
  return path if os.path.isdir(path) else os.path.dirname(path)


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ChatTemplateError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
  return d if isinstance(d, dict) else {}


def find_chat_template(directory: str | None) -> tuple[str, str] | None:
  """(template source, where it came from) of a tokenizer directory, or None (see the module docstring)."""
  if not directory:
    return None
  jinja_file = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(jinja_file):
    with open(jinja_file, encoding="utf-8") as f:
      return f.read(), jinja_file
  config = os.path.join(directory, "tokenizer_config.json")
  if not os.path.isfile(config):
    return None
  tpl = _read_json(config).get("chat_template")
  if isinstance(tpl, list):
    named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
    if "default" not in named:
      raise ChatTemplateError(f"{config}: chat_template holds templates {sorted(map(str, named))} but none named "
                              "'default'; set data.template=builtin or add a default template")
    tpl = named["default"]
  if tpl is None:
    return None
  if not isinstance(tpl, str):
    raise ChatTemplateError(f"{config}: chat_template is {type(tpl).__name__}, not a jinja string")
  return tpl, f"{config}:chat_template"


def special_tokens_map(directory: str | None) -> dict[str, str]:
  """The named special tokens (bos_token, eos_token, ...) of a tokenizer directory's config files."""
  out: dict[str, str] = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    p = os.path.join(directory or "", name)
    if directory and os.path.isfile(p):
      d = _read_json(p)
      for k in SPECIAL_TOKEN_KEYS:
        v = d.get(k)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
          out[k] = v
  return out


@functools.lru_cache(maxsize=16)
def _compile(source: str):
  try:
    import jinja2
    from jinja2 import ext, nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
  except ImportError:
    raise ChatTemplateError("rendering the tokenizer's chat_template needs jinja2 (pip install jinja2), or set "
                            "data.template=builtin") from None

  class Generation(ext.Extension):
    # transformers' `{% generation %}` block (marks assistant text for its masks): rendered as its body here
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise ChatTemplateError(f"chat_template is not valid jinja (line {e.lineno}: {e.message})") from None


class ChatTemplate:
  """A conversation -> text renderer: the built-in ERNIE template (`source=None`) or a jinja chat_template."""

  def __init__(self, source: str | None = None, name: str = "builtin", special_tokens: dict | None = None):
    self.source, self.name = source, name
    self.special_tokens = dict(special_tokens or {})
    self._tpl = _compile(source) if source is not None else None

  def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if self._tpl is None:
      return render_builtin(messages, add_generation_prompt)
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
      return self._tpl.render(messages=plain, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                              **self.special_tokens)
    except Exception as e:  # jinja2 raises TemplateError, but templates can also fail with TypeError etc.
      raise BadRow(f"chat template {self.name} failed to render: {type(e).__name__}: {e}",
                   "fix the row or the template, or set data.template=builtin") from None

  def __repr__(self):
    return f"ChatTemplate({self.name})"


def get_template(tokenizer: Tokenizer | None, template: str = "auto") -> ChatTemplate:
  """The template `template` ("auto" | "builtin") names for this tokenizer (see the module docstring)."""
  if template not in TEMPLATES:
    raise ChatTemplateError(f"data.template must be one of {TEMPLATES}, got {template!r}")
  directory = tokenizer_dir(tokenizer)
  found = find_chat_template(directory) if template == "auto" else None
  if found is None:
    return ChatTemplate()
  return ChatTemplate(found[0], found[1], special_tokens_map(directory))


class ChatRenderer:
  """Conversations -> (ids, loss mask) with one tokenizer and template (see the module docstring)."""

  def __init__(self, tokenizer: Tokenizer, template: str | ChatTemplate = "auto"):
    self.tokenizer = tokenizer
    self.template = template if isinstance(template, ChatTemplate) else get_template(tokenizer, template)
    names = {BEGIN_OF_SENTENCE, END_OF_SENTENCE, *self.template.special_tokens.values()}
    self.specials = {t: i for t in names if t and (i := tokenizer.special_id(t)) is not None}
    missing = {BEGIN_OF_SENTENCE, END_OF_SENTENCE} - set(self.specials)
    if missing and self.template.source is None:
      raise ChatTemplateError(f"tokenizer {tokenizer} has no id for {sorted(missing)} (nor a BOS / EOS to use "
                              "instead), which the built-in ERNIE chat template needs")
    self.compile_specials()

  def compile_specials(self) -> None:
    """(Re)build the splitter of `self.specials` (call after changing them)."""
    self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.specials, key=len, reverse=True))) + ")") \
        if self.specials else None

  def special_ids(self, token: str) -> list[int]:
    """The ids a special token of a rendered piece becomes (one id; `vl_chat` expands image placeholders)."""
    return [self.specials[token]]

  def encode_text(self, text: str) -> list[int]:
    """One piece -> ids: special tokens cut out and mapped, the text between them through `tokenizer.encode`."""
    parts = self._split.split(text) if self._split else [text]
    ids: list[int] = []
    for j, part in enumerate(parts):
      if j % 2:
        ids += self.special_ids(part)
      elif part:
        ids += list(self.tokenizer.encode(part))
    return ids

  def pieces(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, int, bool]]:
    """(text, mask, ends_turn) pieces; ends_turn marks the last piece of each assistant turn."""
    render = self.template.render
    out: list[tuple[str, int, bool]] = []
    done = ""

    def take(text: str, start: str, what: str) -> str:
      if not text.startswith(start):
        raise ChatTemplateError(f"chat template {self.template.name}: {what} does not start with the rendering of "
                                "the conversation before it, so prompt and answer cannot be told apart; set "
                                "data.template=builtin")
      return text[len(start):]

    for k, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      prompt = render(messages[:k], add_generation_prompt=True)
      full = render(messages[:k + 1])
      out.append((take(prompt, done, f"the prompt of message {k}"), 0, False))
      target = take(full, prompt, f"the rendering up to message {k}")
      out += self._target_pieces(target, m)
      done = full
    tail = take(render(messages, add_generation_prompt=add_generation_prompt), done, "the whole conversation")
    if tail:
      out.append((tail, 0, False))
    return out

  @staticmethod
  def _target_pieces(target: str, m: dict) -> list[tuple[str, int, bool]]:
    mask = int(m["loss"])
    think = EMPTY_THINK.match(m["content"])
    at = target.find(m["content"]) if think else -1
    if at < 0:
      return [(target, mask, True)]
    end = at + think.end()
    parts = [(target[:at], mask, False), (target[at:end], 0, False), (target[end:], mask, False)]
    parts = [p for p in parts if p[0]]
    parts[-1] = (parts[-1][0], parts[-1][1], True)
    return parts

  def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray,
                                                                                       list[tuple[int, bool]]]:
    """ids [T], mask [T], and per assistant turn (token end offset, whether any token up to it is supervised)."""
    ids: list[int] = []
    mask: list[int] = []
    turns: list[tuple[int, bool]] = []
    for text, m, ends in self.pieces(messages, add_generation_prompt):
      t = self.encode_text(text)
      ids += t
      mask += [m] * len(t)
      if ends:
        turns.append((len(ids), any(mask)))
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32), turns


def render_text(messages: list[dict], tokenizer: Tokenizer | None = None, template: str = "auto",
                add_generation_prompt: bool = False) -> str:
  """The rendered text of a conversation (what transformers' apply_chat_template(tokenize=False) gives)."""
  return get_template(tokenizer, template).render(
    validate_messages(messages, prompt=add_generation_prompt), add_generation_prompt)


def render_chat(messages: list[dict], tokenizer: Tokenizer, template: str = "auto") -> tuple[np.ndarray, np.ndarray]:
  """A training conversation -> (ids int32 [T], loss_mask int32 [T]); mask[i] = 1: token i is a trained target.
  The conversation must end with an assistant turn (see `ernie_jax.data.chat.validate_messages`)."""
  ids, mask, _ = ChatRenderer(tokenizer, template).encode(validate_messages(messages))
  return ids, mask


def render_prompt(messages: list[dict], tokenizer: Tokenizer, template: str = "auto") -> np.ndarray:
  """The conversation so far plus the generation prompt ("Assistant: " for ERNIE) as ids int32 [T], tokenised
  exactly as the same turns are in training, for generating the next assistant turn."""
  ids, _, _ = ChatRenderer(tokenizer, template).encode(validate_messages(messages, prompt=True),
                                                        add_generation_prompt=True)
  return ids


def answer_stop_ids(tokenizer: Tokenizer, eos_id: int | None) -> tuple[int, ...]:
  """The ids that end a generated assistant turn: `<|end_of_sentence|>` (what the template closes a turn
  with) and the model's EOS, when they are known."""
  return tuple(sorted({i for i in (eos_id, tokenizer.special_id(END_OF_SENTENCE)) if i is not None}))
