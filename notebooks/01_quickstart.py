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
# # ERNIE 4.5 in JAX: quickstart
#
# Load Baidu's **ERNIE-4.5-0.3B-PT** from the Hugging Face Hub, convert it to an Orbax checkpoint with
# the project's converter, and generate and chat with it, on whatever this runtime has (a Colab / Kaggle
# TPU, a GPU, or a CPU).
#
# Run all cells. The first one installs the project (on Colab / Kaggle) and reports the devices.
# Without Hub access, or with `ERNIE_JAX_NOTEBOOK_SIZE=tiny` (what CI runs), a tiny random model saved
# in the same Hugging Face format stands in for the download: everything after the download is the same.

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
# ## 1. A checkpoint in Hugging Face format
#
# `baidu/ERNIE-4.5-0.3B-PT` is ~0.7 GB (bf16 safetensors, a SentencePiece tokenizer and the chat
# template). The fallback is a random 2-layer ERNIE 4.5 with byte-level ids, written by the project's
# exporter (`ernie_jax.interop.export.export_model`) in the layout transformers reads: its answers are
# noise, but every step below runs the same code.

# %%
from flax import nnx

from ernie_jax import ErnieForCausalLM, ModelConfig
from ernie_jax.interop.export import export_model

HUB_MODEL = "baidu/ERNIE-4.5-0.3B-PT"
hf_dir, TOKENIZER = None, None  # None: the checkpoint's own tokenizer
if not rt.tiny and os.environ.get("HF_HUB_OFFLINE") != "1":
  try:
    from huggingface_hub import snapshot_download

    hf_dir = snapshot_download(HUB_MODEL)
  except Exception as e:  # no network, no access: fall back to the local model
    print(f"could not download {HUB_MODEL} ({type(e).__name__}: {e}); using a tiny random model")
if hf_dir is None:
  hf_dir = rt.workdir("tiny_random_hf")
  tiny = ModelConfig.tiny_dense(vocab_size=320, initializer_range=0.3)  # 259 byte ids, padded
  export_model(ErnieForCausalLM(tiny, rngs=nnx.Rngs(0)), hf_dir, format="hf")
  TOKENIZER = "bytes"  # UTF-8 bytes (+3 for <pad>, <s>, </s>)
print(hf_dir)
print(sorted(os.listdir(hf_dir)))

# %% [markdown]
# ## 2. Convert to Orbax
#
# The converter streams the tensors (bounded memory), checks every name and shape against the config,
# and copies the tokenizer files and `generation_config.json` next to the weights. The same from a
# shell: `python tools/convert/hf_to_orbax.py --input DIR --output OUT` (add `--verify` to compare the
# logits with transformers').

# %%
from ernie_jax.interop.convert import convert_to_orbax

orbax_dir = rt.workdir("quickstart_orbax")
report = convert_to_orbax(hf_dir, orbax_dir, log=print)
print(f"{report.tensors} tensors, {report.bytes_read / 1e6:.1f} MB read, stored as {report.storage_dtype}, "
      f"{report.seconds:.1f} s")
print(sorted(os.listdir(orbax_dir)))

# %% [markdown]
# ## 3. Load it and look at the next-token distribution
#
# `ernie_jax.from_pretrained` reads Orbax, HF and Paddle directories (here: bf16 compute on TPU / GPU,
# fp32 on CPU). The model returns logits `[batch, seq, vocab]`; below, the ten most likely next tokens
# after a prompt.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import ernie_jax
from ernie_jax.data.tokenizers import get_tokenizer

model = ernie_jax.from_pretrained(orbax_dir, dtype=rt.dtype)
tok = get_tokenizer(TOKENIZER or orbax_dir)  # the converted checkpoint carries its tokenizer
cfg = model.config
n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
print(f"{n_params / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
      f"vocab {cfg.vocab_size}, tokenizer {tok.kind}")

prompt = "The capital of France is"
ids = tok.encode(prompt)
logits = model(jnp.asarray([ids])).logits[0, -1]
probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32)))
top = np.argsort(probs)[::-1][:10]
plt.figure(figsize=(6, 3))
plt.barh(range(len(top)), probs[top][::-1])
plt.yticks(range(len(top)), [f"{tok.decode([int(i)])!r} ({i})" for i in top][::-1])
plt.title(f"next token after {prompt!r}")
plt.xlabel("probability")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Generate
#
# `ernie_jax.infer.generate.generate` decodes a batch of prompts of different lengths with a KV cache in
# one jitted program (greedy, or temperature / top-k / top-p sampling). The first call compiles; later
# calls with the same shapes reuse the program.

# %%
import time

from ernie_jax.infer.generate import generate

prompts = ["The capital of France is", "def fibonacci(n):", "Large language models"]
new_tokens = rt.pick(tiny=16, cpu=48, accel=64)
for label, kw in (("greedy", {}), ("sampled, T=0.7 top-p 0.9", dict(temperature=0.7, top_p=0.9, seed=0))):
  t0 = time.perf_counter()
  outs = generate(model, [tok.encode(p) for p in prompts], max_new_tokens=new_tokens, **kw)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  outs = generate(model, [tok.encode(p) for p in prompts], max_new_tokens=new_tokens, **kw)
  again = time.perf_counter() - t0
  print(f"--- {label}: {sum(map(len, outs))} tokens, first call {first:.1f} s (compiles), then {again:.2f} s")
  for p, o in zip(prompts, outs):
    print(f"{p!r} -> {tok.decode(o)!r}")

# %% [markdown]
# ## 5. Chat
#
# Messages are rendered with the checkpoint's own chat template (the tokenizer directory's
# `chat_template`; the built-in ERNIE 4.5 template otherwise) and the answer stops at
# `<|end_of_sentence|>`. The -PT model is a base model, so its answers are plain continuations; use an
# instruction-tuned checkpoint (or the LoRA notebook's) for real chat. From a shell:
# `python -m ernie_jax.cli.generate --checkpoint DIR --chat "..."`.

# %%
from ernie_jax.data.chat_template import answer_stop_ids, render_prompt, render_text

stops = answer_stop_ids(tok, cfg.eos_token_id)
messages = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is JAX?"}]
print(render_text(messages, tok, add_generation_prompt=True))
for follow_up in ("Name one thing it is good at.", None):
  ids = render_prompt(messages, tok).tolist()
  out = generate(model, [ids], max_new_tokens=rt.pick(tiny=24, cpu=64, accel=96), stop_tokens=stops)[0]
  answer = tok.decode([t for t in out if t not in stops]).strip()
  print(f"User: {messages[-1]['content']}\nAssistant: {answer}\n")
  if follow_up is None:
    break
  messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": follow_up}]
