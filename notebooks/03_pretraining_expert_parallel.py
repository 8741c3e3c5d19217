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
# # Pretraining an ERNIE 4.5 MoE with expert parallelism
#
# A tiny ERNIE 4.5 mixture-of-experts model (layer 0 dense, then MoE layers with 8 routed experts top-2
# and a shared expert, as in ERNIE-4.5-21B-A3B) trained from scratch on the Python standard library's
# source, byte-level, on a **data x expert** device mesh built from the devices found here. The experts are
# split over the `expert` axis and tokens travel to their experts with all-to-all inside one `shard_map`.
# Then: the loss, the per-layer expert load over time, a checkpoint and a resumed run.
#
# A Kaggle TPU v5e-8 gives a 2 x 4 mesh; a single Colab TPU chip a 1 x 1 mesh (the same code, no
# exchange); without an accelerator the CPU is split into 4 devices (2 x 2).

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

rt = nb_runtime.setup(fake_cpu_devices=4)  # no accelerator: 4 CPU devices (before jax starts)

# %% [markdown]
# ## 1. The mesh
#
# The `expert` axis takes as many devices as divide the number of experts (at most half the devices when
# there are 4 or more, so both axes show); the rest is data parallelism. Each device holds
# `experts / expert` experts; the batch is split over both axes.

# %%
import math

import matplotlib.pyplot as plt
import numpy as np

from ernie_jax.parallel import MeshConfig, make_mesh

EXPERTS = 8
expert = math.gcd(rt.devices, EXPERTS)
if expert == rt.devices and rt.devices >= 4:
  expert //= 2
data = rt.devices // expert
mesh = make_mesh(MeshConfig(data=data, expert=expert))
print(f"mesh {dict(mesh.shape)}: {EXPERTS // expert} experts per device")

grid = np.vectorize(lambda d: d.id)(mesh.devices).reshape(data, expert)
fig, ax = plt.subplots(figsize=(1.2 * expert + 1.5, 1.0 * data + 0.8))
ax.imshow(np.arange(grid.size).reshape(grid.shape) % 2, cmap="Pastel1", aspect="auto")
for (i, j), d in np.ndenumerate(grid):
  first = j * EXPERTS // expert
  ax.text(j, i, f"device {d}\nexperts {first}-{first + EXPERTS // expert - 1}", ha="center", va="center", fontsize=8)
ax.set_xticks(range(expert), [f"expert {j}" for j in range(expert)])
ax.set_yticks(range(data), [f"data {i}" for i in range(data)])
ax.set_title("device mesh (rows: data replicas, columns: expert shards)", fontsize=9)
plt.show()

# %% [markdown]
# ## 2. The run's config
#
# `experiments/configs/tiny.py` with overrides for this runtime: the mesh, the expert transport
# (`all_to_all`: capacity-padded, any backend; `ragged_all_to_all`: dropless, TPU / GPU; `none` on one
# device), batch, steps, bf16 on TPU / GPU. In tiny mode (CI) the model is shrunk further. A constant
# learning rate after the warmup keeps the two training sessions below on the same schedule.

# %%
workdir = rt.workdir("pretrain_ep")
first_steps = rt.pick(tiny=6, cpu=60, accel=150)
total_steps = rt.pick(tiny=10, cpu=120, accel=300)
overrides = {
  "workdir": workdir, "compilation_cache_dir": rt.compilation_cache, "steps": first_steps,
  "mesh.data": data, "mesh.expert": expert, "model.moe_num_experts": EXPERTS,
  "model.moe_transport": "none" if expert == 1 else "all_to_all" if rt.backend == "cpu" else "ragged_all_to_all",
  "global_batch_size": rt.batch(rt.pick(tiny=8, cpu=8, accel=32)), "train.precision": rt.precision,
  "optim.schedule": "constant", "optim.warmup_steps": rt.pick(tiny=2, cpu=10, accel=20),
  "metrics.log_every": rt.pick(tiny=1, cpu=5, accel=10), "metrics.progress_bar": False,
  "checkpoint.every_steps": rt.pick(tiny=0, cpu=30, accel=50),  # (and always at the last step; 0: only then)
}
if rt.tiny:  # a smaller model and shorter rows: CI compiles and runs it in seconds
  overrides.update({"model.hidden_size": 64, "model.num_hidden_layers": 3, "model.num_attention_heads": 2,
                    "model.num_key_value_heads": 1, "model.head_dim": 32, "model.intermediate_size": 128,
                    "model.moe_intermediate_size": 32, "model.num_mtp_layers": 0, "data.seq_len": 64})
