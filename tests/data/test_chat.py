"""SFT chat data: templates rendered as transformers' apply_chat_template renders them, loss masks token by token
(system + multi-turn + thinking + non-thinking + "loss": false) against goldens tokenised piece by piece with the
tokenizer itself, ERNIEKit rows == messages rows, and bad rows named by file:line."""

import json

import numpy as np
import pytest

from ernie_jax.data import ByteTokenizer, DataError
from ernie_jax.data.chat import ChatRows, parse_row
from ernie_jax.data.chat_template import (ChatRenderer, ChatTemplateError, get_template, render_chat, render_prompt,
                                          render_text)
from ernie_jax.data.tokenizers import load_tokenizer

BOS, EOS = "<|begin_of_sentence|>", "<|end_of_sentence|>"
SYSTEM = "You are a helpful assistant."
EMPTY = "<think>\n\n</think>\n\n"
THINK = "<think>\nThe user asks about json; dumps takes obj.\n</think>\n\n"
CONV = [
  {"role": "system", "content": SYSTEM},
  {"role": "user", "content": "What does json.dumps do?"},
  {"role": "assistant", "content": EMPTY + "It serializes obj to a JSON string."},
  {"role": "user", "content": "And why?"},
  {"role": "assistant", "content": THINK + "To store data as text."},
  {"role": "user", "content": "Thanks!"},
  {"role": "assistant", "content": "You are welcome.", "loss": False},
]
# ERNIE 4.5's template (spec §6) written as jinja in the layout of the HF ERNIE tokenizer_config's template
# (indented blocks with whitespace control, defaults for undefined variables)
ERNIE_JINJA = """{%- if not add_generation_prompt is defined -%}
    {%- set add_generation_prompt = true -%}
{%- endif -%}
{%- if not cls_token is defined -%}
    {%- set cls_token = "<|begin_of_sentence|>" -%}
{%- endif -%}
{{- cls_token -}}
{%- for message in messages -%}
    {%- if message["role"] == "system" -%}
        {{- message["content"] + "\n" -}}
    {%- elif message["role"] == "user" -%}
        {{- "User: " + message["content"] + "\n" -}}
    {%- elif message["role"] == "assistant" -%}
        {{- "Assistant: " + message["content"] + sep_token -}}
    {%- else -%}
        {{- raise_exception("unknown role " + message["role"]) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "Assistant: " -}}
{%- endif -%}"""
# a block-style template: its output depends on trim_blocks / lstrip_blocks, and it uses bos_token and tojson
CHATML_JINJA = """{{ bos_token }}
{% for message in messages %}
  {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
{{ 'default' | tojson }}<|im_end|>
  {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
SPECIALS = ["<pad>", "<s>", "</s>", BOS, EOS, "<|im_start|>", "<|im_end|>"]


def _hf_dir(tmp_path, template, *, in_config=False):
  """A tiny byte-level BPE saved by transformers (PreTrainedTokenizerFast) with `template` as its chat template;
  in_config: the template in tokenizer_config.json instead of chat_template.jinja."""
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([m["content"] for m in CONV] * 5 + ["User: Assistant: think"] * 5, trainer=trainer)
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                            pad_token="<pad>", cls_token=BOS, sep_token=EOS)
  hf.chat_template = template
  d = tmp_path / ("cfg" if in_config else "jinja")
  hf.save_pretrained(str(d))
  if in_config:
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
  else:
    assert (d / "chat_template.jinja").is_file()
  return hf, load_tokenizer(str(d))


@pytest.mark.parametrize("in_config", [False, True])
@pytest.mark.parametrize("template", ["ernie", "chatml"])
def test_render_text_matches_transformers(tmp_path, template, in_config):
  source = {"ernie": ERNIE_JINJA, "chatml": CHATML_JINJA}[template]
  hf, tok = _hf_dir(tmp_path, source, in_config=in_config)
  assert get_template(tok, "auto").source == source
  plain = [{"role": m["role"], "content": m["content"]} for m in CONV]
  for convo, gen in ((plain, False), (plain[:4], True), (plain[1:2], True)):
    want = hf.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen)
    assert render_text(convo, tok, "auto", add_generation_prompt=gen) == want
  # "builtin" ignores the tokenizer's template
  assert render_text(plain, tok, "builtin") == render_text(plain, ByteTokenizer(), "auto")


def test_builtin_template_is_the_spec_template(tmp_path):
  """The built-in renderer gives what transformers renders with the spec §6 template as jinja."""
  hf, _ = _hf_dir(tmp_path, ERNIE_JINJA)
  plain = [{"role": m["role"], "content": m["content"]} for m in CONV]
  for convo, gen in ((plain, False), (plain[1:], False), (plain[:4], True)):
    assert render_text(convo, ByteTokenizer(), "builtin", add_generation_prompt=gen) == \
      hf.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen)


def _golden_pieces():
  """The pieces of CONV under the ERNIE template, written out from the spec: (text, trained?)."""
  return [
    (BOS + SYSTEM + "\n" + "User: What does json.dumps do?\n" + "Assistant: ", 0),
    (EMPTY, 0),  # the empty think tag of a non-thinking answer is not trained
    ("It serializes obj to a JSON string." + EOS, 1),
    ("User: And why?\n" + "Assistant: ", 0),
    (THINK + "To store data as text." + EOS, 1),  # reasoning is trained
    ("User: Thanks!\n" + "Assistant: ", 0),
    ("You are welcome." + EOS, 0),  # "loss": false
  ]


def test_masks_token_by_token_hf_tokenizer(tmp_path):
  hf, tok = _hf_dir(tmp_path, ERNIE_JINJA)
  ids, mask = render_chat(CONV, tok, "auto")
  want_ids, want_mask = [], []
  for text, m in _golden_pieces():
    piece = hf(text, add_special_tokens=False)["input_ids"]
    want_ids += piece
    want_mask += [m] * len(piece)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
  assert ids.dtype == mask.dtype == np.int32
  assert hf.decode(ids) == hf.apply_chat_template(CONV, tokenize=False)
  trained = "It serializes obj to a JSON string." + EOS + THINK + "To store data as text." + EOS
  assert hf.decode(ids[mask == 1]) == trained
  # the built-in template gives the same tokens with this tokenizer (its specials map to their own ids)
  ids_b, mask_b = render_chat(CONV, tok, "builtin")
  np.testing.assert_array_equal(ids_b, ids)
  np.testing.assert_array_equal(mask_b, mask)


def test_masks_token_by_token_byte_tokenizer():
  tok = ByteTokenizer()
  ids, mask = render_chat(CONV, tok)
  want_ids, want_mask = [], []
  for text, m in _golden_pieces():
    for j, part in enumerate(text.replace(BOS, "\0B\0").replace(EOS, "\0E\0").split("\0")):
      piece = [1] if part == "B" and j % 2 else [2] if part == "E" and j % 2 else [b + 3 for b in part.encode()]
      want_ids += piece
      want_mask += [m] * len(piece)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
  # the generation prompt is the training prefix up to "Assistant: " of the next turn
  prompt = render_prompt(CONV[:4], tok)
  n = len(prompt)
  np.testing.assert_array_equal(prompt, ids[:n])
  assert tok.decode(prompt).endswith("User: And why?\nAssistant: ") and mask[n - 1] == 0 and mask[n:].any()


def test_empty_think_variants_and_non_stable_template(tmp_path):
  tok = ByteTokenizer()
  for think in ("<think></think>", "<think>\n\n</think>", "<think>\n</think>\n\n", "<think> </think>\n"):
    ids, mask = render_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": think + "A."}], tok)
    assert tok.decode(ids[mask == 1], skip_special_tokens=False) == "A.</s>"
  # a non-empty think block at the start is trained, as is text that merely mentions <think> later
  ids, mask = render_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>x</think>A"}],
                          tok)
  assert tok.decode(ids[mask == 1]) == "<think>x</think>A"
  # a template that rewrites earlier turns cannot be split into prompt / answer pieces
  drop_history = ("{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}{{ m['role'] }}: "
                  "{{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
  _, hf_tok = _hf_dir(tmp_path, drop_history)
  with pytest.raises(ChatTemplateError, match="template=builtin"):
    ChatRenderer(hf_tok, "auto").encode(parse_row({"messages": CONV[1:5]}))


def _write_jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def test_erniekit_rows_equal_messages_rows(tmp_path):
  tok = ByteTokenizer()
  ek = [{"system": SYSTEM, "src": ["What does json.dumps do?", "  And why? "], "tgt": ["It serializes.", "Text."],
         "label": [0, 1]},
        {"src": "Hi", "tgt": "Hello."},
        {"src": [SYSTEM, "Hi"], "tgt": ["ignored", "Hello."], "is_system": 1}]
  msgs = [{"messages": [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": "What does json.dumps do?"},
                        {"role": "assistant", "content": "It serializes.", "loss": False},
                        {"role": "user", "content": "And why?"},  # ERNIEKit strips user / assistant text
                        {"role": "assistant", "content": "Text."}]},
          {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
          {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello.", "loss": True}]}]
  a = ChatRows([_write_jsonl(tmp_path / "ek.jsonl", ek)], "erniekit")
  b = ChatRows([_write_jsonl(tmp_path / "msgs.jsonl", msgs)], "messages")
  mixed = ChatRows([_write_jsonl(tmp_path / "mixed.jsonl", [ek[0], msgs[1], ek[2]])], "auto")
  for i in range(3):
    want_ids, want_mask = render_chat(b[i], tok)
    for rows in (a, mixed):
      got_ids, got_mask = render_chat(rows[i], tok)
      np.testing.assert_array_equal(got_ids, want_ids)
      np.testing.assert_array_equal(got_mask, want_mask)
  assert render_chat(a[0], tok)[1].sum() == len("Text.") + 1  # label 0 turn untrained


BAD_ROWS = [
  ("not json at all", "not valid JSON"),
  ('{"conversation": []}', "neither 'messages'"),
  ('{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unknown role \"bot\""),
  ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}', "content is a number"),
  ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}', "empty assistant turn"),
  ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
  ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}', "has no 'content'"),
  ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, '
   '{"role": "system", "content": "s"}, {"role": "assistant", "content": "z"}]}', "only the first message"),
  ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "loss": "no"}]}',
   "'loss' is a string"),
  ('{"src": ["a", "b"], "tgt": ["c"]}', "len(src)=2, len(tgt)=1"),
  ('{"src": ["a"], "tgt": ["c"], "label": [2]}', "not a list of 0 / 1"),
  ('{"src": ["a"], "tgt": [""]}', "tgt[0] is empty"),
  ('[1, 2]', "not a JSON object"),
]
GOOD = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}


def test_bad_rows_name_file_and_line(tmp_path):
  path = _write_jsonl(tmp_path / "bad.jsonl", [GOOD] + [r for r, _ in BAD_ROWS])
  rows = ChatRows([path], "auto", bad_rows="error")
  assert rows[0] is not None
  for i, (_, reason) in enumerate(BAD_ROWS, 1):
    with pytest.raises(DataError) as e:
      rows[i]
    assert f"{path}:{i + 1}: " in str(e.value) and reason in str(e.value), str(e.value)
  skip = ChatRows([path], "auto", bad_rows="skip")
  assert [skip[i] is None for i in range(len(skip))] == [False] + [True] * len(BAD_ROWS)
  assert len(skip.skipped) == len(BAD_ROWS)
  # a bad first row fails at construction under bad_rows=error, naming the format
  first_bad = _write_jsonl(tmp_path / "first.jsonl", [BAD_ROWS[1][0], GOOD])
  with pytest.raises(DataError, match=f"{first_bad}:1: .*data.format='auto'"):
    ChatRows([first_bad], "auto")
  with pytest.raises(DataError, match="no field 'messages'"):
    ChatRows([_write_jsonl(tmp_path / "ek.jsonl", [{"src": "a", "tgt": "b"}])], "messages")


def test_sentencepiece_special_tokens(tmp_path):
  """ERNIE ships a SentencePiece model whose chat markers are control symbols (not matched inside text by
  SentencePiece): they are cut out and mapped to their own ids, the runs between them SentencePiece-encoded."""
  spm = pytest.importorskip("sentencepiece")
  text = [m["content"] for m in CONV] + ["User: Assistant: think"]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 4), model_prefix=str(tmp_path / "tokenizer"),
                                 vocab_size=120, model_type="bpe", character_coverage=1.0, hard_vocab_limit=False,
                                 control_symbols=[BOS, EOS], minloglevel=2)
  tok = load_tokenizer(str(tmp_path / "tokenizer.model"))
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
  assert tok.special_id(BOS) == sp.PieceToId(BOS) != tok.bos_id and tok.special_id(EOS) == sp.PieceToId(EOS)
  ids, mask = render_chat(CONV, tok)
  want_ids, want_mask = [], []
  for piece, m in _golden_pieces():
    for j, part in enumerate(piece.replace(BOS, "\0B\0").replace(EOS, "\0E\0").split("\0")):
      run = [sp.PieceToId(BOS)] if part == "B" and j % 2 else [sp.PieceToId(EOS)] if part == "E" and j % 2 else \
        (sp.EncodeAsIds(part) if part else [])
      want_ids += run
      want_mask += [m] * len(run)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
