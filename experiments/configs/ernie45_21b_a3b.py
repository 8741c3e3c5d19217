"""ERNIE-4.5-21B-A3B (MoE: 28 layers, layer 0 dense, 64 experts top-6 + 2 shared, 1 MTP layer)
pretraining on a TPU pod slice (e.g. v5p-128) or 4+ GPU nodes:

  python experiments/pretrain.py --config=experiments/configs/ernie45_21b_a3b.py \
      --config.data.paths='/data/corpus/*.jsonl' --config.data.tokenizer=/ckpt/ERNIE-4.5-21B-A3B-PT

Layout: experts split over expert=8 (8 experts per device), tokens exchanged with a dropless
ragged all-to-all; everything else (and the expert weights' embed dimension) sharded over the
remaining devices (fsdp=-1). 1024 rows x 4096 tokens = 4.2M tokens per step. bf16 matmuls, fp32
master weights, full rematerialisation of each layer. Loss = LM + 0.1 MTP + MoE load-balance
(1e-2) + z (1e-4) + router orthogonality (1e-2) (PaddleFormers defaults), plus the aux-loss-free
correction-bias update (1e-3) after every step. On CPU / for tests use
--config.model.moe_transport=all_to_all.
"""

from ernie_jax.config import ModelConfig
from ernie_jax.train.config import default_config


def get_config():
  model = ModelConfig.ernie45_21b_a3b(dtype="bfloat16", param_dtype="float32", remat="full",
                                      num_mtp_layers=1, moe_transport="ragged_all_to_all")
  c = default_config(model)
  c.workdir = "/tmp/ernie_jax/ernie45_21b_a3b"
  c.steps = 100_000
  c.global_batch_size = 1024
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, -1, 8
  c.data.source = "jsonl"
  c.data.paths = ""  # required
  c.data.tokenizer = ""  # required
  c.data.seq_len = 4096
  c.data.read_threads = 8
  c.data.worker_processes = 8
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 2000
  c.optim.min_lr_ratio = 0.1
  c.loss.mtp_weight = 0.1
  c.loss.moe_aux_coef = 1e-2
  c.loss.moe_z_coef = 1e-4
  c.loss.moe_orth_coef = 1e-2
  c.loss.bias_update_lr = 1e-3
  c.checkpoint.every_steps = 500
  c.metrics.log_every = 20
  return c
