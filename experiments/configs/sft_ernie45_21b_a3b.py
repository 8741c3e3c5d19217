"""ERNIE-4.5-21B-A3B LoRA fine-tuning on your chat JSONL (ERNIEKit's `run_sft_lora_8k.yaml`: rank 32,
lr 1e-4; spec §7), with LoRA on attention, the dense layer, the shared experts and every routed expert:

  python experiments/sft.py --config=experiments/configs/sft_ernie45_21b_a3b.py \
      --config.init_from=/ckpt/ERNIE-4.5-21B-A3B-PT --config.data.paths='/data/chats/*.jsonl'

Mesh: experts split over `expert` (8), parameters over `fsdp` (the rest); the routed experts' LoRA
A / B are sharded with their experts. The routers stay frozen (LoRA never targets them); the
aux-loss-free correction bias keeps updating (--config.loss.bias_update_lr=0 turns it off).
Full fine-tuning: --config.finetune.method=full --config.optim.lr=1e-5, and optionally
--config.groups.router_lr_ratio=0.01 or --config.groups.freeze_router=True.
"""

from ernie_jax.config import ModelConfig
from ernie_jax.train.sft_config import default_sft_config, erniekit_lora_8k


def get_config():
  c = default_sft_config(ModelConfig.ernie45_21b_a3b(dtype="bfloat16", param_dtype="float32", remat="full",
                                                      moe_transport="ragged_all_to_all"))
  c = erniekit_lora_8k(c, weight_decay=0.1)
  c.workdir = "/tmp/ernie_jax/sft_ernie45_21b_a3b"
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, -1, 8
  return c
