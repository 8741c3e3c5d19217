"""Convert a Paddle ERNIE 4.5 checkpoint (e.g. baidu/ERNIE-4.5-21B-A3B-Paddle) into an Orbax
checkpoint that `ernie_jax.from_pretrained` and `experiments/pretrain.py --config.init_from` load
on any mesh.

  python tools/convert/paddle_to_orbax.py --input ERNIE-4.5-0.3B-Paddle --output ckpt/0.3b
  python tools/convert/paddle_to_orbax.py --input ERNIE-4.5-21B-A3B-Paddle --output ckpt/21b --verify

Understood layouts (spec §5.4): the `-Paddle` release files (`ernie.` prefix, Linear weights
[in, out], fused qkv_proj [Q|K|V] and up_gate_proj [gate|up], bf16 stored as BF16 or as raw U16
bit patterns, which are bit-cast, never value-cast) and PaddleFormers' `save_to_hf=False` output
(`model.` prefix, qkv grouped per KV head). PaddleFormers' default `save_pretrained` writes the HF
layout: use hf_to_orbax.py for that (auto-detection tells them apart either way).
`.pdparams` files are pickle: refused unless --allow-pickle (and then they need paddlepaddle).

ERNIE 4.5 VL `-Paddle` checkpoints (config.json with a `vision_config`) are converted too: the
LM as above (fused qkv / up_gate also for the text, vision and shared experts), routers
`mlp.gate.weight` / `mlp.gate.weight_1` [H, E] fp32, correction bias [2, E], experts 0..E-1 text and
E..2E-1 vision, the resampler under `ernie.resampler_model.*` and the ViT under `vision_model.*` or
`ernie.vision_model.*`, all 2-D weights [in, out]. The Paddle VL config.json must state the fields
whose Paddle default differs from transformers' (rope_theta, rms_norm_eps, tie_word_embeddings,
freq_allocation, moe_k, moe_num_experts, moe_intermediate_size); a missing one is an error naming it.
The PaddleFormers save_to_hf=False layout is supported for the text models only.

--verify compares against transformers running the same weights converted by the official
Paddle -> HF rule set (ERNIE tools/paddle2torch/tran_4_5t.py, tran_4_5t_vl.py for VL), which does
not share code with the conversion tables.

The tokenizer files and generation_config.json of --input (or of --tokenizer DIR) are copied into
the output and covered by its checksums.

Exit status: 0 done; 1 bad input, existing output or other error (the message names the tensor or
file; nothing is left behind); 3 --verify found a disagreement (nothing is left behind).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ernie_jax.cli.convert import main_to_orbax  # noqa: E402

if __name__ == "__main__":
  sys.exit(main_to_orbax("paddle", __doc__))
