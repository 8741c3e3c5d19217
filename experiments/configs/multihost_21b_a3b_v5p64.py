"""ERNIE-4.5-21B-A3B continued pretraining on one TPU v5p-64 slice: 32 chips (a v5p-N name counts TensorCores,
2 per chip), 8 hosts of 4 chips, 95 GB HBM per chip; one process per host. It starts from the released base
model and continues with ernie45_21b_a3b.py's objective (LM + MTP + MoE losses, correction-bias update).

Every host runs the same command (JAX detects the slice); the workdir, the corpus and the base checkpoint sit on a
filesystem every host mounts at the same path (here a Cloud Storage bucket mounted with gcsfuse at /gcs; see
docs/multihost.md):

  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="cd ernie-jax && \\
    python experiments/pretrain.py --config=experiments/configs/multihost_21b_a3b_v5p64.py \\
      --config.init_from=/gcs/ckpt/ERNIE-4.5-21B-A3B-PT --config.data.tokenizer=/gcs/ckpt/ERNIE-4.5-21B-A3B-PT \\
      --config.data.paths='/gcs/corpus/*.jsonl' --config.workdir=/gcs/runs/21b_a3b_cpt"

Layout chosen by the planner (`python -m ernie_jax.plan --config=experiments/configs/multihost_21b_a3b_v5p64.py
--devices=32 --device-memory=95GB`, usable 0.9 x 95 = 85.50 GB): its first choice, fsdp=32 (parameters, gradients
and optimizer state over all 32 chips, experts included), remat save_mlp, grad_accum_steps 4 (8 rows per chip per
micro-batch). Per chip: parameters 2.74 + gradients 5.49 + optimizer 5.49 + activations 71.12 = 84.84 GB;
680.4 GB received per chip per step (fsdp gathers / reduce-scatters). Tied on communication: fsdp=16 expert=2
(84.28 GB) and fsdp=8 expert=4 remat full (81.54 GB). ernie45_21b_a3b.py's own mesh (fsdp=4 expert=8) needs
grad_accum_steps 8 (72.78 GB, 790.1 GB per step). If XLA reports more than fits: --config.model.remat=full
(78.60 GB, same communication) or --config.grad_accum_steps=8 (50.57 GB, twice the fsdp traffic).
The mesh's sizes are totals over all hosts; within one slice every axis runs over ICI.

1024 rows x 4096 tokens = 4.2M tokens per step, 20,000 steps (84B tokens); lr 3e-5 after 500 warmup steps,
cosine to 10% (starting values for continued pretraining, not tuned here).
"""

import os
import runpy


def get_config():
  base = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ernie45_21b_a3b.py"))
  c = base["get_config"]()
  c.workdir = "/tmp/ernie_jax/multihost_21b_a3b_v5p64"
  c.init_from = ""  # the base model directory (HF -PT, -Paddle or Orbax), on the shared filesystem
  c.steps = 20_000
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = 1, 32, 1, 1
  c.model.remat = "save_mlp"
  c.grad_accum_steps = 4
  c.optim.lr = 3e-5
  c.optim.warmup_steps = 500
  c.data_shards = 64  # divides the 256 rows of a micro-batch; a multiple of the 8 hosts
  return c
