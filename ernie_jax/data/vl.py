"""Image-caption training data for ERNIE 4.5 VL: static shapes for jit, deterministic, resumable.

A row holds `images_per_row` examples, packed one after another (one segment each, positions
restart per example) and padded to `seq_len`. An example is the prompt that
`ernie_jax.data.vl_preprocess.build_prompt` makes for one image,
  [<s>] <|IMAGE_START|> n x <|IMAGE_PLACEHOLDER|> <|IMAGE_END|> caption </s>
(n = LM tokens of the image grid). Only the caption and its </s> are trained (`loss_mask`): no
loss on the image tokens, and none on predicting them. Every image is resized to
`image_size` x `image_size`, so every image has the same static grid (1, s/14, s/14) and the
pixel patches of a row have the fixed shape [images_per_row * s/14 * s/14, 3 * 14 * 14]. Captions
longer than an example's share of the row (seq_len // images_per_row tokens) are cut.

Keys of a row (numpy, one row; the pipeline yields them stacked over rows):
  inputs, targets, segment_ids, loss_mask, token_types [S]; positions [S, 3] (t, h, w, from
  `lm_vl.prepare_inputs`); pixel_values [images_per_row * patches, 588] float32.

Sources:
* `ShapeCaptions` (data.source="shapes", the default of the tiny VL config): procedurally drawn
  images, one coloured shape (circle, square, triangle, cross) in one quadrant of a black canvas,
  captioned "<colour> <shape>, <top|bottom> <left|right>". Colour, shape and quadrant are drawn
  uniformly and independently, so a model that does not look at the image cannot beat
  `text_only_bound()` nats per caption token; one that does can reach ~0.
* `ImageCaptions` (data.source="image_jsonl"): JSONL lines {"image": "path.png", "text": "caption"}
  (field names `data.jsonl_image_field` / `data.jsonl_field`), image paths relative to the JSONL
  file.
"""

from __future__ import annotations

import math
import os

import grain
import numpy as np

from ernie_jax.data import sources
from ernie_jax.data.iterator import GrainIterator
from ernie_jax.data.tokenizers import encode
from ernie_jax.data.vl_preprocess import build_prompt
from ernie_jax.model.vl.lm_vl import prepare_inputs

ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "token_types", "pixel_values")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235),
           "yellow": (235, 220, 40), "white": (235, 235, 235), "purple": (165, 60, 210)}
SHAPES = ("circle", "square", "triangle", "cross")
QUADRANTS = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))
SHAPES_SIZE = 100_000  # examples of the built-in source when data.max_documents is 0


