"""Tiny ERNIE 4.5 MoE (+1 MTP layer) on the Python standard library's source code, byte-level.

Runs in a few minutes on a 2-core CPU with no download: the README's main command,
  python experiments/pretrain.py --config=experiments/configs/tiny.py
Fields not set here keep the defaults documented in ernie_jax/train/config.py.
"""

from ernie_jax.config import ModelConfig
from ernie_jax.train.config import default_config


def get_config():
  model = ModelConfig(
    vocab_size=320,  # 259 byte-level ids, padded
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=512,
    moe_num_experts=8, moe_k=2, moe_intermediate_size=128, moe_num_shared_experts=1,
    moe_layer_start_index=1,  # layer 0 dense, layers 1-3 MoE (as ERNIE 4.5 21B-A3B)
    num_mtp_layers=1, max_position_embeddings=4096, rope_theta=10000.0,
  )
  c = default_config(model)
  c.workdir = "/tmp/ernie_jax/tiny"
  c.steps = 300
  c.global_batch_size = 8
  c.data.source = "stdlib"
  c.data.tokenizer = "bytes"
  c.data.seq_len = 256
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.1
  c.checkpoint.every_steps = 100
  c.metrics.log_every = 10
  return c
