"""VL SFT chat data (`ernie_jax.data.vl_chat`): a two-image multi-turn conversation token by token (ids, loss mask,
image placeholders per grid, (t, h, w) positions, pixels) against goldens written from the spec; the rendering, ids,
pixels and MoE token types of transformers' Ernie4_5_VLMoeProcessor with the same chat template; ERNIEKit VL rows ==
messages rows; bad rows named by file:line or skipped and counted; the image budget cutting at a turn boundary; the
image-slot rows of the pipeline; the embedded shapes chats."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from ernie_jax.config import VLConfig
from ernie_jax.data import ByteTokenizer, DataError
from ernie_jax.data.shapes_chat import ShapeChats
from ernie_jax.data.tokenizers import BEGIN_OF_SENTENCE, END_OF_SENTENCE, load_tokenizer
from ernie_jax.data.vl_chat import (VLChatDataConfig, VLChatExamples, VLChatRows, make_vl_chat_eval_batches,
                                    make_vl_chat_pipeline, make_vl_renderer, pixel_rows, render_vl_text,
                                    text_only_bound, vl_eval_rows, vl_train_rows)
from ernie_jax.data.vl_preprocess import preprocess_image

PIL = pytest.importorskip("PIL.Image")

SPECIAL = dict(image_token_id=259, image_start_token_id=260, image_end_token_id=261, video_start_token_id=262,
               video_end_token_id=263, video_token_id=264)
CFG = VLConfig.tiny(vocab_size=272, **SPECIAL)
TOK = ByteTokenizer()
SIZE = 56  # -> grid (1, 4, 4): 16 patches, 4 LM tokens per image
N = 4
DATA = VLChatDataConfig(tokenizer="bytes", image_size=SIZE, images_per_row=2, seq_len=256, template="builtin",
                        packing=False, shuffle=False)
SYSTEM = "You look at pictures."
EMPTY = "<think>\n\n</think>\n\n"
THINK = "<think>\nBoth are red.\n</think>\n\n"


def _image(path, size, colour):
  img = PIL.new("RGB", size, (10, 10, 10))
  img.paste(colour, (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
  img.save(path)
  return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  d = tmp_path_factory.mktemp("imgs")
  os.makedirs(d / "img")
  return d, [_image(d / "img" / "a.png", (60, 50), (220, 40, 40)), _image(d / "img" / "b.png", (56, 56), (40, 200, 60))]


def _conversation(img_a="img/a.png", img_b="img/b.png"):
  return [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": [{"type": "image", "image": img_a}, {"type": "text", "text": "What is it?"}]},
    {"role": "assistant", "content": EMPTY + "A red square."},
    {"role": "user", "content": [{"type": "text", "text": "And this: "}, {"type": "image_url",
                                                                        "image_url": {"url": img_b}}]},
    {"role": "assistant", "content": [{"type": "text", "text": THINK + "Also "}, {"type": "text", "text": "red."}]},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "Welcome.", "loss": False},
  ]


def _jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def _examples(path, cfg=DATA, rows=None):
  rows = rows or VLChatRows([path], cfg.format, cfg.bad_rows)
  return VLChatExamples(rows, make_vl_renderer(cfg, TOK, CFG), cfg.seq_len, cfg.overlong, cfg.images_per_row)


def _golden():
  """(ids, mask) of `_conversation` written out from the spec template (§6) with ERNIE VL's image layout (§4.5)."""
  enc = lambda s: list(TOK.encode(s))  # noqa: E731
  bos, eos = TOK.special_id(BEGIN_OF_SENTENCE), TOK.special_id(END_OF_SENTENCE)
  image = [260] + [259] * N + [261]
  pieces = [
    ([bos] + enc(SYSTEM + "\n" + "User: Picture 1:") + image + enc("What is it?\n" + "Assistant: "), 0),
    (enc(EMPTY), 0),  # the empty think tag is not trained
    (enc("A red square.") + [eos], 1),
    (enc("User: And this: Picture 2:") + image + enc("\n" + "Assistant: "), 0),
    (enc(THINK + "Also red.") + [eos], 1),  # reasoning is trained
    (enc("User: Thanks!\n" + "Assistant: "), 0),
    (enc("Welcome.") + [eos], 0),  # "loss": false
  ]
  ids = [t for p, _ in pieces for t in p]
  mask = [m for p, m in pieces for _ in p]
  return np.asarray(ids), np.asarray(mask)


