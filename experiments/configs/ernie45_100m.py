"""A ~100M-parameter dense ERNIE 4.5 (14 layers, hidden 768, GQA 12/4 heads x 64) on the Python
standard library with a byte-level BPE of 8192 ids trained once on it (cached in the workdir).
A single-GPU / small-CPU experiment and the "~100M" point of benchmarks/train_throughput.py:

  python experiments/pretrain.py --config=experiments/configs/ernie45_100m.py

Memory: 32 rows x 1024 tokens in one micro-batch without rematerialisation need ~65 GiB (XLA's
estimate, printed before the first step); 4 micro-batches of 8 rows with `remat="full"` need ~3.5 GiB.
"""

from ernie_jax.config import ModelConfig
from ernie_jax.train.config import default_config


def get_config():
  model = ModelConfig(vocab_size=8192, hidden_size=768, num_hidden_layers=14, num_attention_heads=12,
                      num_key_value_heads=4, head_dim=64, intermediate_size=2048,
                      max_position_embeddings=8192, rope_theta=10000.0, remat="full")
  c = default_config(model)
  c.workdir = "/tmp/ernie_jax/ernie45_100m"
  c.steps = 5000
  c.global_batch_size = 32
  c.grad_accum_steps = 4  # micro-batches of 8 rows (see Memory above)
  c.data.source = "stdlib"
  c.data.tokenizer = "bpe"
  c.data.bpe_vocab_size = 8192
  c.data.seq_len = 1024
  c.optim.lr = 6e-4
  c.optim.warmup_steps = 200
  c.checkpoint.every_steps = 500
  c.metrics.log_every = 10
  return c
