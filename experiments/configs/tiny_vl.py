"""Tiny ERNIE 4.5 VL MoE on the built-in drawn-shapes captions, byte-level: no download.

  python experiments/pretrain.py --config=experiments/configs/tiny_vl.py

A 2-block ViT + resampler + a 4-layer language model (layer 0 dense, layers 1-3 modality-isolated
MoE: 8 text and 8 vision experts top-2, one shared expert). Each 56 x 56 image (4 x 4 patches of
14, 4 LM tokens) shows one coloured shape in one quadrant; the caption names colour, shape and
quadrant ("red circle, top left"), so the caption loss can only fall below the text-only bound
(printed at start) by looking at the image. The VL special tokens sit after the 259 byte-level ids.
Fields not set here keep the defaults documented in ernie_jax/train/config.py.
"""

from ernie_jax.config import VisionConfig, VLConfig
from ernie_jax.train.config import default_config


def get_config():
  model = VLConfig(
    vocab_size=272,  # 259 byte-level ids + 6 VL special tokens, padded
    image_token_id=259, image_start_token_id=260, image_end_token_id=261,
    video_start_token_id=262, video_end_token_id=263, video_token_id=264,
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=512, mrope_section=(6, 6, 4),
    moe_num_experts=8, moe_k=2, moe_intermediate_size=(128, 64), moe_num_shared_experts=1,
    max_position_embeddings=4096, rope_theta=10000.0,
    # init std 0.1 (~1/sqrt(hidden)): with the default 0.02 this tiny model first settles on the
    # text-only solution (loss ~ the bound) and starts to use the images only after a few hundred steps
    initializer_range=0.1,
    vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=256, num_heads=2),
  )
  c = default_config(model)  # model_family = "vl"
  c.workdir = "/tmp/ernie_jax/tiny_vl"
  c.steps = 300
  c.global_batch_size = 16
  c.data.source = "shapes"
  c.data.tokenizer = "bytes"
  c.data.image_size = 56
  c.data.images_per_row = 2
  c.data.seq_len = 64
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.1
  c.checkpoint.every_steps = 100
  c.metrics.log_every = 10
  return c
