"""Preference optimisation (DPO, IPO, hinge, SimPO): the `PreferenceTuning` recipe of the shared training
loop (`ernie_jax.train.trainer`), used by `experiments/dpo.py`.

What it changes against SFT (`ernie_jax.train.sft.FineTuning`, whose model, LoRA, parameter groups and
LoRA-checkpoint handling it keeps):
* data: preference pairs rendered with the chat template (`ernie_jax.data.preference`), chosen and rejected
  answers of a pair in the same row;
* objective: `ernie_jax.train.dpo_task.Preference` with `dpo.*` (`ernie_jax.train.dpo_losses`);
* the reference model (`dpo.reference`, resolved by `dpo_config.resolve_reference`):
    lora_base    the base with the adapters switched off: no extra weights;
    copy         a frozen copy of the initial model in the train state (+1x the parameters on the devices);
                 checkpoints do not hold it (it is rebuilt from the base, whose fingerprint they record);
    precomputed  one forward pass over every training and held-out pair before the first step, stored in
                 `<workdir>/reference_logps.npz` (8 bytes a pair) and fed with the batches; reused on resume
                 when the base fingerprint and data settings match;
    none         SimPO;
* the base is always loaded (or rebuilt from the seed), and a checkpoint resumed against another base is
  refused, since the reference depends on it;
* evaluation: the held-out pairs' loss and TRL-named metrics (`eval_rewards/accuracies`, ...) at the start,
  every `finetune.eval_every` steps and at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.data import stdlib_qa
from ernie_jax.data.preference import (load_preference_tokenizer, make_preference_pipeline, num_train_pairs,
                                       preference_pair_batches)
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.model import lora_ops
from ernie_jax.train import dpo_losses, trainer
from ernie_jax.train.dpo_config import parse_dpo
from ernie_jax.train.dpo_task import Preference
from ernie_jax.train.sft import AddLora, FineTuning
from ernie_jax.parallel import distributed
from ernie_jax.train.step import batch_sharding, put_global_batch

REFERENCE_FILE = "reference_logps.npz"
EVAL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected")


def is_reference(path, v) -> bool:
  """A variable of the frozen reference copy in a train state."""
  return bool(path) and path[0] == "reference"


def place_reference(batch: dict[str, np.ndarray], values: np.ndarray) -> np.ndarray:
  """`ref_logps` rows for a batch of one pair per row (segments 1 and 2): values [rows, 2] (chosen, rejected)
  placed at the first token of each sequence, zeros elsewhere (the data pipeline's layout)."""
  seg = batch["segment_ids"]
  out = np.zeros(seg.shape, np.float32)
  for r in range(seg.shape[0]):
    for j in (0, 1):
      at = np.flatnonzero(seg[r] == j + 1)
      if at.size:
        out[r, at[0]] = values[r, j]
  return out


def param_bytes(model) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


class PreferenceTuning(FineTuning):
  name = "dpo"

  def __init__(self):
    super().__init__()
    self.chat_tokenizer = None
    self.reference_values: dict[str, np.ndarray] = {}
    self.reference_line = ""

  def parse(self, config):
    return parse_dpo(config)

  def tokenizer(self, cfg, workdir):
    self.chat_tokenizer = load_preference_tokenizer(cfg.data, workdir)
    self.workdir = workdir
    return self.chat_tokenizer

  def model_config(self, cfg, ckpt, latest, mesh):
    # the base is always loaded (or rebuilt from the seed): the reference and the fingerprint depend on it
    base = self.load_base(cfg, mesh)
    ref = cfg.reference
    if ref == "precomputed":
      self.reference_values = self.precompute(cfg, base, mesh)
    elif ref == "copy":
      self.reference_line = (f"reference: a frozen copy of the initial model (+{param_bytes(base) / 2**20:.1f} MiB "
                             "of parameters on the devices)")
    elif ref == "lora_base":
      self.reference_line = "reference: the base model with its LoRA adapters switched off (no extra weights)"
    else:
      self.reference_line = "reference: none (reference-free loss)"
    if cfg.finetune.method == "lora":
      return base.config, AddLora(cfg.lora, cfg.run.seed)(base)
    return base.config, base

  # -- the precomputed reference ---------------------------------------------------------------------------
  def _reference_key(self, cfg) -> dict:
    return {"fingerprint": self.base_fingerprint, "data": self.data_stream(cfg),
            "eval": {k: getattr(cfg.data, k) for k in ("eval_paths", "eval_fraction")}}

  def precompute(self, cfg, base, mesh) -> dict[str, np.ndarray]:
    """{"train": [rows, 2], "heldout": [rows, 2]} reference log-probs (chosen, rejected) of every pair, by source
    row, from `<workdir>/reference_logps.npz` when it matches this base and data, else computed now and saved."""
    path = os.path.join(self.workdir, REFERENCE_FILE)
    key = json.dumps(self._reference_key(cfg), sort_keys=True)
    if os.path.exists(path):
      with np.load(path) as f:
        if str(f["key"]) == key:
          values = {"train": f["train"], "heldout": f["heldout"]}
          self.reference_line = (f"reference: precomputed log-probs of {len(values['train'])} training pairs "
                                 f"(loaded from {path})")
          return values
    start = time.perf_counter()
    micro = self.micro_rows(cfg)
    sharding = batch_sharding(mesh)
    gdef, state = nnx.split(base)
    task = dataclasses.replace(self.task(cfg, None), pairs_per_row=1)

    @jax.jit
    def logps(state, batch):
      with lora_ops.adapters_off():
        lp, _ = task.logps(nnx.merge(gdef, state), batch)
      return jnp.concatenate([lp["chosen_logps"], lp["rejected_logps"]], axis=1)  # [rows, 2]

    values = {}
    with jax.set_mesh(mesh):
      for split in ("train", "heldout"):
        batches, indices = preference_pair_batches(cfg.data, self.chat_tokenizer, batch_size=micro, split=split)
        n = num_train_pairs(cfg.data) if split == "train" else 1 + max((int(i.max()) for i in indices), default=-1)
        out = np.zeros((max(n, 0), 2), np.float32)
        for b, idx in zip(batches, indices):
          got = distributed.host_value(logps(state, put_global_batch(b, sharding)))
          keep = idx >= 0
          out[idx[keep]] = got[keep]
        values[split] = out
    if jax.process_index() == 0:
      tmp = path + ".tmp.npz"
      np.savez(tmp, key=np.asarray(key), **values)
      os.replace(tmp, path)
    self.reference_line = (f"reference: precomputed log-probs of {len(values['train'])} training + "
                           f"{len(values['heldout'])} held-out pairs in {time.perf_counter() - start:.1f} s "
                           f"({sum(v.nbytes for v in values.values()) / 1024:.1f} KiB, {path})")
    return values

  # -- the run ---------------------------------------------------------------------------------------------
  def setup(self, cfg, tokenizer, model_cfg):
    eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else model_cfg.eos_token_id
    trainer.check_vocab(cfg.data, tokenizer, model_cfg, eos_id)
    ref = self.reference_values.get("train")
    data = trainer.shard_data(cfg, lambda i, n, rows: make_preference_pipeline(
      cfg.data, tokenizer, batch_size=rows, shard_index=i, shard_count=n, ref_logps=ref))
    info = {"tokenizer": getattr(tokenizer, "path", "") or tokenizer.kind, "finetune": cfg.finetune.method,
            "base_fingerprint": self.base_fingerprint, "reference": cfg.reference, "dpo": dataclasses.asdict(cfg.dpo)}
    what = ("LoRA " + f"rank {cfg.lora.rank}, targets {','.join(cfg.lora.targets)}"
            if cfg.finetune.method == "lora" else "full fine-tuning")
    lines = [f"data: {cfg.data.paths or 'embedded stdlib preference pairs'}, tokenizer {info['tokenizer']}, "
             f"{cfg.run.global_batch_size} rows of {cfg.data.seq_len} tokens (<= {cfg.data.pairs_per_row} pairs "
             f"each)/step; {what}; loss {cfg.dpo.loss_type}, beta {cfg.dpo.beta}", self.reference_line]
    return trainer.Setup(data, eos_id, info, lines, tokenizer)

  def task(self, cfg, model_cfg):
    return Preference(cfg.dpo, cfg.reference, cfg.data.pairs_per_row, cfg.loss)

  def reference_copy(self, cfg) -> bool:
    return cfg.reference == "copy"

  def saved(self, cfg, state):
    state = super().saved(cfg, state)
    if cfg.reference == "copy":
      _, state = nnx.split_state(state, is_reference, ...)
    return state

  def restore(self, cfg, base_state, restored):
    if cfg.reference == "copy":
      reference, _ = nnx.split_state(base_state, is_reference, ...)
      restored = nnx.merge_state(reference, restored)
    return super().restore(cfg, base_state, restored)

  def check_resume(self, cfg, meta, ckpt):
    saved = (meta.get("base") or {}).get("fingerprint")
    if saved != self.base_fingerprint:
      was = (meta.get("base") or {}).get("init_from") or "a random initialisation"
      now = cfg.run.init_from or "a random initialisation"
      raise CheckpointError(f"{ckpt.directory} was trained against another base / reference model ({was}, "
                            f"fingerprint {str(saved)[:12]}) than run.init_from ({now}, fingerprint "
                            f"{str(self.base_fingerprint)[:12]}); use that base or a new workdir")

  def evaluator(self, cfg, setup, graphdef, mesh):
    micro = self.micro_rows(cfg)
    stats = {}
    batches, indices = preference_pair_batches(cfg.data, setup.tokenizer, batch_size=micro, split="heldout",
                                               stats=stats)
    self.note_heldout(cfg, setup, stats, "pairs")
    if cfg.finetune.eval_batches:
      batches, indices = batches[:cfg.finetune.eval_batches], indices[:cfg.finetune.eval_batches]
    if not batches:
      return None
    task = dataclasses.replace(self.task(cfg, None), pairs_per_row=1)
    if task.reference == "precomputed":
      held = self.reference_values["heldout"]
      batches = [dict(b, ref_logps=place_reference(b, np.where(idx[:, None] >= 0, held[np.maximum(idx, 0)], 0.0)))
                 for b, idx in zip(batches, indices)]
    sharding = batch_sharding(mesh)

    @jax.jit
    def sums(state, batch):
      ts = nnx.merge(graphdef, state)
      norms = {"reference": nnx.split(ts.reference)} if task.reference == "copy" else {}
      policy, _ = task.logps(ts.model, batch)
      ref = task.reference_logps(ts.model, batch, norms)
      loss, metrics = dpo_losses.preference_loss(cfg.dpo, policy, ref, policy["valid"])
      return dict(metrics, loss=loss)

    placed = [put_global_batch(b, sharding) for b in batches]

    def evaluate(state) -> dict[str, float]:
      parts = jax.device_get([sums(state, b) for b in placed])
      total = {k: float(sum(np.asarray(p[k], np.float64) for p in parts)) for k in parts[0]}
      n = max(total["pairs"], 1.0)
      out = {"eval_loss": total["loss"] / n, "eval_pairs": total["pairs"]}
      out.update({f"eval_{k}": total[k] / n for k in EVAL_METRICS})
      return out

    return evaluate

  def sample_question(self, cfg) -> str:
    """The last user message of the first training prompt (of the embedded pairs by default)."""
    if cfg.data.paths:
      return ""
    prompt = stdlib_qa.preference_pairs("train")[0]["messages"]
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")
