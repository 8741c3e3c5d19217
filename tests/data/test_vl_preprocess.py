"""VL image / video preprocessing against transformers' PIL image processor, the prompt builder, and
the VL config (HF nested and flat layouts, field-named errors)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ernie_jax.data import vl_preprocess as vp
from ernie_jax.config import ConfigError
from ernie_jax.config import VLConfig
from ernie_jax.model.vl.lm_vl import prepare_inputs
from ernie_jax.interop import hf_config

PIL = pytest.importorskip("PIL.Image")


def _image(h, w, seed=0):
  return PIL.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def test_images_match_reference_processor():
  from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
    Ernie4_5_VLMoeImageProcessorPil)

  proc = Ernie4_5_VLMoeImageProcessorPil()
  images = [_image(50, 70, 0), _image(100, 37, 1), _image(300, 260, 2)]
  want = proc(images=images, return_tensors="np")
  pixel_values, grids = vp.preprocess_images(images)
  np.testing.assert_array_equal(np.asarray(grids), want["image_grid_thw"])
  np.testing.assert_allclose(pixel_values, want["pixel_values"], atol=2e-6)
  # a numpy array gives the same as the PIL image
  p, g = vp.preprocess_image(np.asarray(images[1]))
  np.testing.assert_array_equal(p, pixel_values[16:32])


def test_smart_resize_bounds():
  h, w = vp.smart_resize(10, 10)
  assert (h, w) == (56, 56)
  h, w = vp.smart_resize(8000, 6000)
  assert h % 28 == 0 and w % 28 == 0 and h * w <= vp.IMAGE_MAX_PIXELS
  assert abs(h / w - 8000 / 6000) < 0.02
  with pytest.raises(ValueError, match="aspect ratio"):
    vp.smart_resize(10, 3000)


def test_patch_order_is_merge_block_order():
  """Patch j of the output is (block row, block col, row in block, col in block) of the grid."""
  frames = np.arange(1 * 3 * 56 * 84, dtype=np.float32).reshape(1, 3, 56, 84)
  patches = vp.patchify(frames)  # grid 4 x 6
  assert patches.shape == (24, 588)
  order = [(bh * 2 + mh, bw * 2 + mw) for bh in range(2) for bw in range(3) for mh in range(2) for mw in range(2)]
  for j, (r, c) in enumerate(order):
    np.testing.assert_array_equal(patches[j], frames[0, :, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14].reshape(-1))


def test_video_frames_and_prompt_builder():
  cfg = VLConfig.tiny()
  frames = np.stack([np.asarray(_image(60, 90, s)) for s in range(3)])
  p, g = vp.preprocess_video(frames, min_pixels=56 * 56, max_pixels=56 * 84)
  assert g == (4, 4, 6) and p.shape == (4 * 24, 588)  # 3 frames padded to 4
  single, _ = vp.preprocess_image(frames[1], min_pixels=56 * 56, max_pixels=56 * 84)
  np.testing.assert_array_equal(p[24:48], single)
  np.testing.assert_array_equal(p[72:], p[48:72])  # last frame repeated
  encode = lambda s: [ord(ch) % 90 + 3 for ch in s]
  prompt = vp.build_prompt(["hi", _image(50, 70), [7, 8], _image(100, 37)], cfg, encode=encode,
                           picture_prefix=lambda i: f"P{i}")
  assert prompt.image_grid_thw == [(1, 4, 4), (1, 8, 2)]
  ids = np.asarray(prompt.input_ids)
  assert (ids == cfg.image_token_id).sum() == 4 + 4
  assert list(ids[:4]) == encode("hiP1") and ids[4] == cfg.image_start_token_id
  prep = prepare_inputs(cfg, ids[None], image_grid_thw=prompt.image_grid_thw)
  assert prep["token_types"].sum() == 4 + 4 + 4  # placeholders + start/end tokens
  text = vp.expand_prompt_text(f"a{vp.IMAGE_START}{vp.IMAGE_TOKEN}{vp.IMAGE_END}b", [(1, 4, 6)])
  assert text.count(vp.IMAGE_TOKEN) == 6
  with pytest.raises(ValueError, match=re.escape(f"1 {vp.IMAGE_TOKEN} but 2 grids")):
    vp.expand_prompt_text(vp.IMAGE_TOKEN, [(1, 4, 6), (1, 4, 4)])


def test_config_from_hf_layouts_and_errors(tmp_path):
  from tests import vl_reference as ref

  cfg = hf_config.read_vl({"model_type": "ernie4_5_vl_moe", "text_config": ref.TEXT, "vision_config": ref.VISION,
                          **ref.TOKENS})
  assert cfg.mlp_layer_types == ("dense", "sparse", "sparse") and cfg.head_dim == 16
  assert cfg.vision.head_dim == 16 and cfg.video_token_id == ref.VIDEO
  # flat (original Paddle-style) layout: per-modality lists, freq_allocation, moe layer range
  flat = hf_config.read_vl({
    "model_type": "ernie4_5_moe_vl", "vocab_size": 103424, "hidden_size": 2560, "num_hidden_layers": 28,
    "num_attention_heads": 20, "num_key_value_heads": 4, "intermediate_size": 12288, "rope_theta": 500000,
    "freq_allocation": 20, "moe_num_experts": [64, 64], "moe_k": 6, "moe_intermediate_size": [1536, 512],
    "moe_num_shared_experts": 2, "moe_layer_start_index": [1, 1], "moe_layer_end_index": [29, 26],
    "im_patch_id": 100295, "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16}})
  assert flat == VLConfig.ernie45_vl_28b_a3b().replace(
    mlp_layer_types=("dense",) + ("sparse",) * 27, vision=flat.vision)
  assert flat.mrope_section == (22, 22, 20) and flat.vision.intermediate_size == 5120
  with pytest.raises(ConfigError, match="mrope_section"):
    VLConfig.tiny(mrope_section=(2, 3, 3))
  with pytest.raises(ConfigError, match="mlp_layer_types"):
    VLConfig.tiny(mlp_layer_types=("dense", "sparse"))
  with pytest.raises(ConfigError, match="video_token_id"):
    VLConfig.tiny(video_token_id=100)
  with pytest.raises(ConfigError, match="vision_config.num_heads"):
    VLConfig.tiny(vision={"depth": 1, "hidden_size": 30, "num_heads": 4})
  with pytest.raises(ConfigError, match="text_config.moe_num_experts"):
    hf_config.read_vl({"model_type": "ernie4_5_vl_moe", "text_config": {**ref.TEXT, "moe_num_experts": [4, 8]}})
