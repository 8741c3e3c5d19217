"""ERNIE-4.5-0.3B supervised fine-tuning on your chat JSONL (ERNIEKit's 0.3B SFT recipe, spec §7):

  python experiments/sft.py --config=experiments/configs/sft_ernie45_0p3b.py \
      --config.init_from=/ckpt/ERNIE-4.5-0.3B-PT --config.data.paths='/data/chats/*.jsonl'

LoRA by default (rank 32, alpha 2 x rank, lr 1e-4, weight decay 0.01: `run_sft_lora_8k.yaml`); full
fine-tuning: --config.finetune.method=full --config.optim.lr=1e-5 --config.optim.weight_decay=0.1.
The tokenizer (and its chat template) is read from the base checkpoint directory. bf16 matmuls, fp32
master weights; parameters and optimizer state sharded over all devices (fsdp=-1).
"""

from ernie_jax.config import ModelConfig
from ernie_jax.train.sft_config import default_sft_config


def get_config():
  c = default_sft_config(ModelConfig.ernie45_0p3b(dtype="bfloat16", param_dtype="float32", remat="save_dots"))
  c.workdir = "/tmp/ernie_jax/sft_ernie45_0p3b"
  c.init_from = ""  # required: the base model directory (HF -PT, -Paddle or Orbax)
  c.steps = 2000
  c.global_batch_size = 64
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.data.paths = ""  # your chat JSONL ("" = the embedded stdlib Q&A)
  c.data.tokenizer = ""  # "" = the tokenizer of init_from
  c.data.seq_len = 8192
  c.finetune.method = "lora"
  c.lora.rank = 32
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.01
  c.optim.warmup_steps = 20
  c.optim.min_lr_ratio = 0.01
  c.finetune.eval_every = 200
  c.checkpoint.every_steps = 200
  c.metrics.log_every = 10
  return c
