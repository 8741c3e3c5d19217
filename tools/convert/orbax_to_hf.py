"""Export an ernie_jax Orbax checkpoint to Hugging Face safetensors + config.json, loadable with
`transformers.AutoModelForCausalLM.from_pretrained`.

  python tools/convert/orbax_to_hf.py --input ckpt/21b --output ERNIE-4.5-21B-A3B-mine
  python tools/convert/orbax_to_hf.py --input runs/x/checkpoints --output out --dtype bfloat16 --verify

--input is a checkpoint written by hf_to_orbax.py / paddle_to_orbax.py / `orbax_io.save_model`, or
a CheckpointManager directory holding such steps (the latest step is used). Tensors are read one
at a time (a slice of the stacked parameter, through TensorStore), transposed to torch layout and
streamed into shards; a checkpoint converted from HF and exported with --dtype auto reproduces the
original tensors bit for bit. MTP tensors are written under their HF names (transformers ignores
them on load). An ERNIE 4.5 VL Orbax checkpoint is written as a transformers
`Ernie4_5_VLMoeForConditionalGeneration` checkpoint (`model.vision_model.*`,
`model.resampler_model.*`, routers [H, E], experts 0..E-1 text / E..2E-1 vision); --verify then
compares on prompts with an image.

The tokenizer files and generation_config.json stored with the Orbax checkpoint (or those of
--tokenizer DIR) are copied next to the safetensors; a generation_config.json is written from the
config when there is none.

Exit status: 0 done; 1 bad input, existing output or other error; 3 --verify found a disagreement
(nothing is left behind).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ernie_jax.cli.convert import main_to_hf  # noqa: E402

if __name__ == "__main__":
  sys.exit(main_to_hf(__doc__))
