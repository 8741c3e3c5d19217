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
# # LoRA fine-tuning of ERNIE 4.5 (SFT)
#
# Supervised fine-tuning of **ERNIE-4.5-0.3B-PT** with LoRA adapters, on chat data: by default the
# embedded Python-stdlib Q&A set (questions about standard-library functions answered from their
# docstrings, with and without `<think>` reasoning), or your own JSONL. It runs the project's SFT recipe
# (`ernie_jax.train.sft.FineTuning` in the shared training loop, what `experiments/sft.py` runs) on a mesh
# over every device here, then compares answers before and after, and exports the merged model (HF
# safetensors) and the adapter (PEFT format).
#
# With `ERNIE_JAX_NOTEBOOK_SIZE=tiny` (CI) or without Hub access the base is a tiny random model, which
# learns little through rank-8 adapters: the cells run, the answers stay noise.

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
# ## 1. The base model and the data
#
# The base is read straight from the Hugging Face directory (`run.init_from`; HF, Paddle and Orbax
# directories all work). Your own chats: set `SFT_DATA` (or the environment variable `ERNIE_JAX_SFT_DATA`)
# to JSONL files with `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}` rows
# (or ERNIEKit's `src` / `tgt` rows); 5% of them are held out for the evaluation loss.

# %%
from flax import nnx

from ernie_jax import ErnieForCausalLM, ModelConfig
from ernie_jax.data import stdlib_qa
from ernie_jax.data.chat_template import render_text
from ernie_jax.data.tokenizers import get_tokenizer
from ernie_jax.interop.export import export_model

SFT_DATA = os.environ.get("ERNIE_JAX_SFT_DATA", "")  # "" = the embedded stdlib Q&A
HUB_MODEL = "baidu/ERNIE-4.5-0.3B-PT"
base_dir, TOKENIZER = None, ""  # "": the base checkpoint's tokenizer and chat template
if not rt.tiny and os.environ.get("HF_HUB_OFFLINE") != "1":
  try:
    from huggingface_hub import snapshot_download

    base_dir = snapshot_download(HUB_MODEL)
  except Exception as e:  # no network, no access: fall back to the local model
    print(f"could not download {HUB_MODEL} ({type(e).__name__}: {e}); using a tiny random base")
if base_dir is None:
  base_dir = rt.workdir("tiny_base_hf")
  export_model(ErnieForCausalLM(ModelConfig.tiny_dense(vocab_size=320), rngs=nnx.Rngs(0)), base_dir, format="hf")
  TOKENIZER = "bytes"
tok = get_tokenizer(TOKENIZER or base_dir)

train_rows, heldout_rows = stdlib_qa.conversations("train"), stdlib_qa.conversations("heldout")
print(f"embedded stdlib Q&A: {len(train_rows)} training and {len(heldout_rows)} held-out conversations; e.g.\n")
print(render_text(train_rows[1], tok))

# %% [markdown]
# ## 2. The run's config
#
# `experiments/configs/sft_ernie45_0p3b.py` (ERNIEKit's LoRA recipe: rank 32, lr 1e-4) for the 0.3B, or
# `sft_tiny.py` for the tiny base, with overrides for this runtime: steps, batch (a multiple of the device
# count), sequence length, bf16 on TPU / GPU. Every field: `python experiments/sft.py --help`.

# %%
from ernie_jax.train.sft import FineTuning
from ernie_jax.train.trainer import train

workdir = rt.workdir("lora_sft")
steps = rt.pick(tiny=8, cpu=10, accel=200)  # (the 0.3B on a CPU: ~20 s a step)
config = nb_runtime.load_config("sft_tiny" if TOKENIZER == "bytes" else "sft_ernie45_0p3b", **{
  "init_from": base_dir, "workdir": workdir, "compilation_cache_dir": rt.compilation_cache,
  "finetune.method": "lora", "lora.rank": rt.pick(tiny=8, cpu=16, accel=32),
  "data.paths": SFT_DATA, "data.tokenizer": TOKENIZER,
  "data.seq_len": rt.pick(tiny=256, cpu=256, accel=1024),
  "steps": steps, "global_batch_size": rt.batch(rt.pick(tiny=4, cpu=2, accel=16)),
  "optim.lr": 1e-2 if TOKENIZER == "bytes" else 2e-4,  # (a random base needs a far higher rate) "optim.warmup_steps": max(steps // 10, 1),
  "finetune.eval_every": rt.pick(tiny=0, cpu=0, accel=50),  # (0: at the start and the end only)
  "finetune.eval_batches": rt.pick(tiny=2, cpu=2, accel=16), "finetune.sample_tokens": 0,
  "metrics.log_every": rt.pick(tiny=2, cpu=1, accel=10), "metrics.progress_bar": False,
  "checkpoint.every_steps": steps, "train.precision": rt.precision,
})
print(f"LoRA rank {config.lora.rank} on {config.lora.targets}, {steps} steps of {config.global_batch_size} rows "
      f"x {config.data.seq_len} tokens")

