"""ERNIE-4.5-300B-A47B (MoE: 54 layers, layers 0-2 dense, 64 experts top-8, no shared experts, untied
head, 1 MTP layer) pretraining on a large TPU pod (e.g. v5p-1024) or 32+ GPU nodes (8 GPUs each):

  python experiments/pretrain.py --config=experiments/configs/ernie45_300b_a47b.py \
      --config.data.paths='/data/corpus/*.jsonl' --config.data.tokenizer=/ckpt/ERNIE-4.5-300B-A47B-PT

Layout: tensor=8 (the 64 query / 8 kv heads and the MLP columns split within a GPU node or a TPU
torus dimension), expert=8 (8 experts per device group, ragged all-to-all), fsdp over the rest
(parameters and optimizer state ZeRO-3 sharded). With multiple slices set mesh.dcn_fsdp to the
number of slices. 2048 rows x 4096 tokens = 8.4M tokens per step. bf16 matmuls with fp32 master
weights and full rematerialisation; set --config.train.precision=fp8 on H100 / v6e-class
hardware for FP8 matmuls.
"""

from ernie_jax.config import ModelConfig
from ernie_jax.train.config import default_config


def get_config():
  model = ModelConfig.ernie45_300b_a47b(dtype="bfloat16", param_dtype="float32", remat="full",
                                        num_mtp_layers=1, moe_transport="ragged_all_to_all")
  c = default_config(model)
  c.workdir = "/tmp/ernie_jax/ernie45_300b_a47b"
  c.steps = 150_000
  c.global_batch_size = 2048
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = 1, -1, 8, 8
  c.data.source = "jsonl"
  c.data.paths = ""  # required
  c.data.tokenizer = ""  # required
  c.data.seq_len = 4096
  c.data.read_threads = 16
  c.data.worker_processes = 16
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 4000
  c.optim.min_lr_ratio = 0.1
  c.loss.mtp_weight = 0.1
  c.loss.moe_aux_coef = 1e-2
  c.loss.moe_z_coef = 1e-4
  c.loss.moe_orth_coef = 1e-2
  c.loss.bias_update_lr = 1e-3
  c.checkpoint.every_steps = 250
  c.checkpoint.keep = 2
  c.metrics.log_every = 10
  return c
