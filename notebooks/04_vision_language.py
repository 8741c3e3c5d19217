# ---
# jupyter:
#   accelerator: TPU
#   colab:
#     gpuType: V5E1
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab,kernelspec,jupytext,-all
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # ERNIE 4.5 VL: images in, text out
#
# A tiny ERNIE 4.5 vision-language model (ViT + resampler + a language model whose MoE layers keep
# separate text and vision experts) on procedurally drawn images: one coloured shape in one quadrant,
# captioned `"red circle, top left"`. First a question about an image to the untrained model, then a short
# caption training run (`experiments/configs/tiny_vl.py`, the pretraining loop with the VL objective),
# then captions of new images and how often colour, shape and position come out right.
#
# For a real checkpoint the same calls apply: `ernie_jax.from_pretrained("ERNIE-4.5-VL-28B-A3B-PT")` and
# `build_prompt([image, question], model.config, encode=tokenizer.encode)` (a TPU with enough memory).

# %%
import os
import subprocess
import sys

# The project's git repository. A placeholder until the project is published: set ERNIE_JAX_REPO.
ERNIE_JAX_REPO = os.environ.get("ERNIE_JAX_REPO", "https://github.com/ernie-jax/ernie-jax")
here = os.getcwd()
ROOT = next((d for d in (here, os.path.dirname(here)) if os.path.isdir(os.path.join(d, "experiments", "configs"))), None)
if ROOT is None:  # Colab / Kaggle: fetch the project
  ROOT = os.path.abspath("ernie-jax")
  if not os.path.isdir(ROOT):
    subprocess.run(["git", "clone", "--depth=1", ERNIE_JAX_REPO, ROOT], check=True)
sys.path.insert(0, os.path.join(ROOT, "notebooks"))
import nb_runtime

rt = nb_runtime.setup()

# %% [markdown]
# ## 1. The images
#
# `ernie_jax.data.vl.ShapeCaptions`: 6 colours x 4 shapes x 4 quadrants, drawn at random sizes and
# offsets. Colour, shape and quadrant are independent, so a model that does not look at the image cannot
# beat a fixed loss per caption token (the *text-only bound*).

# %%
import matplotlib.pyplot as plt

from ernie_jax.data.vl import ShapeCaptions

workdir = rt.workdir("tiny_vl")
overrides = {
  "workdir": workdir, "compilation_cache_dir": rt.compilation_cache, "train.precision": rt.precision,
  "steps": rt.pick(tiny=8, cpu=150, accel=300), "global_batch_size": rt.batch(rt.pick(tiny=8, cpu=16, accel=32)),
  "data.seq_len": 80,  # two examples of up to 40 tokens per row: every caption fits whole
  "optim.warmup_steps": rt.pick(tiny=2, cpu=20, accel=30),
  "metrics.log_every": rt.pick(tiny=2, cpu=10, accel=10), "metrics.progress_bar": False,
  "checkpoint.every_steps": 0,  # (at the end only)
}
if rt.tiny:  # a smaller model: CI compiles and runs it in seconds
  overrides.update({"model.hidden_size": 64, "model.num_hidden_layers": 2, "model.num_attention_heads": 2,
                    "model.num_key_value_heads": 1, "model.intermediate_size": 128, "model.moe_num_experts": 4,
                    "model.moe_intermediate_size": (32, 16), "model.vision.depth": 1,
                    "model.vision.hidden_size": 32, "model.vision.intermediate_size": 64})
config = nb_runtime.load_config("tiny_vl", **overrides)
size = config.data.image_size

held_out = ShapeCaptions(size, seed=2025)  # other images than the training stream's (seed 0)
examples = [held_out[i] for i in range(12)]
nb_runtime.show_images([img for img, _ in examples], [cap for _, cap in examples])
plt.show()

