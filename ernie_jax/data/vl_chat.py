"""Chat data with images for ERNIE 4.5 VL supervised fine-tuning: rows, rendering, loss masks, static-shape rows.

Built on the text SFT data (`ernie_jax.data.chat`, `chat_template`, `sft`): the same templates, loss masks,
truncation, bad-row handling, held-out split, shuffling, packing and checkpointable pipeline; what images add is here.

Rows (JSONL, one conversation per line; `data.format` auto / messages / erniekit):
* OpenAI / transformers multimodal messages: `{"messages": [{"role", "content", "loss"?}]}` where a content is a string
  or a list of parts `{"type": "text", "text": str}`, `{"type": "image", "image": path}` (transformers' "url" /
  "path" keys too) or `{"type": "image_url", "image_url": {"url": path}}`. Images may be in user and system turns,
  not in assistant turns (an assistant content list may hold text parts only: they are joined).
* ERNIEKit VL-SFT rows (ERNIEKit's `sft_vl-train_demo*.jsonl`): `{"image_info": [{"matched_text_index": k,
  "image_url": path}], "text_info": [{"text": str, "tag": "mask" | "no_mask"}], "system"?: str}`: each text_info item
  is a turn, "mask" (not trained) = user, "no_mask" (trained) = assistant; an image goes before the text of the turn
  `matched_text_index` names (several: in image_info order), which must be a user turn. `video_info` and tool turns
  are refused.
* text-only rows of the text formats (`ernie_jax.data.chat`): a VL data set may mix them in.
Image paths are local files, absolute or relative to the JSONL file (a `file://` prefix is removed; `data:image/...;
base64,...` URIs are decoded); http(s) URLs are refused (download the images first). In memory (the embedded data,
`VLMemoryRows`) an image may also be a PIL image. A missing or unreadable image, an unknown part type, a video part or
an image in an assistant turn is a bad row: a `DataError` naming file:line, or skipped and counted
(`data.bad_rows=skip`).

Rendering (`VLChatRenderer`): with the built-in template (`VLBuiltinTemplate`), a content list is its parts in order,
each image written as `data.image_prefix` (default "Picture {i}:", i = the image's number in the conversation, the
habit of ERNIE 4.5 VL's chat template) + `<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>`, the rest as the text
template (spec §6). With the tokenizer directory's own chat template (data.template=auto) the content lists go to the
jinja template as they are, as transformers' `apply_chat_template` passes them, and the template decides the text
around each image. Either way every image placeholder of the rendering (`<|IMAGE_PLACEHOLDER|>`, or
`<|image@placeholder|>` of Baidu's original templates) becomes n x the image token (n = LM tokens of the image grid),
as transformers' `Ernie4_5_VLMoeProcessor` expands it; their count must equal the conversation's images. Images sit in
prompt pieces, so their tokens are never trained (mask 0); the assistant masks are the text SFT masks.

Static shapes (jit): every image is resized to `data.image_size` x `data.image_size` (as `ernie_jax.data.vl`), so
every image has the grid (1, s/14, s/14) and n = (s/28)^2 tokens; a row has `data.images_per_row` image slots:
pixel_values [images_per_row * (s/14)^2, 588], the row's images in order, zeros after them. The model merges a row's
slots into that row's placeholders only (`lm_vl.merge_embeddings` per row), and the vision tower attends within each
image, so an unused slot changes nothing. A conversation with more images than slots, or more tokens than
`data.seq_len`, is cut after its last supervised assistant turn that fits both, or dropped (`data.overlong`; both
counted in `stats`), never inside a turn.

Row keys: inputs, targets, segment_ids, loss_mask, token_types [S]; positions [S, 3] ((t, h, w), per conversation,
`lm_vl.prepare_inputs`); pixel_values [slots * patches, 588] float32. Packed (first-fit, whole conversations) or one
conversation per row.

Embedded data (`data.paths` ""): `ernie_jax.data.shapes_chat`, questions about drawn shapes, with a held-out split;
`text_only_bound` is the least held-out assistant loss of a model that does not look at the images.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
from typing import Callable

import grain
import numpy as np

from ernie_jax.data.chat import ChatRows, MemoryRows, _kind, _shown, detect_format, erniekit_to_messages
from ernie_jax.data.chat import validate_messages
from ernie_jax.data.chat_template import ChatRenderer, ChatTemplate, ChatTemplateError, get_template, render_builtin
from ernie_jax.data.sft import (ChatDataConfig, ChatExamples, ChatPipeline, eval_rows, padded_batches, train_rows,
                                validate)
from ernie_jax.data.shapes_chat import ShapeChats
from ernie_jax.data.sources import BadRow, DataError, expand_paths, parse_json_row
from ernie_jax.data.tokenizers import BEGIN_OF_SENTENCE, END_OF_SENTENCE, Tokenizer, get_tokenizer
from ernie_jax.data.vl import image_grid
from ernie_jax.data.vl_preprocess import IMAGE_END, IMAGE_START, IMAGE_TOKEN, preprocess_image
from ernie_jax.model.vl.lm_vl import prepare_inputs
from ernie_jax.model.vl.rope3d import tokens_per_grid

IMAGE_TYPES = ("image", "image_url")
VIDEO_TYPES = ("video", "video_url")
BAIDU_PLACEHOLDER = "<|image@placeholder|>"  # the image placeholder of Baidu's own ERNIE 4.5 VL chat templates
PLACEHOLDERS = (IMAGE_TOKEN, BAIDU_PLACEHOLDER)
EMBEDDED = {"train": "<shapes_chat:train>", "heldout": "<shapes_chat:heldout>"}
ERNIEKIT_TAGS = {"mask": "user", "no_mask": "assistant"}
_FIX = "fix the row"


@dataclasses.dataclass(frozen=True)
class VLChatDataConfig(ChatDataConfig):
  """The `data` section of an SFT config for a VL model (model_family="vl"): `ChatDataConfig`'s fields plus the
  image layout (see the module docstring). paths "" = the embedded shapes conversations."""

  # Every image is resized to image_size x image_size pixels (a multiple of 28 = patch 14 x merge 2): all images
  # get the same static grid (1, s/14, s/14), i.e. (s/28)^2 LM tokens each (448: 256 tokens).
  image_size: int = 448
  # Image slots per row (unused ones are zeros and change nothing); a conversation with more images is cut at a
  # turn boundary or dropped (data.overlong), counted.
  images_per_row: int = 4
  # The built-in template's text before each image, "{i}" = the image's number in the conversation ("" = none).
  image_prefix: str = "Picture {i}:"


def vl_layout_problem(cfg: VLChatDataConfig, vl_cfg) -> tuple[str, str] | None:
  """(field, what is wrong) for the first bad image-layout field of `cfg` against the VLConfig, else None (the
  config check `sft_config.validate_vl_data` and the data check `validate_vl` share it)."""
  unit = vl_cfg.vision.patch_size * vl_cfg.vision.spatial_merge_size
  if not isinstance(cfg.image_size, int) or cfg.image_size <= 0 or cfg.image_size % unit:
    return "data.image_size", (f"must be a positive multiple of {unit} (vision patch_size x spatial_merge_size), "
                               f"got {cfg.image_size!r}")
  if not isinstance(cfg.images_per_row, int) or cfg.images_per_row < 1:
    return "data.images_per_row", f"must be an integer >= 1, got {cfg.images_per_row!r}"
  try:
    cfg.image_prefix.format(i=1)
  except (KeyError, IndexError, ValueError, AttributeError):
    return "data.image_prefix", f"must be text with at most the field {{i}} (the image's number), got " \
                                f"{cfg.image_prefix!r}"
  tokens = tokens_per_grid(image_grid(vl_cfg, cfg.image_size), False, vl_cfg.vision) + 2  # + start / end
  if cfg.seq_len < tokens + 8:
    return "data.seq_len", (f"{cfg.seq_len} cannot hold one image of data.image_size={cfg.image_size} ({tokens} "
                            f"tokens) and a turn around it; needs >= {tokens + 8}")
  return None


def validate_vl(cfg: VLChatDataConfig, vl_cfg) -> None:
  """A one-line DataError naming the first bad VL field (the text fields: `sft.validate`)."""
  validate(cfg)
  problem = vl_layout_problem(cfg, vl_cfg)
  if problem is not None:
    raise DataError(f"{problem[0]} {problem[1]}")


# --------------------------------------------------------------------------------------------------
# Rows
def _image_ref(value, base_dir: str, at: str):
  """An image part's value -> an absolute path, a data: URI or an in-memory image (raises BadRow)."""
  if hasattr(value, "convert") and hasattr(value, "size"):  # a PIL image (in-memory rows)
    return value
  if not isinstance(value, str) or not value.strip():
    raise BadRow(f"{at} image is {_kind(value)} ({_shown(value)}), not a path", _FIX)
  if value.startswith(("http://", "https://")):
    raise BadRow(f"{at} image {_shown(value, 60)} is a remote URL; images are read from local files (download them "
                 "and give their paths)", _FIX)
  if value.startswith("data:"):
    if ";base64," not in value[:100]:
      raise BadRow(f"{at} image {_shown(value)} is a data URI without ';base64,'", _FIX)
    return value
  path = value[len("file://"):] if value.startswith("file://") else value
  path = os.path.join(base_dir, os.path.expanduser(path))
  if not os.path.isfile(path):
    raise BadRow(f"{at} image {_shown(value, 60)} not found ({os.path.abspath(path)}; relative paths are relative to "
                 "the JSONL file)", "fix the path")
  return os.path.abspath(path)


