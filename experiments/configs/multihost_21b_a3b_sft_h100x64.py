"""ERNIE-4.5-21B-A3B full-parameter SFT on 8 nodes x 8 H100 80 GB (64 GPUs) under SLURM, one process per node
(docs/multihost.md has the sbatch script and the one-process-per-GPU variant). sft_ernie45_21b_a3b.py's recipe
(ERNIEKit 8k rows, 64 rows per step, its schedule and evaluation) with finetune.method=full at lr 1e-5 (the
full fine-tuning setting in experiments/README.md); LoRA on 21B fits 16 such GPUs, 64 are for full SFT.

  srun python experiments/sft.py --config=experiments/configs/multihost_21b_a3b_sft_h100x64.py \\
      --config.init_from=/shared/ckpt/ERNIE-4.5-21B-A3B-PT --config.data.paths='/shared/chats/*.jsonl' \\
      --config.workdir=/shared/runs/sft_21b_a3b

Layout from the planner (`python -m ernie_jax.plan --config=experiments/configs/multihost_21b_a3b_sft_h100x64.py
--devices=64 --device-memory=80GB`, usable 72.00 GB): fsdp=8 x expert=8, remat save_dots, grad_accum_steps 1
(1 row of 8192 tokens per GPU). Per GPU: parameters 2.00 + gradients 2.00 + optimizer 3.99 + activations 32.44
= 40.42 GB; 64.9 GB received per GPU per step (fsdp 27.9, expert 35.7, data 1.3). This is the planner's third
candidate: its first, fsdp=4 x expert=16 (52.78 GB, 57.2 GB per step), moves fewer bytes but splits the experts
over two nodes, so the expert exchanges cross InfiniBand; the planner counts bytes, not links. expert is the last
(fastest-varying) mesh axis and jax.make_mesh orders GPUs by device id, so expert=8 stays within one node
(NVLink) and fsdp spans the nodes.

JAX preallocates 75% of each GPU by default (60 GB here); the sbatch script in docs/multihost.md sets
XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 so the planned 72 GB is available.
"""

import os
import runpy


def get_config():
  base = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft_ernie45_21b_a3b.py"))
  c = base["get_config"]()
  c.workdir = "/tmp/ernie_jax/multihost_21b_a3b_sft_h100x64"
  c.finetune.method = "full"
  c.optim.lr = 1e-5
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = 1, 8, 1, 8
  c.model.remat = "save_dots"
  c.grad_accum_steps = 1
  c.data_shards = 64  # divides the 64 rows of a step; a multiple of 8 processes (one per node) and of 64 (one per GPU)
  return c