# %% [markdown]
# ## 2. Ask the untrained model
#
# `build_prompt` turns a list of parts (images, text, token ids) into token ids with one placeholder per
# vision token plus the image patches; `generate_vl` decodes with the KV cache and 3-D (time, height,
# width) positions. Untrained, the answer is noise.

# %%
from flax import nnx

from ernie_jax.data.tokenizers import get_tokenizer
from ernie_jax.data.vl_preprocess import build_prompt
from ernie_jax.infer.generate_vl import generate_vl
from ernie_jax.model.vl import Ernie45VLForConditionalGeneration
from ernie_jax.train.config import model_from_dict

tok = get_tokenizer("bytes")
vl_cfg = model_from_dict(config.model.to_dict(), "vl").replace(dtype=rt.dtype)
untrained = Ernie45VLForConditionalGeneration(vl_cfg, rngs=nnx.Rngs(0))
image, caption = examples[0]
prompt = build_prompt([image, "What is in the picture? "], vl_cfg, encode=tok.encode,
                      min_pixels=size * size, max_pixels=size * size)
out = generate_vl(untrained, [prompt.input_ids], max_new_tokens=24, stop_tokens=(tok.eos_id,),
                  **prompt.model_inputs())[0]
print(f"{len(prompt.input_ids)} prompt tokens ({prompt.image_grid_thw[0]} patch grid); truth {caption!r}")
print(f"answer: {tok.decode(out)!r}")

# %% [markdown]
# ## 3. Caption training
#
# `experiments/pretrain.py --config=experiments/configs/tiny_vl.py` in-process: each row packs two
# `<image> caption </s>` examples, the loss covers the captions only, and the MoE layers route text tokens
# to text experts and image tokens to vision experts (each with its own balance losses and correction
# bias).

# %%
from ernie_jax.train.trainer import train

summary = train(config)
records = nb_runtime.read_metrics(workdir)
bound = nb_runtime.read_run_info(workdir)["text_only_bound"]  # (printed at the start of the run)
nb_runtime.plot_metrics(records, ["lm_loss"], ylabel="nats / caption token", title="caption loss",
                        hlines={"text-only bound": bound})
plt.yscale("log")
plt.show()

# %% [markdown]
# ## 4. Captions of new images
#
# The trained checkpoint captions images it has not seen (prompt: just the image, as in training). Below
# each image: the model's caption; then how often each attribute is right, against chance.

# %%
import numpy as np

import ernie_jax

model = ernie_jax.from_pretrained(os.path.join(workdir, "checkpoints"), dtype=rt.dtype)
n = rt.pick(tiny=8, cpu=24, accel=48)
items = [held_out[i] for i in range(n)]
prompts = [build_prompt([img], model.config, min_pixels=size * size, max_pixels=size * size) for img, _ in items]
outs = generate_vl(model, [p.input_ids for p in prompts], max_new_tokens=40, stop_tokens=(tok.eos_id,),
                   pixel_values=np.concatenate([p.pixel_values for p in prompts]),
                   image_grid_thw=[g for p in prompts for g in p.image_grid_thw])
captions = [tok.decode(o).strip() for o in outs]
nb_runtime.show_images([img for img, _ in items[:12]], captions[:12])
plt.show()


def attributes(text):
  """(colour, shape, position) of a caption "red circle, top left"."""
  words = text.replace(",", " ").split()
  return (words[0] if words else "", words[1] if len(words) > 1 else "", " ".join(words[2:4]))


truth = [attributes(c) for _, c in items]
pred = [attributes(c) for c in captions]
names, chance = ("colour", "shape", "position"), (1 / 6, 1 / 4, 1 / 4)
accuracy = [np.mean([t[k] == p[k] for t, p in zip(truth, pred)]) for k in range(3)]
plt.figure(figsize=(5, 3))
plt.bar(names, accuracy, color="tab:blue", label="model")
plt.scatter(names, chance, color="red", marker="_", s=800, label="chance")
plt.ylim(0, 1.05)
plt.ylabel(f"accuracy on {n} new images")
plt.legend()
plt.show()