def _positions(ids):
  """(t, h, w) per token by the rule of spec §4.2: text (p, p, p); an image of LM grid 2 x 2 starting at p gets
  (p, p + row, p + col) and the next position is p + 2."""
  out, p, k = [], 0, 0
  while k < len(ids):
    if ids[k] == 259:
      out += [(p, p + r, p + c) for r in range(2) for c in range(2)]
      p, k = p + 2, k + N
    else:
      out.append((p, p, p))
      p, k = p + 1, k + 1
  return np.asarray(out)


def test_two_images_multi_turn_tokens_masks_positions_and_pixels(tmp_path, images):
  d, (a, b) = images
  path = _jsonl(d / "chats.jsonl", [{"messages": _conversation()}])
  ex = _examples(path)[0]
  ids, mask = _golden()
  np.testing.assert_array_equal(ex["inputs"], ids[:-1])
  np.testing.assert_array_equal(ex["targets"], ids[1:])
  np.testing.assert_array_equal(ex["loss_mask"], mask[1:])
  assert np.count_nonzero(ids == 259) == 2 * N == 2 * (SIZE // 28) ** 2  # placeholders = the grids' LM tokens
  assert not ex["loss_mask"][np.isin(ex["targets"], [259, 260, 261])].any()  # no loss on image tokens
  np.testing.assert_array_equal(ex["token_types"], np.isin(ids[:-1], [259, 260, 261]).astype(np.int32))
  np.testing.assert_array_equal(ex["positions"], _positions(ids[:-1]))
  want = [preprocess_image(PIL.open(p).convert("RGB").resize((SIZE, SIZE), PIL.Resampling.BICUBIC))[0] for p in (a, b)]
  np.testing.assert_array_equal(ex["pixel_values"], np.concatenate(want))  # in order, resized to image_size
  # Baidu's own templates write <|image@placeholder|>: expanded the same way
  renderer = make_vl_renderer(DATA, TOK, CFG)
  assert renderer.encode_text("<|IMAGE_START|><|image@placeholder|><|IMAGE_END|>") == [260] + [259] * N + [261]


# ERNIE 4.5 VL's chat-template layout (the spec §6 text template; "Picture i:" + start / placeholder / end per image)
VL_JINJA = """{%- set image_count = namespace(value=0) -%}
{{- '<|begin_of_sentence|>' -}}
{%- for message in messages -%}
  {%- if message.role == 'user' -%}{{- 'User: ' -}}{%- endif -%}
  {%- if message.content is string -%}
    {%- if message.role == 'assistant' -%}{{- 'Assistant: ' + message.content + '<|end_of_sentence|>' -}}
    {%- else -%}{{- message.content -}}{%- endif -%}
  {%- else -%}
    {%- if message.role == 'assistant' -%}{{- 'Assistant: ' -}}{%- endif -%}
    {%- for part in message.content -%}
      {%- if part.type == 'text' -%}{{- part.text -}}
      {%- elif part.type in ['image', 'image_url'] -%}
        {%- set image_count.value = image_count.value + 1 -%}
        {{- 'Picture ' ~ image_count.value ~ ':<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>' -}}
      {%- endif -%}
    {%- endfor -%}
    {%- if message.role == 'assistant' -%}{{- '<|end_of_sentence|>' -}}{%- endif -%}
  {%- endif -%}
  {%- if message.role != 'assistant' -%}{{- '\n' -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"""
HF_SPECIALS = ["<unk>", "<s>", "</s>", BEGIN_OF_SENTENCE, END_OF_SENTENCE, "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>",
               "<|IMAGE_END|>", "<|VIDEO_PLACEHOLDER|>", "<|VIDEO_START|>", "<|VIDEO_END|>"]


def _hf_processor(tmp_path):
  """A byte-level tokenizer without merges (so tokenising piece by piece = tokenising the whole text) saved by
  transformers with VL_JINJA, and transformers' Ernie4_5_VLMoeProcessor around it (its PIL image processor at
  56 x 56 pixels; no video processor: torchvision is not installed)."""
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import \
      Ernie4_5_VLMoeImageProcessorPil
  from transformers.models.ernie4_5_vl_moe.processing_ernie4_5_vl_moe import Ernie4_5_VLMoeProcessor

  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=len(alphabet) + len(HF_SPECIALS), special_tokens=HF_SPECIALS,
                                           initial_alphabet=alphabet, show_progress=False)
  tok.train_from_iterator(["a b"], trainer=trainer)
  names = {"image_token": 5, "image_start_token": 6, "image_end_token": 7, "video_token": 8,
           "video_start_token": 9, "video_end_token": 10}
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                            unk_token="<unk>", cls_token=BEGIN_OF_SENTENCE, sep_token=END_OF_SENTENCE,
                                            extra_special_tokens={k: HF_SPECIALS[i] for k, i in names.items()})
  hf.chat_template = VL_JINJA
  hf.save_pretrained(str(tmp_path / "tok"))
  proc = object.__new__(Ernie4_5_VLMoeProcessor)  # (its __init__ insists on a video processor)
  proc.tokenizer, proc.video_processor, proc.chat_template = hf, None, VL_JINJA
  proc.image_processor = Ernie4_5_VLMoeImageProcessorPil(size={"shortest_edge": SIZE * SIZE,
                                                               "longest_edge": SIZE * SIZE})
  for name in names:
    setattr(proc, name, getattr(hf, name))
    setattr(proc, name + "_id", getattr(hf, name + "_id"))
  cfg = VLConfig.tiny(vocab_size=len(hf), image_token_id=5, image_start_token_id=6, image_end_token_id=7,
                      video_token_id=8, video_start_token_id=9, video_end_token_id=10)
  return proc, load_tokenizer(str(tmp_path / "tok")), cfg


