"""Golden reference for the VL tests: a tiny random transformers `Ernie4_5_VLMoeForConditionalGeneration`.

Weights are re-drawn with O(1)-activation scales (fan-in normal), norm weights get noise, biases
and the per-modality correction biases get random non-zero values, so wrong routing, RoPE axes or
patch orders cannot hide behind near-constant outputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

IMAGE, IMG_START, IMG_END, VID_START, VID_END, VIDEO = 100, 101, 102, 103, 104, 105
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_num_experts=4, moe_k=2,
            moe_intermediate_size=[32, 16], moe_num_shared_experts=1,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [3, 3, 2]})
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
              rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
TOKENS = dict(image_token_id=IMAGE, image_start_token_id=IMG_START, image_end_token_id=IMG_END,
              video_start_token_id=VID_START, video_end_token_id=VID_END, video_token_id=VIDEO)


def randomize(model: torch.nn.Module, seed: int) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=g)
      if name.endswith("e_score_correction_bias"):
        p.copy_(r * 0.05)
      elif p.ndim == 1 and name.endswith("bias"):
        p.copy_(r * 0.1)
      elif p.ndim == 1:  # norm weights
        p.copy_(1.0 + 0.2 * r)
      elif "embed_tokens" in name:
        p.copy_(r)
      elif name.endswith("gate.weight"):  # routers [E, H]: sharp enough to prefer some experts
        p.copy_(r * 2.0 / math.sqrt(p.shape[-1]))
      else:
        p.copy_(r / math.sqrt(p.shape[-1]))


def build(seed: int = 0, text=None, vision=None, tie_word_embeddings: bool = True):
  import transformers

  cfg = transformers.Ernie4_5_VLMoeConfig(
    text_config={**TEXT, "tie_word_embeddings": tie_word_embeddings, **(text or {})},
    vision_config={**VISION, **(vision or {})}, tie_word_embeddings=tie_word_embeddings, **TOKENS)
  model = transformers.Ernie4_5_VLMoeForConditionalGeneration(cfg)
  randomize(model, seed)
  if not tie_word_embeddings:
    assert not torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)
  return model.float().eval()


def image_tokens(grid) -> int:
  t, h, w = grid
  return t * (h // 2) * (w // 2)


def video_tokens(grid) -> int:
  t, h, w = grid
  return (t // 2) * (h // 2) * (w // 2)


def image_span(grid) -> list[int]:
  return [IMG_START] + [IMAGE] * image_tokens(grid) + [IMG_END]


def video_span(grid) -> list[int]:
  return [VID_START] + [VIDEO] * video_tokens(grid) + [VID_END]


def pixels(grids, seed: int) -> np.ndarray:
  n = sum(t * h * w for t, h, w in grids)
  return np.random.RandomState(seed).randn(n, 3 * 14 * 14).astype(np.float32)


def mm_types(ids: np.ndarray) -> np.ndarray:
  return np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))


def moe_types(ids: np.ndarray) -> np.ndarray:
  t = mm_types(ids)
  t = np.where(np.isin(ids, [IMG_START, IMG_END]), 1, t)
  return np.where(np.isin(ids, [VID_START, VID_END]), 2, t)


def forward(model, ids, *, pixel_values=None, image_grid=None, videos=None, video_grid=None,
            attention_mask=None) -> np.ndarray:
  t = lambda a, dt=torch.long: None if a is None else torch.as_tensor(np.asarray(a), dtype=dt)
  with torch.no_grad():
    out = model(input_ids=t(ids), attention_mask=t(attention_mask), mm_token_type_ids=t(mm_types(ids)),
                moe_mm_token_type_ids=t(moe_types(ids)),
                pixel_values=t(pixel_values, torch.float32), image_grid_thw=t(image_grid),
                pixel_values_videos=t(videos, torch.float32), video_grid_thw=t(video_grid))
  return out.logits.float().numpy()
