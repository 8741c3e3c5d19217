"""Tiny ERNIE 4.5 VL MoE fine-tuned on the embedded shapes chats (no download).

  python experiments/sft.py --config=experiments/configs/sft_tiny_vl.py

The model of tiny_vl.py (a 2-block ViT + resampler + a 4-layer LM: layer 0 dense, layers 1-3 MoE with 8 text and 8
vision experts top-2, a shared expert), randomly initialised, so this is full fine-tuning from scratch. Data
(`ernie_jax.data.shapes_chat`): user turns with one or two drawn-shape images (56 x 56 px, 4 LM tokens each) and a
question about colour, shape or position ("Describe it." -> "A red circle, top left."); some multi-turn, some with
two images in one or in two turns; a held-out split of other images. The tokenizer is a small BPE trained on the
training chats at start (cached in the workdir; the VL special tokens sit after its 512 ids): with bytes the answer
starts ~25 tokens after its image and this tiny model takes far longer to learn to look back at it. The held-out
assistant loss (`eval_loss`) starts at ~6.7 nats and can only fall below the text-only bound printed at start (~0.48
nats per assistant token: what the wording gives away) by reading the images. At the end the first held-out image
question is answered by VL generation and shown with the data's answer.
Your chats: --config.data.paths=my_vl_chats.jsonl (OpenAI multimodal `messages` or ERNIEKit VL rows; image paths
relative to the file). LoRA: --config.finetune.method=lora (a random base learns little through adapters).
"""

from ernie_jax.config import VisionConfig, VLConfig
from ernie_jax.train.sft_config import default_sft_config


def get_config():
  model = VLConfig(
    vocab_size=528,  # a 512-id BPE + 6 VL special tokens, padded
    image_token_id=512, image_start_token_id=513, image_end_token_id=514,
    video_start_token_id=515, video_end_token_id=516, video_token_id=517,
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=512, mrope_section=(6, 6, 4),
    moe_num_experts=8, moe_k=2, moe_intermediate_size=(128, 64), moe_num_shared_experts=1,
    max_position_embeddings=4096, rope_theta=10000.0,
    initializer_range=0.1,  # as tiny_vl.py: with 0.02 the tiny model sits on the text-only solution for long
    vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=256, num_heads=2),
  )
  c = default_sft_config(model)  # model_family = "vl", data = VLChatDataConfig
  c.workdir = "/tmp/ernie_jax/sft_tiny_vl"
  c.steps = 300
  c.global_batch_size = 16
  c.data.tokenizer = "bpe"
  c.data.bpe_vocab_size = 512
  c.data.seq_len = 128  # the longest embedded conversation is 64 tokens: none is cut
  c.data.image_size = 56
  c.data.images_per_row = 4
  c.finetune.method = "full"
  c.finetune.eval_every = 100
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 30
  c.optim.min_lr_ratio = 0.1
  c.checkpoint.every_steps = 100
  c.metrics.log_every = 10
  return c
