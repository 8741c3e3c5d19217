r"""Supervised fine-tuning of ERNIE 4.5 on chat data: full fine-tuning or LoRA (also on the routed
experts), with the ERNIE 4.5 chat template, thinking / non-thinking data and the loss on assistant
tokens only.

  python experiments/sft.py --config=experiments/configs/sft_tiny.py
  python experiments/sft.py --config=experiments/configs/sft_ernie45_0p3b.py \
      --config.init_from=/path/to/ERNIE-4.5-0.3B-PT --config.data.paths=my_chats.jsonl
  python experiments/sft.py --config=experiments/configs/sft_ernie45_21b_a3b.py \
      --config.init_from=/path/to/ERNIE-4.5-21B-A3B-PT --config.data.paths=my_chats.jsonl --config.lora.rank=32
  python experiments/sft.py --config=experiments/configs/sft_tiny_vl.py           # ERNIE 4.5 VL, chats with images
  python experiments/sft.py --config=experiments/configs/sft_ernie45_vl_28b_a3b.py \
      --config.init_from=/path/to/ERNIE-4.5-VL-28B-A3B-PT --config.data.paths=my_vl_chats.jsonl

Data: JSONL rows in the OpenAI `messages` form or ERNIEKit's SFT form (`ernie_jax/data/sft.py`);
without `data.paths` the embedded stdlib Q&A set is used. VL configs (model_family="vl"): multimodal `messages` or
ERNIEKit VL rows with images (`ernie_jax/data/vl_chat.py`), the embedded shapes chats by default. The held-out assistant loss (`eval_loss`) is
measured at the start, every `finetune.eval_every` steps and at the end; a sample answer is printed
at the end. Resuming, SIGTERM / Ctrl-C, the workdir lock and one-line errors work as in
experiments/pretrain.py (the loop is the same: `ernie_jax/train/trainer.py`). LoRA checkpoints hold
only the adapters and optimizer state and refer to their base by path and content fingerprint.
Export: `python -m ernie_jax.cli.export --help`. Every config field is documented in
`ernie_jax/train/sft_config.py` and the dataclasses it lists.
"""

from __future__ import annotations

from ernie_jax.cli import train_main
from ernie_jax.train.sft import FineTuning
from ernie_jax.train.sft_config import default_sft_config
from ernie_jax.train.trainer import train

__all__ = ["train", "FineTuning"]

if __name__ == "__main__":
  train_main.run(FineTuning(), __doc__, default_sft_config, "experiments/sft.py", "experiments/configs/sft_tiny.py")
