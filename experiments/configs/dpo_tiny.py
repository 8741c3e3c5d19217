"""Tiny ERNIE 4.5 (dense, byte-level) trained by DPO on the embedded stdlib preference pairs: the chosen
answer is a function's docstring summary, the rejected one the same words shuffled (a fluency preference
a tiny model can learn in minutes; `ernie_jax.data.stdlib_qa.preference_pairs`).

Runs in a few minutes on a 2-core CPU with no download:
  python experiments/dpo.py --config=experiments/configs/dpo_tiny.py
The base is randomly initialised, so this is full fine-tuning against a frozen copy of the initial model
(--config.dpo.reference=precomputed: no copy, the reference log-probs computed once). The held-out reward
accuracy (`eval_rewards/accuracies`, functions never trained on; ties count 1/2) rises from 0.5 to ~1.0 while
the chosen answers' log-prob rises too. For a model that also answers, start from an SFT model:
--config.init_from=<an exported SFT run> (`python -m ernie_jax.cli.export --format orbax`).
"""

from ernie_jax.config import ModelConfig
from ernie_jax.train.dpo_config import default_dpo_config


def get_config():
  model = ModelConfig(
    vocab_size=320,  # 259 byte-level ids, padded
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=512, max_position_embeddings=4096, rope_theta=10000.0,
  )
  c = default_dpo_config(model)
  c.workdir = "/tmp/ernie_jax/dpo_tiny"
  c.steps = 40
  c.global_batch_size = 8
  c.data.tokenizer = "bytes"
  c.data.seq_len = 640  # (the longest embedded pair is 552 bytes)
  c.data.pairs_per_row = 2
  c.finetune.method = "full"
  c.finetune.eval_every = 10
  c.finetune.sample_tokens = 0  # a random base learns which answer reads better, not to answer
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 10
  c.optim.min_lr_ratio = 0.1
  c.checkpoint.every_steps = 20
  c.metrics.log_every = 10
  return c