def _image_value(part: dict, at: str):
  if part["type"] == "image":
    for key in ("image", "url", "path"):
      if key in part:
        return part[key]
    raise BadRow(f"{at} is an image part without 'image' (or 'url' / 'path'); found {list(part)[:10]}", _FIX)
  url = part.get("image_url")
  return url.get("url") if isinstance(url, dict) else url


def content_parser(base_dir: str = ".") -> Callable:
  """parse_content for `validate_messages`: a string, or a list of text / image parts (see the module docstring)
  -> the content with every image part carrying its resolved image under "image"; an assistant's -> a string."""

  def parse(content, at: str, role: str):
    if isinstance(content, str):
      return content
    if not isinstance(content, list) or not content:
      raise BadRow(f"{at} ({role}) content is {_kind(content)} ({_shown(content)}), not a string or a non-empty list "
                   "of parts", _FIX)
    parts = []
    for j, part in enumerate(content):
      pat = f"{at}.content[{j}]"
      if not isinstance(part, dict) or "type" not in part:
        raise BadRow(f"{pat} is {_kind(part)} ({_shown(part)}), not a part {{'type': ..., ...}}", _FIX)
      kind = part["type"]
      if kind == "text":
        if not isinstance(part.get("text"), str):
          raise BadRow(f"{pat} is a text part whose 'text' is {_kind(part.get('text'))}, not a string", _FIX)
        parts.append({"type": "text", "text": part["text"]})
      elif kind in IMAGE_TYPES:
        if role == "assistant":
          raise BadRow(f"{pat} is an image in an assistant turn; images can be given in user and system turns only",
                       _FIX)
        parts.append({**part, "image": _image_ref(_image_value(part, pat), base_dir, pat)})
      elif kind in VIDEO_TYPES:
        raise BadRow(f"{pat} is a video; VL fine-tuning here takes images only", "remove the video or use frames")
      else:
        raise BadRow(f"{pat} has unknown type {_shown(kind)} (expected 'text', 'image' or 'image_url')", _FIX)
    if role == "assistant":
      return "".join(p["text"] for p in parts)
    return parts

  return parse