def test_rendering_ids_pixels_match_transformers_processor(tmp_path, images):
  d, (a, b) = images
  proc, tok, cfg = _hf_processor(tmp_path)
  square = _image(tmp_path / "sq.png", (SIZE, SIZE), (50, 90, 235))  # (the processor resizes; we too: same size)
  conv = _conversation(square, b)
  hf_conv = json.loads(json.dumps(conv).replace('"image": ', '"path": '))  # transformers' key for local files
  hf_conv[3]["content"][1] = {"type": "image", "path": b}
  want_text = proc.apply_chat_template(hf_conv, tokenize=False)
  assert render_vl_text(conv, tok, "auto") == want_text  # the tokenizer's template, as transformers renders it
  assert render_vl_text(conv, ByteTokenizer(), "builtin") == want_text  # the built-in one is the same layout
  prompt = conv[:4]
  assert render_vl_text(prompt, tok, "auto", add_generation_prompt=True) == \
    proc.apply_chat_template(hf_conv[:4], tokenize=False, add_generation_prompt=True)

  want = proc.apply_chat_template(hf_conv, tokenize=True, return_dict=True, return_tensors="np")
  for template in ("auto", "builtin"):
    data = dataclasses.replace(DATA, template=template, tokenizer=str(tmp_path / "tok"))
    renderer = make_vl_renderer(data, tok, cfg)
    rows = VLChatRows([_jsonl(tmp_path / "c.jsonl", [{"messages": conv}])], "auto", "error")
    ex = VLChatExamples(rows, renderer, data.seq_len, "truncate", 2)[0]
    ids = np.append(ex["inputs"], ex["targets"][-1])
    np.testing.assert_array_equal(ids, want["input_ids"][0], err_msg=template)
    np.testing.assert_array_equal(ex["token_types"], want["moe_mm_token_type_ids"][0][:-1])
    np.testing.assert_allclose(ex["pixel_values"], want["pixel_values"], rtol=0, atol=1e-5)
    assert [renderer.grid] * 2 == [tuple(g) for g in want["image_grid_thw"]]


