"""ERNIE-4.5-VL-28B-A3B fine-tuning on your chats with images, after ERNIEKit's VL-SFT recipe
(`examples/configs/ERNIE-4.5-VL-28B-A3B/sft/run_sft_8k.yaml`; spec §7):

  python experiments/sft.py --config=experiments/configs/sft_ernie45_vl_28b_a3b.py \
      --config.init_from=/ckpt/ERNIE-4.5-VL-28B-A3B-PT --config.data.paths='/data/vl_chats/*.jsonl'

What it mirrors: full fine-tuning (`fine_tuning: Full`) with the vision tower frozen (`freeze_config:
freeze_vision`; `vit_lr_ratio: 0.9` applies when it is unfrozen: --config.groups.freeze_vision=False), the routers
at 0.01 x the learning rate (`moe_gate_lr_ratio`), lr 1e-5 with 100 warmup steps and cosine decay to 1e-6, AdamW
b2 0.95 / eps 1e-8 / weight decay 0.1, 8000 steps, 8k-token rows with one conversation each
(`one_sample_in_one_seq`), no balance loss (`moe_aux_loss_lambda: 0`) and a fixed correction bias
(`moe_use_aux_free_update_coef: 0`), bf16 compute with fp32 master weights, full recompute. Not mirrored: ERNIEKit's
variable image resolution (here every image is resized to data.image_size = 448 px: 256 tokens, at most
data.images_per_row = 4 per row), `visual_ld` (layer-wise lr decay in the ViT) and its 4-row steps (batch 1 x
accumulation 4 on TP4 x PP2): global_batch_size must be divisible by the mesh's batch shards (8 here).
LoRA (`run_sft_lora_8k.yaml`: rank 32, lr 3e-4): --config.finetune.method=lora --config.optim.lr=3e-4 (targets:
attention, the dense MLP, shared and routed experts of both sets, the resampler; LoRA never targets the ViT). Data: OpenAI multimodal `messages` or ERNIEKit VL rows (`image_info` / `text_info`), image paths
relative to the JSONL file, rendered with the checkpoint's own chat template (data.template=auto).
"""

from ernie_jax.config import VLConfig
from ernie_jax.train.sft_config import default_sft_config


def get_config():
  c = default_sft_config(VLConfig.ernie45_vl_28b_a3b(dtype="bfloat16", param_dtype="float32", remat="full",
                                                      moe_transport="ragged_all_to_all"))
  c.workdir = "/tmp/ernie_jax/sft_ernie45_vl_28b_a3b"
  c.init_from = ""  # required: the base model directory (HF -PT, -Paddle or Orbax)
  c.steps = 8000
  c.global_batch_size = 8
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, -1, 8
  c.data.paths = ""  # your chat JSONL ("" = the embedded shapes chats, a smoke test)
  c.data.tokenizer = ""  # "" = the tokenizer (and chat template) of init_from
  c.data.seq_len = 8192
  c.data.packing = False
  c.data.image_size = 448
  c.data.images_per_row = 4
  c.finetune.method = "full"
  c.finetune.eval_every = 500
  c.groups.freeze_vision = True
  c.groups.vision_lr_ratio = 0.9
  c.groups.router_lr_ratio = 0.01
  c.lora.rank = 32
  c.lora.targets = ("attn", "mlp", "shared", "experts", "resampler")
  c.optim.lr = 1e-5
  c.optim.min_lr_ratio = 0.1
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.1
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.loss.moe_aux_coef = 0.0
  c.loss.moe_z_coef = 0.0
  c.loss.bias_update_lr = 0.0
  c.checkpoint.every_steps = 500
  c.metrics.log_every = 10
  return c