def validate_vl_messages(messages, where: str = "messages", prompt: bool = False, base_dir: str = ".") -> list[dict]:
  """`validate_messages` with content lists of text and image parts (see the module docstring)."""
  return validate_messages(messages, where, prompt, parse_content=content_parser(base_dir))


def erniekit_vl_to_messages(obj: dict, base_dir: str = ".") -> list[dict]:
  """An ERNIEKit VL-SFT row -> messages (see the module docstring); raises BadRow."""
  if obj.get("video_info"):
    raise BadRow("ERNIEKit row has 'video_info'; VL fine-tuning here takes images only", "remove the videos")
  text_info, image_info = obj.get("text_info"), obj.get("image_info", [])
  if not isinstance(text_info, list) or not text_info:
    raise BadRow(f"ERNIEKit VL row: 'text_info' is {_kind(text_info)} ({_shown(text_info)}), not a non-empty list of "
                 "{'text', 'tag'} items", _FIX)
  if not isinstance(image_info, list):
    raise BadRow(f"ERNIEKit VL row: 'image_info' is {_kind(image_info)}, not a list", _FIX)
  roles = []
  for k, item in enumerate(text_info):
    if not isinstance(item, dict) or not isinstance(item.get("text"), str):
      raise BadRow(f"text_info[{k}] is {_shown(item)}, not an object with a string 'text'", _FIX)
    if item.get("tag") not in ERNIEKIT_TAGS:
      raise BadRow(f"text_info[{k}] has tag {_shown(item.get('tag'))} (expected 'mask' = user or 'no_mask' = "
                   "assistant)", _FIX)
    if item.get("tool_response") or item.get("tool_calls"):
      raise BadRow(f"text_info[{k}] is a tool turn; tool calls are not supported here", "remove the tool turns")
    roles.append(ERNIEKIT_TAGS[item["tag"]])
  images: dict[int, list[dict]] = {}
  for j, info in enumerate(image_info):
    k = info.get("matched_text_index") if isinstance(info, dict) else None
    if type(k) is not int or not 0 <= k < len(text_info):
      raise BadRow(f"image_info[{j}] has matched_text_index {_shown(k)}, not an index into text_info "
                   f"(0..{len(text_info) - 1})", _FIX)
    if roles[k] != "user":
      raise BadRow(f"image_info[{j}] is matched to text_info[{k}], an assistant ('no_mask') turn; images can precede "
                   "user ('mask') turns only", _FIX)
    images.setdefault(k, []).append({"type": "image_url", "image_url": {"url": info.get("image_url")}})
  messages = []
  system = obj.get("system")
  if system is not None:
    if not isinstance(system, str):
      raise BadRow(f"field 'system' is {_kind(system)} ({_shown(system)}), not a string", _FIX)
    if system:
      messages.append({"role": "system", "content": system})
  for k, (item, role) in enumerate(zip(text_info, roles)):
    text = item["text"]
    messages.append({"role": role, "content": images[k] + [{"type": "text", "text": text}] if k in images else text})
  return validate_vl_messages(messages, "ERNIEKit row", base_dir=base_dir)


