"""ERNIE-4.5-21B-A3B LoRA fine-tuning on your chat JSONL (ERNIEKit's `run_sft_lora_8k.yaml`: rank 32,
lr 1e-4; spec §7), with LoRA on attention, the dense layer, the shared experts and every routed expert:

  python experiments/sft.py --config=experiments/configs/sft_ernie45_21b_a3b.py \
      --config.init_from=/ckpt/ERNIE-4.5-21B-A3B-PT --config.data.paths='/data/chats/*.jsonl'

Mesh: experts split over `expert` (8), parameters over `fsdp` (the rest); the routed experts' LoRA
A / B are sharded with their experts. The routers stay frozen (LoRA never targets them); the
aux-loss-free correction bias keeps updating (--config.loss.bias_update_lr=0 turns it off).
Full fine-tuning: --config.finetune.method=full --config.optim.lr=1e-5, and optionally
--config.finetune.router_lr_ratio=0.01 or --config.finetune.freeze_router=True.
"""

from ernie_jax.config import ModelConfig
from ernie_jax.train.sft_config import default_sft_config


def get_config():
  c = default_sft_config(ModelConfig.ernie45_21b_a3b(dtype="bfloat16", param_dtype="float32", remat="full",
                                                      moe_transport="ragged_all_to_all"))
  c.workdir = "/tmp/ernie_jax/sft_ernie45_21b_a3b"
  c.init_from = ""  # required: the base model directory (HF -PT, -Paddle or Orbax)
  c.steps = 2000
  c.global_batch_size = 64
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, -1, 8
  c.data.paths = ""
  c.data.tokenizer = ""
  c.data.seq_len = 8192
  c.finetune.method = "lora"
  c.lora.rank = 32
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.1
  c.optim.warmup_steps = 20
  c.optim.min_lr_ratio = 0.01
  c.finetune.eval_every = 200
  c.checkpoint.every_steps = 200
  c.metrics.log_every = 10
  return c