config = nb_runtime.load_config("tiny", **overrides)
m = config.model
print(f"{m.num_hidden_layers} layers (MoE from layer {m.moe_layer_start_index}), {m.moe_num_experts} experts "
      f"top-{m.moe_k} + {m.moe_num_shared_experts} shared, {config.global_batch_size} x {config.data.seq_len} tokens "
      f"per step, transport {m.moe_transport}")

# %% [markdown]
# ## 3. Train (session 1)
#
# The project's training loop (`ernie_jax.train.trainer.train`, what `experiments/pretrain.py` runs):
# the jitted step holds the forward pass with the expert exchange, ERNIE's load-balance and router z
# losses, AdamW and the aux-loss-free correction-bias update; metrics go to `metrics.jsonl` and
# TensorBoard in the workdir, checkpoints (Orbax, async) to `workdir/checkpoints`.

# %%
from ernie_jax.train.trainer import train

summary = train(config)

# %% [markdown]
# ## 4. Resume (session 2)
#
# A new session on the same workdir (a Colab disconnect, a preempted VM, or simply: train longer): `train`
# finds the latest checkpoint and restores parameters, optimizer state, step, RNG key and the data
# position, then continues to the new `steps`. (The note it prints says the schedule now spans the new
# number of steps; with a constant learning rate nothing changes.) A checkpoint also loads onto another
# mesh. From a shell: run `python experiments/pretrain.py --config=... --config.workdir=W` again.

# %%
config.steps = total_steps
summary = train(config)
print(f"resumed from step {summary['resumed_from']}, now at step {summary['step']}")

# %% [markdown]
# ## 5. Loss and expert load
#
# Left: the loss (LM + MoE auxiliary losses) and the byte-level LM loss against the unigram entropy of
# the data (what a model that ignores context reaches). Right: how unequal the expert load is
# (max / mean tokens per expert, averaged over layers: 1 = balanced). Below: for each MoE layer, the share
# of the routed tokens each expert received at each logged step. All of it comes from the run's
# `metrics.jsonl` (one record per logged step; the per-layer `expert_usage` arrays are only there, the
# scalars also in TensorBoard: `%load_ext tensorboard` then `%tensorboard --logdir <workdir>/tensorboard`).

# %%
records = nb_runtime.read_metrics(workdir)
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
nb_runtime.plot_metrics(records, ["loss", "lm_loss"], ax=a, ylabel="nats / token", title="training loss",
                        hlines={"unigram entropy": summary["unigram_entropy"]})
a.axvline(first_steps, color="red", ls=":", lw=1)
a.annotate(" resumed", (first_steps, a.get_ylim()[1]), color="red", fontsize=8, va="top")
nb_runtime.plot_metrics(records, ["moe_usage_max_over_mean", "moe_usage_min_over_mean"], ax=b,
                        title="expert load balance", hlines={"balanced": 1.0})
plt.show()
nb_runtime.plot_expert_load(records, title="expert load per MoE layer (share of routed tokens)")
plt.show()

# %% [markdown]
# ## 6. Where the experts live
#
# The trained checkpoint loaded straight onto the mesh: each routed-expert weight `[experts, ...]` is split
# over the `expert` axis (and replicated over `data`), so every device holds only its experts' rows.

# %%
from flax import nnx

import ernie_jax
from ernie_jax.model.state import flat_state

sharded = ernie_jax.from_pretrained(os.path.join(workdir, "checkpoints"), mesh=mesh, moe_transport=m.moe_transport)
path, w = next((p, v.get_value()) for p, v in flat_state(nnx.state(sharded)).items()
               if "experts" in p and "shared" not in p)
print(f"{path}: global shape {w.shape} (layers, experts, ...), partition spec {w.sharding.spec}")
for shard in sorted(w.addressable_shards, key=lambda s: s.device.id):
  first, stop, _ = shard.index[1].indices(w.shape[1])  # (axis 0 stacks the scanned layers, axis 1: experts)
  print(f"  device {shard.device.id}: experts {first}-{stop - 1}, shard shape {shard.data.shape}")

# %% [markdown]
# ## 7. What it learned
#
# Greedy continuations of a few code prompts (byte-level) from the final checkpoint, on one device.

# %%
from ernie_jax.data.tokenizers import get_tokenizer
from ernie_jax.infer.generate import generate

tok = get_tokenizer("bytes")
model = ernie_jax.from_pretrained(os.path.join(workdir, "checkpoints"), dtype=rt.dtype)
prompts = ["def ", "import ", "    return "]
outs = generate(model, [tok.encode(p) for p in prompts], max_new_tokens=rt.pick(tiny=16, cpu=48, accel=64))
for p, o in zip(prompts, outs):
  print(repr(p + tok.decode(o)))