def parse_vl_row(obj, fmt: str = "auto", base_dir: str = ".") -> list[dict]:
  """One decoded JSON row -> a validated conversation (text or with images); raises `BadRow`."""
  if not isinstance(obj, dict):
    raise BadRow(f"is {_kind(obj)}, not a JSON object", _FIX)
  vl_erniekit = "text_info" in obj or "image_info" in obj
  fmt = ("erniekit" if vl_erniekit else detect_format(obj)) if fmt == "auto" else fmt
  if fmt == "messages":
    if "messages" not in obj:
      raise BadRow(f"no field 'messages'; found {list(obj)[:10]} (format=messages)", _FIX)
    return validate_vl_messages(obj["messages"], base_dir=base_dir)
  if fmt == "erniekit":
    return erniekit_vl_to_messages(obj, base_dir) if vl_erniekit else erniekit_to_messages(obj)
  raise DataError(f"data.format must be one of ('auto', 'messages', 'erniekit'), got {fmt!r}")


class VLChatRows(ChatRows):
  """Conversations with images of JSONL files (`ChatRows` with `parse_vl_row`; image paths relative to the file)."""

  def _parse(self, i: int, data: bytes) -> list[dict]:
    return parse_vl_row(parse_json_row(data, ()), self.fmt, os.path.dirname(os.path.abspath(self.file_of(i))))


class VLMemoryRows(MemoryRows):
  """In-memory conversations with images (e.g. `ShapeChats`: items with `.messages`), read lazily."""

  def __init__(self, conversations, name: str = "<embedded>", bad_rows: str = "error"):
    self.rows, self.name, self.bad_rows = conversations, name, bad_rows
    self.skipped: dict[int, str] = {}

  def parse(self, row):
    return validate_vl_messages(getattr(row, "messages", row))


