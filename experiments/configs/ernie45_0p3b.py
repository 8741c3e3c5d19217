"""ERNIE-4.5-0.3B (dense, 18 layers, hidden 1024, GQA 16/2 heads x 128) pretraining on a TPU slice /
GPU node, with the real ERNIE tokenizer on your JSONL corpus:

  python experiments/pretrain.py --config=experiments/configs/ernie45_0p3b.py \
      --config.data.paths='/data/corpus/*.jsonl' --config.data.tokenizer=/ckpt/ERNIE-4.5-0.3B-PT \
      --config.workdir=gs://bucket/ernie03b

Layout: parameters, gradients and optimizer state sharded over all devices (fsdp=-1, ZeRO-3);
the batch is split over the same axis. 512 rows x 4096 tokens = 2.1M tokens per step. bf16
matmuls with fp32 master weights; dot outputs saved in the backward pass (remat save_dots).
Pre-tokenized data: --config.data.source=tokens --config.data.paths='/data/*.bin'.
"""

from ernie_jax.config import ModelConfig
from ernie_jax.train.config import default_config


def get_config():
  c = default_config(ModelConfig.ernie45_0p3b(dtype="bfloat16", param_dtype="float32", remat="save_dots"))
  c.workdir = "/tmp/ernie_jax/ernie45_0p3b"
  c.steps = 50_000
  c.global_batch_size = 512
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.data.source = "jsonl"
  c.data.paths = ""  # required: your corpus
  c.data.tokenizer = ""  # required: ERNIE's tokenizer.model (or its checkpoint directory)
  c.data.seq_len = 4096
  c.data.read_threads = 8
  c.data.worker_processes = 4  # SentencePiece tokenisation off the training thread
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 2000
  c.optim.schedule = "cosine"
  c.optim.min_lr_ratio = 0.1
  c.checkpoint.every_steps = 1000
  c.metrics.log_every = 50
  return c
