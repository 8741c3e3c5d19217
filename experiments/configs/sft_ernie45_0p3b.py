"""ERNIE-4.5-0.3B supervised fine-tuning on your chat JSONL (ERNIEKit's 0.3B SFT recipe, spec §7):

  python experiments/sft.py --config=experiments/configs/sft_ernie45_0p3b.py \
      --config.init_from=/ckpt/ERNIE-4.5-0.3B-PT --config.data.paths='/data/chats/*.jsonl'

LoRA by default (rank 32, alpha 2 x rank, lr 1e-4, weight decay 0.01: `run_sft_lora_8k.yaml`); full
fine-tuning: --config.finetune.method=full --config.optim.lr=1e-5 --config.optim.weight_decay=0.1.
The tokenizer (and its chat template) is read from the base checkpoint directory. bf16 matmuls, fp32
master weights; parameters and optimizer state sharded over all devices (fsdp=-1).
"""

from ernie_jax.config import ModelConfig
from ernie_jax.train.sft_config import default_sft_config, erniekit_lora_8k


def get_config():
  c = default_sft_config(ModelConfig.ernie45_0p3b(dtype="bfloat16", param_dtype="float32", remat="save_dots"))
  c = erniekit_lora_8k(c, weight_decay=0.01)
  c.workdir = "/tmp/ernie_jax/sft_ernie45_0p3b"
  c.mesh.data, c.mesh.fsdp = 1, -1
  return c
