r"""Pretrain an ERNIE 4.5 model (dense or MoE, optional MTP; or ERNIE 4.5 VL with
model_family="vl") from scratch or from a checkpoint.

  python experiments/pretrain.py --config=experiments/configs/tiny.py
  python experiments/pretrain.py --config=experiments/configs/tiny_vl.py
  python experiments/pretrain.py --config=experiments/configs/tiny.py --config.steps=50 \
      --config.workdir=/tmp/run2 --config.optim.lr=1e-3

Starting in a workdir that holds checkpoints resumes from the latest one (parameters, optimizer,
step, RNG and data position); a damaged latest checkpoint is moved aside (`<step>.damaged-<time>`)
and the newest intact one is used. SIGTERM or Ctrl-C (SIGINT) saves a checkpoint and exits 0; a second
Ctrl-C aborts at once (exit 130, no save; the previous checkpoint stays). The workdir is locked
(`<workdir>/.lock`) for the run's lifetime: a second run on it stops with one line naming the holder.
A start that fails before training leaves no workdir it created behind. Every field of the config is
documented in `ernie_jax/train/config.py` (and the dataclasses it lists).

The loop, top to bottom (`ernie_jax/train/trainer.py`, shared with experiments/sft.py): validate
config -> tokenizer + data checks -> mesh -> train state (restored, `init_from`, or fresh; created
directly in its sharded layout) -> for each step: batch -> jitted step -> non-finite check -> metrics
-> checkpoint.
"""

from __future__ import annotations

from ernie_jax.cli import train_main
from ernie_jax.data import DataError
from ernie_jax.data.tokenizers import TokenizerError
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.train.config import default_config
from ernie_jax.train.trainer import PRETRAINING, NonFiniteError, Preemption, train

__all__ = ["train", "NonFiniteError", "Preemption", "DataError", "TokenizerError", "CheckpointError"]

if __name__ == "__main__":
  train_main.run(PRETRAINING, __doc__, default_config, "experiments/pretrain.py", "experiments/configs/tiny.py")