def test_erniekit_vl_rows_equal_messages_rows(tmp_path, images):
  d, _ = images
  messages = [{"role": "system", "content": SYSTEM},
              {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "img/a.png"}},
                                           {"type": "image_url", "image_url": {"url": "img/b.png"}},
                                           {"type": "text", "text": "Compare them."}]},
              {"role": "assistant", "content": "Red and green."},
              {"role": "user", "content": "Sure?"},
              {"role": "assistant", "content": "Yes."}]
  erniekit = {"system": SYSTEM,
              "image_info": [{"matched_text_index": 0, "image_url": "img/a.png"},
                             {"matched_text_index": 0, "image_url": "img/b.png"}],
              "text_info": [{"text": "Compare them.", "tag": "mask"}, {"text": "Red and green.", "tag": "no_mask"},
                            {"text": "Sure?", "tag": "mask"}, {"text": "Yes.", "tag": "no_mask"}]}
  text_row = {"src": ["Hi"], "tgt": ["Hello."]}  # a text-only ERNIEKit row may be mixed in
  path = _jsonl(d / "mixed.jsonl", [{"messages": messages}, erniekit, text_row])
  ex = _examples(path)
  first, second, third = ex[0], ex[1], ex[2]
  for k in first:
    np.testing.assert_array_equal(first[k], second[k], err_msg=k)
  assert np.count_nonzero(first["inputs"] == 259) == 2 * N and len(third["pixel_values"]) == 0


def test_bad_rows_are_named_or_skipped_and_counted(tmp_path, images):
  d, _ = images
  (d / "broken.png").write_bytes(b"not a png")
  good = {"messages": _conversation()}
  bad = [
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "img/missing.png"}]},
                   {"role": "assistant", "content": "x"}]}, "messages[0].content[0] image \"img/missing.png\" not found"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]},
                   {"role": "assistant", "content": "x"}]}, "unknown type \"audio\""),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]},
                   {"role": "assistant", "content": "x"}]}, "is a video"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "https://x.org/a.png"}]},
                   {"role": "assistant", "content": "x"}]}, "remote URL"),
    ({"messages": [{"role": "user", "content": "Draw one."},
                   {"role": "assistant", "content": [{"type": "image", "image": "img/a.png"}]}]},
     "image in an assistant turn"),
    ({"image_info": [{"matched_text_index": 1, "image_url": "img/a.png"}],
      "text_info": [{"text": "q", "tag": "mask"}, {"text": "a", "tag": "no_mask"}]}, "an assistant ('no_mask') turn"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "broken.png"}]},
                   {"role": "assistant", "content": "x"}]}, "cannot read image"),
  ]
  path = _jsonl(d / "bad.jsonl", [good] + [row for row, _ in bad])
  examples = _examples(path)
  for i, (_, reason) in enumerate(bad, 1):
    with pytest.raises(DataError, match=f"bad.jsonl:{i + 1}: .*{re.escape(reason)}") as e:
      examples[i]
    assert "\n" not in str(e.value)
  with pytest.raises(DataError, match=r"first.jsonl:1: .*not found"):  # the first row is checked at start
    VLChatRows([_jsonl(d / "first.jsonl", [bad[0][0], good])], "auto", "error")
  skipping = _examples(path, dataclasses.replace(DATA, bad_rows="skip"))
  assert skipping[0] is not None and all(skipping[i] is None for i in range(1, len(bad) + 1))
  assert skipping.stats()["skipped"] == len(bad)