def _file_rows(cfg: ChatDataConfig, paths: str, what: str) -> VLChatRows:
  return VLChatRows(expand_paths(paths, what), cfg.format, cfg.bad_rows)


def _embedded_rows(cfg: VLChatDataConfig, split: str) -> VLMemoryRows:
  return VLMemoryRows(ShapeChats(split, cfg.image_size), EMBEDDED[split], cfg.bad_rows)


def vl_train_rows(cfg: VLChatDataConfig):
  return train_rows(cfg, _file_rows, _embedded_rows)


def vl_eval_rows(cfg: VLChatDataConfig):
  return eval_rows(cfg, _file_rows, _embedded_rows)


def conversation_images(messages: list[dict]) -> list:
  """The images of a conversation in order of appearance (their "image" values)."""
  return [p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"]
          if p["type"] in IMAGE_TYPES]


# --------------------------------------------------------------------------------------------------
# Rendering
def flatten(messages: list[dict], image_text: Callable[[int], str]) -> list[dict]:
  """Messages with every content list written as one string: text parts as they are, image i (1-based, counted
  over the conversation) as image_text(i)."""
  out, count = [], 0
  for m in messages:
    content = m["content"]
    if isinstance(content, list):
      pieces = []
      for p in content:
        if p["type"] in IMAGE_TYPES:
          count += 1
          pieces.append(image_text(count))
        else:
          pieces.append(p["text"])
      content = "".join(pieces)
    out.append({**m, "content": content})
  return out


class VLBuiltinTemplate(ChatTemplate):
  """The built-in ERNIE 4.5 template (`chat_template.render_builtin`) with each image written as
  image_prefix.format(i=number) + <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>."""

  def __init__(self, image_prefix: str = "Picture {i}:"):
    super().__init__(None, "builtin")
    self.image_prefix = image_prefix

  def image_text(self, i: int) -> str:
    return self.image_prefix.format(i=i) + IMAGE_START + IMAGE_TOKEN + IMAGE_END

  def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return render_builtin(flatten(messages, self.image_text), add_generation_prompt)


def vl_template(tokenizer: Tokenizer | None, template: str = "auto", image_prefix: str = "Picture {i}:"):
  """The tokenizer directory's chat template (template="auto" and it has one), else `VLBuiltinTemplate`."""
  found = get_template(tokenizer, template)
  return found if found.source is not None else VLBuiltinTemplate(image_prefix)


def render_vl_text(messages: list[dict], tokenizer: Tokenizer | None = None, template: str = "auto",
                   add_generation_prompt: bool = False, image_prefix: str = "Picture {i}:", base_dir: str = ".") -> str:
  """The rendered text of a conversation with images, placeholders not yet expanded (what transformers'
  `processor.apply_chat_template(..., tokenize=False)` gives)."""
  messages = validate_vl_messages(messages, prompt=add_generation_prompt, base_dir=base_dir)
  return vl_template(tokenizer, template, image_prefix).render(messages, add_generation_prompt)


