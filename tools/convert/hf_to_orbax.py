"""Convert a Hugging Face ERNIE 4.5 checkpoint (e.g. baidu/ERNIE-4.5-21B-A3B-PT) into an Orbax
checkpoint that `ernie_jax.from_pretrained` and `experiments/pretrain.py --config.init_from` load
on any mesh.

  python tools/convert/hf_to_orbax.py --input ERNIE-4.5-0.3B-PT --output ckpt/0.3b
  python tools/convert/hf_to_orbax.py --input ERNIE-4.5-21B-A3B-PT --output ckpt/21b --dtype bfloat16 --verify

Tensors are read, transposed, stacked and written one block at a time (one layer / one expert /
one small parameter), so memory stays at about the largest tensor, not the model. The output is
written next to --output and renamed into place only when complete (and verified, with --verify).

ERNIE 4.5 VL checkpoints (e.g. baidu/ERNIE-4.5-VL-28B-A3B-PT; config.json model_type
ernie4_5_vl_moe) are recognised from config.json and converted with the ViT, resampler and both
expert sets; the vision tower may be stored as `model.vision_model.*` (transformers'
save_pretrained) or `vision_model.*` (the -PT release). --verify then runs both models on two
prompts with an image each.

The tokenizer files (tokenizer.model / tokenizer.json / tokenizer_config.json / special_tokens_map.json /
chat_template.jinja / added_tokens.json) and generation_config.json of --input (or of --tokenizer DIR)
are copied into the output and covered by its checksums.

Exit status: 0 done; 1 bad input, existing output or other error (the message names the tensor or
file; nothing is left behind); 3 --verify found a disagreement (nothing is left behind).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ernie_jax.cli.convert import main_to_orbax  # noqa: E402

if __name__ == "__main__":
  sys.exit(main_to_orbax("hf", __doc__))