def test_image_budget_cuts_at_a_turn_boundary_or_drops(tmp_path, images):
  d, _ = images
  one_per_turn = _conversation()  # images in the first and the second user turn
  both_first = [{"role": "user", "content": [{"type": "image", "image": "img/a.png"},
                                             {"type": "image", "image": "img/b.png"}, {"type": "text", "text": "?"}]},
                {"role": "assistant", "content": "Two."}]
  path = _jsonl(d / "budget.jsonl", [{"messages": one_per_turn}, {"messages": both_first}])
  one = dataclasses.replace(DATA, images_per_row=1)
  examples = _examples(path, one)
  ex = examples[0]
  ids, mask = _golden()
  first_turn = int(np.flatnonzero(np.diff(mask) < 0)[0]) + 1  # the end of the first answer (after its EOS)
  np.testing.assert_array_equal(ex["targets"], ids[1:first_turn])  # cut after the first answer (and its EOS)
  assert len(ex["pixel_values"]) == 16 and np.count_nonzero(ex["inputs"] == 259) == N
  assert examples[1] is None  # its only turn needs two images
  assert examples.stats() == {"rows": 2, "truncated": 1, "dropped": 1, "skipped": 0}
  dropping = _examples(path, dataclasses.replace(one, overlong="drop"))
  assert dropping[0] is None and dropping.stats()["dropped"] == 1


def test_pipeline_rows_image_slots_resume_and_eval_batches(tmp_path, images):
  d, _ = images
  rows = [{"messages": _conversation()}] * 3 + [{"messages": [{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hello."}]}] * 3
  path = _jsonl(d / "pipe.jsonl", rows)
  cfg = dataclasses.replace(DATA, paths=path, eval_paths=path, images_per_row=4, seq_len=512, packing=True,
                            packing_bins=2, shuffle=True)
  pipe = make_vl_chat_pipeline(cfg, TOK, CFG, batch_size=2)
  slots = pixel_rows(cfg, CFG)
  assert slots == 4 * 16
  batches = [next(pipe) for _ in range(3)]
  for batch in batches:
    assert batch["pixel_values"].shape == (2, slots, 588) and batch["positions"].shape == (2, 512, 3)
    for r in range(2):
      images_in_row = np.count_nonzero(batch["inputs"][r] == 259) // N
      used = np.abs(batch["pixel_values"][r]).reshape(4, -1).max(axis=1) > 0
      assert used.tolist() == [True] * images_in_row + [False] * (4 - images_in_row)  # the row's images, then zeros
      assert images_in_row <= 4
  state = pipe.get_state()
  after = next(pipe)
  pipe.set_state(state)
  for k, v in next(pipe).items():
    np.testing.assert_array_equal(v, after[k], err_msg=k)
  stats = {}
  evals = make_vl_chat_eval_batches(cfg, TOK, CFG, batch_size=4, stats=stats)
  assert len(evals) == 2 and evals[0]["pixel_values"].shape == (4, slots, 588)
  assert stats == {"rows": 6, "truncated": 0, "dropped": 0, "skipped": 0}
  np.testing.assert_array_equal(evals[1]["segment_ids"][2:], 0)  # the last batch is filled with empty rows


def test_embedded_shapes_chats_and_text_only_bound():
  train, held = ShapeChats("train", SIZE), ShapeChats("heldout", SIZE)
  a, b = train[3], ShapeChats("train", SIZE)[3]
  assert a.messages[-1] == b.messages[-1] and a.info == b.info  # deterministic
  images = lambda c: [np.asarray(p["image"]) for m in c.messages if isinstance(m["content"], list)  # noqa: E731
                      for p in m["content"] if p["type"] == "image"]
  np.testing.assert_array_equal(images(a)[0], images(b)[0])
  assert not np.array_equal(images(train[0])[0], images(held[0])[0])  # the splits draw other images
  assert len(held) == 64 and all(c.info and len(c.info) == sum(m["role"] == "assistant" for m in c.messages)
                                 for c in (held[i] for i in range(len(held))))
  cfg = dataclasses.replace(DATA, images_per_row=2, seq_len=256)
  assert len(vl_train_rows(cfg)) == 100_000 and vl_eval_rows(cfg)[0][0]["role"] == "user"
  bound = text_only_bound(cfg, TOK, CFG)
  # each answer's nats over its supervised tokens, in [log 4 / longest answer, log 96 / shortest]
  assert 0.02 < bound < 1.0
  assert text_only_bound(dataclasses.replace(cfg, paths="x.jsonl"), TOK, CFG) is None