def image_patches(image, size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
  """An image (path, data URI or PIL image) resized to size x size -> (patches [(size/14)^2, 588] float32, grid);
  an unreadable image raises BadRow."""
  from PIL import Image

  try:
    if isinstance(image, str):
      data = base64.b64decode(image.split(";base64,", 1)[1]) if image.startswith("data:") else None
      with Image.open(io.BytesIO(data) if data is not None else image) as im:
        img = im.convert("RGB")
    else:
      img = image.convert("RGB")
  except (OSError, ValueError) as e:
    shown = image[:60] if isinstance(image, str) else type(image).__name__
    raise BadRow(f"cannot read image {shown} ({type(e).__name__}: {e})", "fix or remove the image") from None
  if img.size != (size, size):
    img = img.resize((size, size), Image.Resampling.BICUBIC)
  return preprocess_image(img, min_pixels=size * size, max_pixels=size * size)


class VLChatRenderer(ChatRenderer):
  """`ChatRenderer` for conversations with images (see the module docstring): image placeholders become
  `image_tokens` x `vl_cfg.image_token_id`; `<|IMAGE_START|>` / `<|IMAGE_END|>` map to the VLConfig's ids."""

  def __init__(self, tokenizer: Tokenizer, template: str | ChatTemplate, vl_cfg, image_size: int,
               image_prefix: str = "Picture {i}:"):
    tpl = template if isinstance(template, ChatTemplate) else vl_template(tokenizer, template, image_prefix)
    super().__init__(tokenizer, tpl)
    self.vl_cfg, self.image_size = vl_cfg, image_size
    self.grid = image_grid(vl_cfg, image_size)
    self.image_tokens = tokens_per_grid(self.grid, False, vl_cfg.vision)
    self.image_token_id = vl_cfg.image_token_id
    self.specials.update({IMAGE_START: vl_cfg.image_start_token_id, IMAGE_END: vl_cfg.image_end_token_id,
                          **{p: vl_cfg.image_token_id for p in PLACEHOLDERS}})
    self.compile_specials()

  def special_ids(self, token: str) -> list[int]:
    if token in PLACEHOLDERS:
      return [self.image_token_id] * self.image_tokens
    return super().special_ids(token)

  def encode(self, messages: list[dict], add_generation_prompt: bool = False):
    ids, mask, turns = super().encode(messages, add_generation_prompt)
    want = len(conversation_images(messages))
    have = int(np.count_nonzero(ids == self.image_token_id))
    if have != want * self.image_tokens:
      raise BadRow(f"chat template {self.template.name} rendered {have / self.image_tokens:g} image placeholders for "
                   f"the conversation's {want} images", "fix the row or the template, or set data.template=builtin")
    return ids, mask, turns

  def pixels(self, images) -> np.ndarray:
    """Images -> pixel_values [len(images) * patches, 588] float32 (all resized to image_size)."""
    out = []
    for image in images:
      patches, grid = image_patches(image, self.image_size)
      if tuple(grid) != self.grid:
        raise DataError(f"image grid {grid} != {self.grid} (data.image_size={self.image_size})")
      out.append(patches)
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 3 * self.vl_cfg.vision.patch_size ** 2),
                                                                         np.float32)

  def example(self, ids: np.ndarray, mask: np.ndarray, images) -> dict[str, np.ndarray]:
    """A kept conversation's ids / mask and its images -> one example (the row keys, unpadded)."""
    inputs = ids[:-1]
    k = len(images)
    prep = prepare_inputs(self.vl_cfg, inputs[None], image_grid_thw=[self.grid] * k if k else None)
    return {"inputs": inputs, "targets": ids[1:], "loss_mask": mask[1:], "positions": prep["positions"][0],
            "token_types": prep["token_types"][0], "pixel_values": self.pixels(images)}


def make_vl_renderer(cfg: VLChatDataConfig, tokenizer: Tokenizer, vl_cfg) -> VLChatRenderer:
  try:
    return VLChatRenderer(tokenizer, cfg.template, vl_cfg, cfg.image_size, cfg.image_prefix)
  except ChatTemplateError as e:
    raise DataError(str(e)) from None


# --------------------------------------------------------------------------------------------------
# Examples and rows
class VLChatExamples(ChatExamples):
  """Row i -> its (truncated) example (the row keys of the module docstring, unpadded) or None (bad row skipped, or
  dropped); a conversation fits when its tokens fit seq_len and its images `images_per_row`."""

  def __init__(self, rows, renderer: VLChatRenderer, seq_len: int, overlong: str, images_per_row: int):
    super().__init__(rows, renderer, seq_len, overlong)
    self.images_per_row = images_per_row

  def images_in(self, ids: np.ndarray, end: int) -> int:
    return int(np.count_nonzero(ids[:end] == self.renderer.image_token_id)) // self.renderer.image_tokens

  def fits(self, ids: np.ndarray, end: int) -> bool:
    return super().fits(ids, end) and self.images_in(ids, end) <= self.images_per_row

  def __getitem__(self, i: int) -> dict[str, np.ndarray] | None:
    i = int(i)
    encoded = self.encoded(i)
    if encoded is None:
      return None
    conv, ids, mask, turns = encoded
    end = self.kept_end(i, ids, mask, turns)
    if end is None:
      return None
    try:
      return self.renderer.example(ids[:end], mask[:end], conversation_images(conv)[:self.images_in(ids, end)])
    except BadRow as e:  # an image that cannot be read
      return self.bad_row(i, e)


