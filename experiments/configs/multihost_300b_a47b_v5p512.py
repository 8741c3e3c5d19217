"""ERNIE-4.5-300B-A47B pretraining on one TPU v5p-512 slice: 256 chips (a v5p-N name counts TensorCores, 2 per
chip) in a 4x8x8 torus, 64 hosts of 4 chips, 95 GB HBM per chip; one process per host. Model, data and
objective are ernie45_300b_a47b.py's; only the layout changes.

Every host runs the same command (JAX detects the slice); workdir and corpus on a filesystem every host mounts
at the same path (docs/multihost.md):

  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="cd ernie-jax && \\
    python experiments/pretrain.py --config=experiments/configs/multihost_300b_a47b_v5p512.py \\
      --config.data.paths='/gcs/corpus/*.jsonl' --config.data.tokenizer=/gcs/ckpt/ERNIE-4.5-300B-A47B-PT \\
      --config.workdir=/gcs/runs/300b_a47b"

Layout from the planner (`python -m ernie_jax.plan --config=experiments/configs/multihost_300b_a47b_v5p512.py
--devices=256 --device-memory=95GB`, usable 85.50 GB): the planner's best mesh, fsdp=32 x expert=8 (8 experts per
chip, ragged all-to-all), grad_accum_steps 8 (1 row per chip per micro-batch), 4205.5 GB received per chip per
step (fsdp 3032.8, expert 1150.0, data 22.8). Its remat pick on that mesh, save_dots, comes to 85.49 GB, at the
usable limit; save_mlp moves the same bytes in less memory: parameters 6.12 + gradients 12.24 + optimizer 12.24 +
activations 46.52 = 77.11 GB per chip. ernie45_300b_a47b.py's own mesh (fsdp=4 tensor=8 expert=8) fits 256 chips
only at grad_accum_steps 64 (remat full, 64.35 GB).

One slice, no DCN axis: the 256 chips of a v5p-512 are one ICI torus. As two v5p-256 slices (multislice)
mesh.dcn_data=2 does not fit (data=2 fsdp=16 expert=8: 107.69 GB per chip, the state is sharded over half the
chips), and mesh.dcn_fsdp=2 fits (77.11 GB) but sends the weight gathers and gradient reduce-scatters of every
micro-batch across the data-center network.
"""

import os
import runpy


def get_config():
  base = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ernie45_300b_a47b.py"))
  c = base["get_config"]()
  c.workdir = "/tmp/ernie_jax/multihost_300b_a47b_v5p512"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = 1, 32, 1, 8
  c.model.remat = "save_mlp"
  c.grad_accum_steps = 8
  c.data_shards = 256  # divides the 256 rows of a micro-batch; a multiple of the 64 hosts
  return c
