"""ERNIE-4.5-0.3B preference optimisation on your pairs JSONL (ERNIEKit's 0.3B DPO recipes, spec §7), usually
starting from your SFT model (`python -m ernie_jax.cli.export` gives a merged HF directory):

  python experiments/dpo.py --config=experiments/configs/dpo_ernie45_0p3b.py \
      --config.init_from=/ckpt/my-sft-model --config.data.paths='/data/pairs/*.jsonl'

LoRA by default (`run_dpo_lora_8k.yaml`: rank 32, alpha 128, rsLoRA, LoRA+ 12, lr 5e-7 after 50 warmup steps;
the reference is the base with its adapters off). Full fine-tuning (`run_dpo_8k.yaml`):
--config.finetune.method=full --config.finetune.lora_plus_ratio=1 (the reference is then a frozen copy;
--config.dpo.reference=precomputed keeps no second copy). Sigmoid loss, beta 0.1, normalize_logps.
"""

from ernie_jax.config import ModelConfig
from ernie_jax.train.dpo_config import default_dpo_config, erniekit_dpo_lora_8k


def get_config():
  c = default_dpo_config(ModelConfig.ernie45_0p3b(dtype="bfloat16", param_dtype="float32", remat="save_dots"))
  c = erniekit_dpo_lora_8k(c)
  c.workdir = "/tmp/ernie_jax/dpo_ernie45_0p3b"
  c.mesh.data, c.mesh.fsdp = 1, -1
  return c