class ShapeCaptions:
  """Random-access (RGB PIL image s x s, caption) pairs, element i drawn from seed (seed, i)."""

  def __init__(self, image_size: int, size: int = SHAPES_SIZE, seed: int = 0):
    self.image_size, self.size, self.seed = image_size, size, seed

  def __len__(self) -> int:
    return self.size

  def _attributes(self, i: int):
    rng = np.random.default_rng([self.seed, int(i)])
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    vertical, horizontal = QUADRANTS[rng.integers(len(QUADRANTS))]
    return rng, colour, shape, vertical, horizontal

  def attributes(self, i: int) -> tuple[str, str, str, str]:
    """(colour, shape, vertical, horizontal) of element i."""
    return self._attributes(i)[1:]

  def caption(self, i: int) -> str:
    return _caption(*self.attributes(i))

  def __getitem__(self, i: int):
    from PIL import Image, ImageDraw

    rng, colour, shape, vertical, horizontal = self._attributes(i)
    s = self.image_size
    half = s // 2
    extent = int(rng.integers(int(0.5 * half), int(0.85 * half) + 1))  # shape size in pixels
    x0 = (half if horizontal == "right" else 0) + int(rng.integers(0, half - extent + 1))
    y0 = (half if vertical == "bottom" else 0) + int(rng.integers(0, half - extent + 1))
    x1, y1 = x0 + extent - 1, y0 + extent - 1
    img = Image.new("RGB", (s, s))
    draw = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    if shape == "circle":
      draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
      draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
      draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
      bar = max(extent // 4, 2)
      cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
      draw.rectangle((x0, cy - bar // 2, x1, cy + bar - bar // 2 - 1), fill=fill)
      draw.rectangle((cx - bar // 2, y0, cx + bar - bar // 2 - 1, y1), fill=fill)
    return img, self.caption(i)

  @staticmethod
  def captions() -> list[str]:
    """Every caption, each equally likely."""
    return [_caption(c, s, v, h) for c in COLOURS for s in SHAPES for v, h in QUADRANTS]


def _caption(colour: str, shape: str, vertical: str, horizontal: str) -> str:
  return f"{colour} {shape}, {vertical} {horizontal}"


def text_only_bound(tokenizer) -> float:
  """The lowest caption loss (nats per trained token, in expectation over many captions) of a model
  that ignores the image on `ShapeCaptions`: the captions' entropy (uniform: log of their number)
  over their mean number of trained tokens (caption + </s>)."""
  caps = ShapeCaptions.captions()
  mean_tokens = np.mean([len(encode(tokenizer, c)) + 1 for c in caps])
  return math.log(len(caps)) / float(mean_tokens)


class ImageCaptions:
  """(image path, caption) pairs of JSONL files; paths are relative to their JSONL file."""

  def __init__(self, files: list[str], image_field: str = "image", text_field: str = "text"):
    self.lines = sources.TextDocuments(files, "line")
    self.image_field, self.text_field = image_field, text_field
    first = self._record(0)
    path = first[0]
    if not os.path.isfile(path):
      raise sources.DataError(f"{self.lines.file_of(0)}: image {path!r} of the first line does not exist")

  def _record(self, i: int) -> tuple[str, str]:
    f = self.lines.file_of(i)
    try:
      obj = sources.parse_json_row(self.lines[i], (self.image_field, self.text_field))
      image, text = sources.json_text(obj, self.image_field), sources.json_text(obj, self.text_field)
    except sources.BadRow as e:
      raise sources.DataError(f"{self.lines.where(i)}: {e.reason} (data.jsonl_image_field / data.jsonl_field); "
                              f"{e.fix}") from None
    return os.path.join(os.path.dirname(os.path.abspath(f)), image), text

  def __len__(self) -> int:
    return len(self.lines)

  def caption(self, i: int) -> str:
    return self._record(int(i))[1]

  def __getitem__(self, i: int):
    from PIL import Image

    path, text = self._record(int(i))
    with Image.open(path) as im:
      return im.convert("RGB"), text


# --------------------------------------------------------------------------------------------------
def image_grid(vl_cfg, image_size: int) -> tuple[int, int, int]:
  p = vl_cfg.vision.patch_size
  return (1, image_size // p, image_size // p)


def example_budget(seq_len: int, images_per_row: int) -> int:
  """Tokens (inputs) one example may use."""
  return seq_len // images_per_row


class ExampleBuilder:
  """(image, caption) -> one example (variable length, see the module docstring)."""

  def __init__(self, vl_cfg, tokenizer, *, image_size: int, budget: int, eos_id: int, add_bos: bool):
    self.cfg, self.tokenizer = vl_cfg, tokenizer
    self.size, self.budget, self.eos_id = image_size, budget, eos_id
    self.bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    self.grid = image_grid(vl_cfg, image_size)

  def __call__(self, item) -> dict[str, np.ndarray]:
    from PIL import Image

    img, caption = item  # an RGB PIL image
    if img.size != (self.size, self.size):
      img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
    px = self.size * self.size
    prompt = build_prompt([self.bos, img], self.cfg, min_pixels=px, max_pixels=px)
    if tuple(prompt.image_grid_thw[0]) != self.grid:
      raise sources.DataError(f"image grid {prompt.image_grid_thw[0]} != {self.grid} (data.image_size)")
    head = list(prompt.input_ids)
    seq = np.asarray(head + list(encode(self.tokenizer, caption)) + [self.eos_id], np.int32)
    seq = seq[:self.budget + 1]  # cut the caption to the example's share of the row
    inputs, targets = seq[:-1], seq[1:]
    prep = prepare_inputs(self.cfg, inputs[None], image_grid_thw=[self.grid])
    loss_mask = (np.arange(len(targets)) >= len(head) - 1).astype(np.int32)  # caption + </s>
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask,
            "positions": prep["positions"][0], "token_types": prep["token_types"][0],
            "pixel_values": prompt.pixel_values}


def pack_row(examples, seq_len: int) -> dict[str, np.ndarray]:
  """Examples one after another (segments 1, 2, ...), padded to seq_len (segment 0, no loss)."""
  row = {"inputs": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
         "segment_ids": np.zeros(seq_len, np.int32), "positions": np.zeros((seq_len, 3), np.int32),
         "loss_mask": np.zeros(seq_len, np.int32), "token_types": np.zeros(seq_len, np.int32)}
  start = 0
  for n, ex in enumerate(examples, 1):
    end = start + len(ex["inputs"])
    for k in ("inputs", "targets", "loss_mask", "positions", "token_types"):
      row[k][start:end] = ex[k]
    row["segment_ids"][start:end] = n
    start = end
  if start > seq_len:
    raise ValueError(f"examples of {start} tokens do not fit a row of {seq_len}")
  row["pixel_values"] = np.concatenate([ex["pixel_values"] for ex in examples]).astype(np.float32)
  return row


def build_source(cfg):
  if cfg.source == "shapes":
    return ShapeCaptions(cfg.image_size, cfg.max_documents or SHAPES_SIZE, cfg.seed)
  if cfg.source == "image_jsonl":
    return ImageCaptions(sources.expand_paths(cfg.paths), cfg.jsonl_image_field, cfg.jsonl_field)
  raise sources.DataError(f"data.source={cfg.source!r} is not an image-text source")


class VLDataPipeline(GrainIterator):
  """Iterator over this process's rows of each global batch: dicts of [rows, ...] arrays
  (`ROW_KEYS`), deterministic; `get_state` / `set_state` as for the text pipeline."""

  def __init__(self, cfg, tokenizer, vl_cfg, *, batch_size: int, eos_id: int, shard_index: int = 0,
               shard_count: int = 1):
    self.cfg = cfg
    self.source = build_source(cfg)
    ds = grain.MapDataset.source(self.source)
    if cfg.max_documents and cfg.source != "shapes":
      ds = ds[:cfg.max_documents]
    ds = ds[shard_index::shard_count]
    if len(ds) < cfg.images_per_row:
      raise sources.DataError(f"data shard {shard_index} of {shard_count} (run.data_shards) got {len(ds)} examples, fewer "
                              f"than data.images_per_row={cfg.images_per_row}")
    self.num_documents = len(ds)
    if cfg.shuffle:
      ds = ds.shuffle(seed=cfg.seed)
    build = ExampleBuilder(vl_cfg, tokenizer, image_size=cfg.image_size,
                           budget=example_budget(cfg.seq_len, cfg.images_per_row), eos_id=eos_id,
                           add_bos=cfg.add_bos)
    ds = ds.repeat(None).map(build)
    ds = ds.batch(cfg.images_per_row, drop_remainder=True, batch_fn=lambda exs: pack_row(exs, cfg.seq_len))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(cfg.read_threads, 1),
                                              prefetch_buffer_size=max(4 * batch_size, 16)))
    it = it.batch(batch_size, drop_remainder=True)
    if cfg.worker_processes:
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_processes))
    self.dataset = it
    self._it = iter(it)


def caption_unigram_entropy(cfg, tokenizer, eos_id: int, vocab_size: int, max_examples: int = 2000) -> float:
  """Entropy (nats) of the unigram distribution of the trained (caption) targets of the first
  examples: the loss of the best model that ignores both context and image."""
  src = build_source(cfg)
  counts = np.zeros(vocab_size, np.int64)
  for i in range(min(len(src), max_examples)):
    t = np.append(encode(tokenizer, src.caption(i)), eos_id)
    counts += np.bincount(np.clip(t, 0, vocab_size - 1), minlength=vocab_size)
  p = counts[counts > 0] / max(counts.sum(), 1)
  return float(-(p * np.log(p)).sum())