# %% [markdown]
# ## 3. Answers before fine-tuning
#
# Held-out questions (functions never trained on), rendered with the chat template, answered greedily.

# %%
import ernie_jax
from ernie_jax.data.chat_template import answer_stop_ids, render_prompt
from ernie_jax.infer.generate import generate

questions = [row[0]["content"] for row in heldout_rows if row[0]["role"] == "user"][:3]
references = [row[-1]["content"].split("</think>")[-1].strip() for row in heldout_rows if row[0]["role"] == "user"][:3]


def answers(model, max_new_tokens=rt.pick(tiny=24, cpu=48, accel=64)):
  """Greedy answers to `questions` (the text after the think block)."""
  stops = answer_stop_ids(tok, model.config.eos_token_id)
  prompts = [render_prompt([{"role": "user", "content": q}], tok).tolist() for q in questions]
  outs = generate(model, prompts, max_new_tokens=max_new_tokens, stop_tokens=stops)
  return [tok.decode([t for t in o if t not in stops]).split("</think>")[-1].strip() for o in outs]


before = answers(ernie_jax.from_pretrained(base_dir, dtype=rt.dtype))
for q, a in zip(questions, before):
  print(f"Q: {q}\nA: {a!r}\n")

# %% [markdown]
# ## 4. Train
#
# Only the adapters train (the base is frozen and holds no optimizer state); the held-out assistant loss
# `eval_loss` is measured at the start, every `finetune.eval_every` steps and at the end. Checkpoints hold
# the adapters only and name their base by path and content fingerprint. The same run from a shell:
# `python experiments/sft.py --config=experiments/configs/sft_ernie45_0p3b.py --config.init_from=DIR`.

# %%
summary = train(config, FineTuning())

# %%
import matplotlib.pyplot as plt

records = nb_runtime.read_metrics(workdir)
fig, ax = plt.subplots(figsize=(6, 3.5))
nb_runtime.plot_metrics(records, ["loss", "eval_loss"], ax=ax, ylabel="nats / assistant token",
                        title=f"LoRA SFT: held-out loss {summary['eval_loss_at_start']:.2f} -> "
                              f"{summary['eval_loss']:.2f}")
plt.show()

# %% [markdown]
# ## 5. Answers after fine-tuning
#
# `load_trained(workdir)` rebuilds the run's model: the base from `init_from` (checked against the
# fingerprint) with the trained adapters.

# %%
from ernie_jax.train.trained import load_trained

trained = load_trained(workdir)
after = answers(trained.model)
for q, ref, b, a in zip(questions, references, before, after):
  print(f"Q: {q}\n  reference: {ref!r}\n  before:    {b!r}\n  after:     {a!r}\n")

# %% [markdown]
# ## 6. Export: merged HF weights and the PEFT adapter
#
# `hf` folds the adapters into the base weights (W + scale x A B) and writes safetensors + `config.json`
# with the tokenizer files: a plain ERNIE 4.5 checkpoint for transformers, vLLM or `from_pretrained`.
# `peft` writes `adapter_config.json` + `adapter_model.safetensors`, which `peft.PeftModel.from_pretrained`
# loads on transformers' model of the base. From a shell: `python -m ernie_jax.cli.export --workdir W
# --output OUT [--format peft]`.

# %%
import json

from ernie_jax.cli.export import export

merged_dir, adapter_dir = rt.workdir("lora_sft_merged_hf"), rt.workdir("lora_sft_adapter")
export(workdir, merged_dir, format="hf")
export(workdir, adapter_dir, format="peft")
for d in (merged_dir, adapter_dir):
  sizes = {f: f"{os.path.getsize(os.path.join(d, f)) / 1e6:.2f} MB" for f in sorted(os.listdir(d))}
  print(os.path.basename(d), sizes)
adapter = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
print({k: adapter[k] for k in ("r", "lora_alpha", "target_modules") if k in adapter})

merged = ernie_jax.from_pretrained(merged_dir, dtype=rt.dtype)
same = answers(merged) == after
print(f"the merged checkpoint answers {'exactly' if same else 'not exactly'} as the LoRA model "
      f"({'fp32' if rt.dtype == 'float32' else 'bf16 rounding can change a token'})")