def pad_vl_example(ex: dict[str, np.ndarray], seq_len: int, pixel_rows: int) -> dict[str, np.ndarray]:
  """One conversation -> a row of `seq_len` tokens and `pixel_rows` patch rows (zeros after it)."""
  n, p = len(ex["inputs"]), len(ex["pixel_values"])
  row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "loss_mask", "token_types", "segment_ids")}
  for k in ("inputs", "targets", "loss_mask", "token_types"):
    row[k][:n] = ex[k]
  row["segment_ids"][:n] = 1
  row["positions"] = np.zeros((seq_len, 3), np.int32)
  row["positions"][:n] = ex["positions"]
  row["pixel_values"] = np.zeros((pixel_rows, ex["pixel_values"].shape[1]), np.float32)
  row["pixel_values"][:p] = ex["pixel_values"]
  return row


def _canonical(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {k: np.asarray(ex[k], np.int32) for k in ("inputs", "targets", "loss_mask", "token_types", "positions")}
  out["segment_ids"] = np.asarray(ex["inputs_segment_ids"], np.int32)
  out["pixel_values"] = np.asarray(ex["pixel_values"], np.float32)
  return out


def pixel_rows(cfg: VLChatDataConfig, vl_cfg) -> int:
  """Patch rows of a row's pixel_values: images_per_row x patches per image."""
  t, h, w = image_grid(vl_cfg, cfg.image_size)
  return cfg.images_per_row * t * h * w


class VLChatPipeline(ChatPipeline):
  """Iterator over this process's rows of each global batch with images (the row keys of the module docstring,
  stacked over rows); deterministic and checkpointable like `ChatPipeline`."""

  def __init__(self, cfg: VLChatDataConfig, tokenizer: Tokenizer, vl_cfg, **kw):
    validate_vl(cfg, vl_cfg)
    self.vl_cfg = vl_cfg
    super().__init__(cfg, tokenizer, **kw)

  def make_renderer(self) -> VLChatRenderer:
    return make_vl_renderer(self.cfg, self.tokenizer, self.vl_cfg)

  def rows(self):
    return vl_train_rows(self.cfg)

  def make_examples(self, rows) -> VLChatExamples:
    return VLChatExamples(rows, self.renderer, self.cfg.seq_len, self.cfg.overlong, self.cfg.images_per_row)

  def to_rows(self, it: grain.IterDataset) -> grain.IterDataset:
    cfg, slots = self.cfg, pixel_rows(self.cfg, self.vl_cfg)
    if not cfg.packing:
      return it.map(lambda ex: pad_vl_example(ex, cfg.seq_len, slots))
    length = {k: cfg.seq_len for k in ("inputs", "targets", "loss_mask", "token_types", "positions")}
    return grain.experimental.FirstFitPackIterDataset(
      it, length_struct={**length, "pixel_values": slots}, num_packing_bins=cfg.packing_bins, seed=cfg.seed,
      shuffle_bins=cfg.shuffle).map(_canonical)


def make_vl_chat_pipeline(cfg: VLChatDataConfig, tokenizer: Tokenizer, vl_cfg, *, batch_size: int,
                          shard_index: int = 0, shard_count: int = 1) -> VLChatPipeline:
  """The VL SFT training iterator (see `VLChatPipeline` and the module docstring)."""
  return VLChatPipeline(cfg, tokenizer, vl_cfg, batch_size=batch_size, shard_index=shard_index,
                        shard_count=shard_count)


def vl_eval_examples(cfg: VLChatDataConfig, tokenizer: Tokenizer, vl_cfg) -> VLChatExamples | None:
  """The held-out conversations as examples (None when there is no held-out split)."""
  validate_vl(cfg, vl_cfg)
  rows = vl_eval_rows(cfg)
  if rows is None:
    return None
  return VLChatExamples(rows, make_vl_renderer(cfg, tokenizer, vl_cfg), cfg.seq_len, cfg.overlong,
                        cfg.images_per_row)


def make_vl_chat_eval_batches(cfg: VLChatDataConfig, tokenizer: Tokenizer, vl_cfg, *, batch_size: int,
                              stats: dict | None = None) -> list[dict[str, np.ndarray]]:
  """The held-out split as padded batches, one conversation per row (as `sft.make_chat_eval_batches`)."""
  examples = vl_eval_examples(cfg, tokenizer, vl_cfg)
  if examples is None:
    return []
  slots = pixel_rows(cfg, vl_cfg)
  return padded_batches(examples, lambda ex: pad_vl_example(ex, cfg.seq_len, slots), batch_size, stats)


def text_only_bound(cfg: VLChatDataConfig, tokenizer: Tokenizer, vl_cfg) -> float | None:
  """For the embedded data: the least expected held-out assistant loss (nats per supervised token, as `eval_loss`
  measures it) of a model that does not look at the images -- the nats of the attributes each kept assistant turn
  reveals for the first time (`shapes_chat`) over the supervised tokens; None for other data."""
  if cfg.paths:
    return None
  examples = vl_eval_examples(cfg, tokenizer, vl_cfg)
  nats = tokens = 0.0
  for i in range(len(examples)):
    encoded = examples.encoded(i)
    if encoded is None:
      continue
    _, ids, mask, turns = encoded
    end = examples.kept_end(i, ids, mask, turns)
    if end is None:
      continue
    kept = sum(1 for e, _ in turns if e <= end)
    nats += sum(examples.rows.rows[i].info[:kept])
    tokens += float(mask[1:end].sum())
  return nats / max(tokens, 1.0)


@dataclasses.dataclass
class VLPrompt:
  """A generation prompt with images: the messages, ids, pixel values / grids for `generate_vl`, and the answer the
  data gives (for comparison; "" when the question was replaced)."""

  messages: list[dict]
  ids: np.ndarray
  pixel_values: np.ndarray
  image_grid_thw: list
  answer: str


def first_heldout_prompt(cfg: VLChatDataConfig, tokenizer: Tokenizer, vl_cfg, question: str = "") -> VLPrompt | None:
  """The first held-out conversation whose first question has images, up to its first assistant turn, as a generation
  prompt; `question` replaces the text of its last user turn (its images stay). None without such a conversation."""
  examples = vl_eval_examples(cfg, tokenizer, vl_cfg)
  if examples is None:
    return None
  for i in range(len(examples.rows)):
    conv = examples.rows[i]
    if conv is None:
      continue
    k = next(j for j, m in enumerate(conv) if m["role"] == "assistant")
    prompt = [dict(m) for m in conv[:k]]
    if not conversation_images(prompt):
      continue
    if question:
      user = prompt[-1]
      images = [p for p in user["content"] if p["type"] in IMAGE_TYPES] if isinstance(user["content"], list) else []
      user["content"] = images + [{"type": "text", "text": question}] if images else question
    renderer = examples.renderer
    ids, _, _ = renderer.encode(prompt, add_generation_prompt=True)
    images = conversation_images(prompt)
    if len(images) > cfg.images_per_row or len(ids) > cfg.seq_len:
      continue
    return VLPrompt(prompt, ids, renderer.pixels(images), [renderer.grid] * len(images),
                    "" if question else conv[k]["content"])
  return None


def load_vl_chat_tokenizer(cfg: VLChatDataConfig, workdir: str | None) -> Tokenizer:
  """The tokenizer of `cfg.tokenizer` (as `sft.load_chat_tokenizer`); "bpe" is trained on the training
  conversations' text (built-in template, each image as its `image_prefix` text only)."""
  validate(cfg)

  def training_texts():
    rows = vl_train_rows(cfg)
    for i in range(min(len(rows), cfg.bpe_train_rows)):
      conv = rows[i]
      if conv is not None:
        text = render_builtin(flatten(conv, lambda k: cfg.image_prefix.format(i=k)))
        yield text.replace(BEGIN_OF_SENTENCE, "").replace(END_OF_SENTENCE, "\n")

  return get_tokenizer(cfg.tokenizer, workdir=workdir, bpe_vocab_size=cfg.bpe_vocab_size,
                       training_texts=training_texts)
