"""Image / video preprocessing and prompt building for ERNIE 4.5 VL (numpy + PIL; spec §4.3, §4.5).

Images: converted to RGB, resized (PIL bicubic, on uint8) to the `smart_resize` size (both sides
multiples of 28 = patch 14 x merge 2, pixel count within [min_pixels, max_pixels], aspect ratio
kept), scaled to [0, 1], normalised with the CLIP mean / std, then cut into 14x14 patches flattened
as (C, ph, pw) and ordered by 2x2 merge block: rows of blocks, blocks left to right, the 4 patches
of a block row-major. This is the layout of transformers' `Ernie4_5_VLMoeImageProcessorPil`.
Videos: every frame like an image (video pixel bounds, one common size), grid t = number of
frames (padded to even by repeating the last frame). Frame sampling and timestamp drawing are not
implemented: pass the frames you want.

Prompts: `<|IMAGE_START|>` + n x `<|IMAGE_PLACEHOLDER|>` + `<|IMAGE_END|>` per image (n = t*h*w/4
for the patch grid), `<|VIDEO_START|>` + n x video placeholder + `<|VIDEO_END|>` per video
(n = t*h*w/8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ernie_jax.config import VisionConfig
from ernie_jax.model.vl.rope3d import tokens_per_grid

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_SIZE = 14
MERGE_SIZE = 2
IMAGE_MIN_PIXELS = 56 * 56  # = 4 * 28^2
IMAGE_MAX_PIXELS = 28 * 28 * 6177
VIDEO_MIN_PIXELS = 299 * 28 * 28
VIDEO_MAX_PIXELS = 1196 * 28 * 28

IMAGE_TOKEN = "<|IMAGE_PLACEHOLDER|>"
IMAGE_START = "<|IMAGE_START|>"
IMAGE_END = "<|IMAGE_END|>"
VIDEO_START = "<|VIDEO_START|>"
VIDEO_END = "<|VIDEO_END|>"
VIDEO_TOKEN = "<|VIDEO_PLACEHOLDER|>"  # string of the HF-only video placeholder (id 103367): UNVERIFIED


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
  """(height, width) rounded to multiples of `factor` with min_pixels <= h*w <= max_pixels."""
  if min(height, width) <= 0:
    raise ValueError(f"image size must be positive, got {height}x{width}")
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"absolute aspect ratio must be at most 200, got {max(height, width) / min(height, width)}")
  h = round(height / factor) * factor
  w = round(width / factor) * factor
  if h * w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h = max(factor, math.floor(height / beta / factor) * factor)
    w = max(factor, math.floor(width / beta / factor) * factor)
  elif h * w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h = math.ceil(height * beta / factor) * factor
    w = math.ceil(width * beta / factor) * factor
  return h, w


def _to_pil(image):
  from PIL import Image

  if isinstance(image, Image.Image):
    return image.convert("RGB")
  a = np.asarray(image)
  if a.ndim == 2:
    a = np.repeat(a[..., None], 3, axis=-1)
  if a.ndim != 3 or a.shape[-1] not in (3, 4):
    raise ValueError(f"an image must be a PIL image or an [H, W, 3] array, got shape {a.shape}")
  if a.dtype != np.uint8:  # floats in [0, 1] or [0, 255]
    a = a.astype(np.float64)
    a = np.clip(np.round(a * 255.0 if a.max() <= 1.0 else a), 0, 255).astype(np.uint8)
  return Image.fromarray(a[..., :3], "RGB")


def _normalised(img, size: tuple[int, int]) -> np.ndarray:
  """Resize to (h, w) (PIL bicubic), rescale, CLIP-normalise -> [3, h, w] float32."""
  from PIL import Image

  h, w = size
  if img.size != (w, h):
    img = img.resize((w, h), Image.Resampling.BICUBIC)
  a = np.asarray(img, np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
  mean = np.asarray(CLIP_MEAN, np.float32)[:, None, None]
  std = np.asarray(CLIP_STD, np.float32)[:, None, None]
  return (a - mean) / std


def patchify(frames: np.ndarray, patch: int = PATCH_SIZE, merge: int = MERGE_SIZE) -> np.ndarray:
  """[T, C, H, W] -> [T * H/p * W/p, C*p*p] in merge-block order (per frame)."""
  t, c, h, w = frames.shape
  gh, gw = h // patch, w // patch
  x = frames.reshape(t, c, gh // merge, merge, patch, gw // merge, merge, patch)
  x = x.transpose(0, 2, 5, 3, 6, 1, 4, 7)  # t, bh, bw, mh, mw, c, ph, pw
  return np.ascontiguousarray(x.reshape(t * gh * gw, c * patch * patch), dtype=np.float32)


def preprocess_image(image, *, min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS,
                     patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE):
  """One image (PIL or [H, W, 3] array) -> (patches [h*w, 3*14*14] float32, grid (1, h, w))."""
  img = _to_pil(image)
  size = smart_resize(img.height, img.width, patch_size * merge_size, min_pixels, max_pixels)
  patches = patchify(_normalised(img, size)[None], patch_size, merge_size)
  return patches, (1, size[0] // patch_size, size[1] // patch_size)


def preprocess_images(images: Sequence, **kw):
  """Several images -> (pixel_values [N, 588] concatenated, grids [(1, h, w), ...])."""
  out = [preprocess_image(im, **kw) for im in images]
  return np.concatenate([p for p, _ in out]), [g for _, g in out]


def preprocess_video(frames, *, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
                     patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE):
  """Frames ([T, H, W, 3] array or list of images) -> (patches [T'*h*w, 588], grid (T', h, w)),
  T' = T rounded up to even (the last frame repeated)."""
  imgs = [_to_pil(f) for f in frames]
  if not imgs:
    raise ValueError("a video needs at least one frame")
  if len({im.size for im in imgs}) != 1:
    raise ValueError("all frames of a video must have the same size")
  if len(imgs) % 2:
    imgs.append(imgs[-1])
  size = smart_resize(imgs[0].height, imgs[0].width, patch_size * merge_size, min_pixels, max_pixels)
  stack = np.stack([_normalised(im, size) for im in imgs])
  return patchify(stack, patch_size, merge_size), (len(imgs), size[0] // patch_size, size[1] // patch_size)


# --------------------------------------------------------------------------------------------------
def expand_prompt_text(text: str, image_grids: Sequence = (), video_grids: Sequence = (), *,
                       image_token: str = IMAGE_TOKEN, video_token: str = VIDEO_TOKEN,
                       vision: VisionConfig = VisionConfig()) -> str:
  """Replace the i-th `image_token` in `text` by as many copies as image i has LM tokens (and the
  same for videos), like the reference processor. The text should already hold the start / end
  tokens around each placeholder. `vision`: the merge sizes (`tokens_per_grid`)."""
  for token, grids, video in ((image_token, image_grids, False), (video_token, video_grids, True)):
    pieces = text.split(token)
    if len(pieces) - 1 != len(grids):
      raise ValueError(f"the text has {len(pieces) - 1} {token} but {len(grids)} grids were given")
    text = pieces[0] + "".join(token * tokens_per_grid(g, video, vision) + rest
                                  for g, rest in zip(grids, pieces[1:]))
  return text


@dataclass(frozen=True)
class Video:
  """Marks a list / array of frames as a video in `build_prompt`."""

  frames: object


@dataclass
class VLPrompt:
  input_ids: list[int]
  pixel_values: np.ndarray | None
  image_grid_thw: list[tuple[int, int, int]] | None
  pixel_values_videos: np.ndarray | None
  video_grid_thw: list[tuple[int, int, int]] | None

  def model_inputs(self) -> dict:
    """Keyword arguments for `generate_vl` / `lm_vl.forward` (the ids go separately)."""
    return dict(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw,
                pixel_values_videos=self.pixel_values_videos, video_grid_thw=self.video_grid_thw)


def build_prompt(parts: Sequence, config, *, encode: Callable[[str], list[int]] | None = None,
                 picture_prefix: Callable[[int], str] | None = None, **image_kw) -> VLPrompt:
  """Token ids + pixel inputs from a list of parts: str (encoded with `encode`), a list of token
  ids, an image (PIL / [H, W, 3] array) or `Video(frames)`. `config` is the model's VLConfig (token
  ids, merge sizes). picture_prefix(i): text put before the i-th image (1-based), e.g.
  `lambda i: f"Picture {i}:"` (the released chat template's habit; UNVERIFIED).
  """
  ids: list[int] = []
  pix, grids, vpix, vgrids = [], [], [], []
  for part in parts:
    if isinstance(part, str):
      if encode is None:
        raise ValueError("a text part needs `encode` (e.g. a tokenizer's encode)")
      ids += list(encode(part))
    elif isinstance(part, Video):
      p, g = preprocess_video(part.frames)
      vpix.append(p)
      vgrids.append(g)
      ids += ([config.video_start_token_id] + [config.video_token_id] * tokens_per_grid(g, True, config.vision)
              + [config.video_end_token_id])
    elif isinstance(part, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in part):
      ids += [int(t) for t in part]
    else:
      p, g = preprocess_image(part, **image_kw)
      if picture_prefix is not None:
        if encode is None:
          raise ValueError("picture_prefix needs `encode`")
        ids += list(encode(picture_prefix(len(grids) + 1)))
      pix.append(p)
      grids.append(g)
      ids += ([config.image_start_token_id] + [config.image_token_id] * tokens_per_grid(g, False, config.vision)
              + [config.image_end_token_id])
  return VLPrompt(ids, np.concatenate(pix) if pix else None, grids or None,
                  np.concatenate(vpix) if vpix else None, vgrids or None)
