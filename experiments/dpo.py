r"""Preference optimisation of ERNIE 4.5 (DPO and its variants: sigmoid with label smoothing, IPO, hinge,
SimPO; an optional SFT term), full fine-tuning or LoRA (also on the routed experts), on any mesh.

  python experiments/dpo.py --config=experiments/configs/dpo_tiny.py
  python experiments/dpo.py --config=experiments/configs/dpo_ernie45_0p3b.py \
      --config.init_from=/path/to/your-sft-model --config.data.paths=my_pairs.jsonl
  python experiments/dpo.py --config=experiments/configs/dpo_ernie45_21b_a3b.py \
      --config.init_from=/path/to/ERNIE-4.5-21B-A3B-PT --config.data.paths=my_pairs.jsonl

Data: JSONL rows {"messages": [...prompt...], "chosen": ..., "rejected": ...} or ERNIEKit's DPO form
(`ernie_jax/data/preference.py`); without `data.paths` the embedded stdlib preference pairs are used. The
reference model is the LoRA base with its adapters off, a frozen copy, or log-probs precomputed once
(`dpo.reference`). Metrics use TRL's names (rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected), on the held-out pairs with an `eval_` prefix. Resuming,
SIGTERM / Ctrl-C, the workdir lock and one-line errors work as in experiments/pretrain.py (the loop is the
same: `ernie_jax/train/trainer.py`). Every config field is documented in `ernie_jax/train/dpo_config.py` and
the dataclasses it lists.
"""

from __future__ import annotations

from ernie_jax.cli import train_main
from ernie_jax.train.dpo import PreferenceTuning
from ernie_jax.train.dpo_config import default_dpo_config
from ernie_jax.train.trainer import train

__all__ = ["train", "PreferenceTuning"]

if __name__ == "__main__":
  train_main.run(PreferenceTuning(), __doc__, default_dpo_config, "experiments/dpo.py",
                 "experiments/configs/dpo_tiny.py")
