"""ERNIE-4.5-21B-A3B LoRA preference optimisation (ERNIEKit's `run_dpo_lora_8k.yaml`, spec §7: rank 32,
alpha 128, rsLoRA, LoRA+ 12, lr 5e-7, beta 0.1), LoRA on attention, the dense layer, the shared experts and every
routed expert; the reference is the base with its adapters off (no second copy of 21B parameters):

  python experiments/dpo.py --config=experiments/configs/dpo_ernie45_21b_a3b.py \
      --config.init_from=/ckpt/my-21b-sft-model --config.data.paths='/data/pairs/*.jsonl'

Mesh: experts over `expert` (8), parameters over `fsdp` (the rest). The reference pass routes
deterministically and adds no aux losses or bias updates; the policy's correction bias keeps updating
(--config.loss.bias_update_lr=0 turns it off).
"""

from ernie_jax.config import ModelConfig
from ernie_jax.train.dpo_config import default_dpo_config, erniekit_dpo_lora_8k


def get_config():
  c = default_dpo_config(ModelConfig.ernie45_21b_a3b(dtype="bfloat16", param_dtype="float32", remat="full",
                                                      moe_transport="ragged_all_to_all"))
  c = erniekit_dpo_lora_8k(c)
  c.workdir = "/tmp/ernie_jax/dpo_ernie45_21b_a3b"
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, -1, 8
  return c
