"""Tiny ERNIE 4.5 (dense, byte-level) fine-tuned on the embedded stdlib Q&A chats: questions about
Python standard-library functions answered from their docstrings, thinking and non-thinking.

Runs in a few minutes on a 2-core CPU with no download:
  python experiments/sft.py --config=experiments/configs/sft_tiny.py
The base is randomly initialised (no download), so this is full fine-tuning; the held-out assistant
loss (`eval_loss`, other functions than the training ones) falls from ~5.6 nats (uniform over 259
bytes) as the model learns the chat format, English and the docstrings' phrasing. LoRA on the same
model: --config.finetune.method=lora (a random base learns little through rank-8 adapters; use LoRA
with a pretrained base via --config.init_from).
"""

from ernie_jax.config import ModelConfig
from ernie_jax.train.sft_config import default_sft_config


def get_config():
  model = ModelConfig(
    vocab_size=320,  # 259 byte-level ids, padded
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=512, max_position_embeddings=4096, rope_theta=10000.0,
  )
  c = default_sft_config(model)
  c.workdir = "/tmp/ernie_jax/sft_tiny"
  c.steps = 300
  c.global_batch_size = 8
  c.data.tokenizer = "bytes"
  c.data.seq_len = 256
  c.finetune.method = "full"
  c.finetune.eval_every = 100
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 30
  c.optim.min_lr_ratio = 0.1
  c.checkpoint.every_steps = 100
  c.metrics.log_every = 10
  return c
