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
# # Preference optimisation (DPO) of ERNIE 4.5
#
# Direct preference optimisation on pairs of answers to the same prompt, one preferred (*chosen*) and one
# not (*rejected*): the policy is pushed to raise the chosen answer's log-probability relative to a frozen
# reference model more than the rejected one's. This runs the project's DPO recipe
# (`ernie_jax.train.dpo.PreferenceTuning`, what `experiments/dpo.py` runs) with
# `experiments/configs/dpo_tiny.py`: a tiny random ERNIE 4.5 on the embedded stdlib pairs, where the
# rejected answer is the chosen one with its words shuffled (a fluency preference a tiny model learns in
# minutes). The curves use TRL's metric names: reward accuracy and margin, on training and held-out pairs.
#
# For ERNIE-4.5-0.3B / 21B-A3B with LoRA (the base with its adapters off is the reference):
# `experiments/configs/dpo_ernie45_0p3b.py` with `--config.init_from=` your SFT model and your pairs.

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
# ## 1. The preference pairs
#
# Rows `{"messages": [...prompt...], "chosen": ..., "rejected": ...}` (your own: set `data.paths` to JSONL
# files of them, or of ERNIEKit's DPO rows). Both answers are rendered with the chat template; chosen and
# rejected of a pair share a row, and the loss covers the answer tokens only.

# %%
from ernie_jax.data import stdlib_qa

pairs = stdlib_qa.preference_pairs("train")
print(f"{len(pairs)} training pairs, {len(stdlib_qa.preference_pairs('heldout'))} held out; e.g.")
pair = pairs[0]
print(f"prompt:   {pair['messages'][-1]['content']!r}\nchosen:   {pair['chosen']!r}\nrejected: {pair['rejected']!r}")

# %% [markdown]
# ## 2. Train
#
# Sigmoid DPO with beta 0.1 against a frozen copy of the initial model (`dpo.reference=copy`; `precomputed`
# computes the reference log-probs once instead). At step 0 policy = reference, so every pair is a tie
# (accuracy 0.5, margin 0).

# %%
from ernie_jax.train.dpo import PreferenceTuning
from ernie_jax.train.trainer import train

workdir = rt.workdir("dpo")
steps = rt.pick(tiny=6, cpu=40, accel=100)
overrides = {
  "workdir": workdir, "compilation_cache_dir": rt.compilation_cache, "train.precision": rt.precision,
  "steps": steps, "global_batch_size": rt.batch(rt.pick(tiny=4, cpu=8, accel=16)),
  "optim.warmup_steps": rt.pick(tiny=1, cpu=10, accel=10),
  "finetune.eval_every": rt.pick(tiny=3, cpu=10, accel=10),
  "finetune.eval_batches": rt.pick(tiny=2, cpu=8, accel=0),  # (0: every held-out pair)
  "metrics.log_every": rt.pick(tiny=1, cpu=2, accel=5), "metrics.progress_bar": False,
  "checkpoint.every_steps": 0,  # (at the end only)
}
if rt.tiny:  # a smaller model and shorter rows: CI compiles and runs it in seconds
  overrides.update({"model.hidden_size": 64, "model.num_hidden_layers": 2, "model.num_attention_heads": 2,
                    "model.num_key_value_heads": 2, "model.head_dim": 32, "model.intermediate_size": 128,
                    "data.seq_len": 256})
config = nb_runtime.load_config("dpo_tiny", **overrides)
summary = train(config, PreferenceTuning())

# %% [markdown]
# ## 3. Reward accuracy and margin
#
# The implicit reward of an answer is beta x (log p_policy - log p_reference). Accuracy: the share of pairs
# whose chosen answer has the higher reward (a tie counts 1/2); margin: the mean reward difference. `eval_`
# curves are on held-out pairs (functions never trained on).

# %%
import matplotlib.pyplot as plt

records = nb_runtime.read_metrics(workdir)
fig, axes = plt.subplots(1, 3, figsize=(15, 3.5))
nb_runtime.plot_metrics(records, ["rewards/accuracies", "eval_rewards/accuracies"], ax=axes[0],
                        title="reward accuracy", hlines={"chance": 0.5})
nb_runtime.plot_metrics(records, ["rewards/margins", "eval_rewards/margins"], ax=axes[1], title="reward margin")
nb_runtime.plot_metrics(records, ["eval_rewards/chosen", "eval_rewards/rejected"], ax=axes[2],
                        title="held-out rewards: chosen vs rejected")
plt.show()
print(f"held-out reward accuracy {summary['eval_rewards/accuracies_at_start']:.2f} -> "
      f"{summary['eval_rewards/accuracies']:.2f}, margin {summary['eval_rewards/margins']:.3f}")
