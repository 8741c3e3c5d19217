"""The model a training workdir holds, for export and generation (`ernie_jax.cli.export`).

`load_trained(workdir, step=None)` -> `Trained(model, step, kind, base, tokenizer_dir, config)`:
* a pretraining or full fine-tuning (SFT or DPO) run: the checkpoint's model (`ernie_jax.from_pretrained` reads a
  training checkpoint directly);
* a LoRA fine-tuning (SFT or DPO) run: its checkpoints hold only the adapters and buffers, so the base is loaded
  from the run's `init_from` (or rebuilt from its seed when it had none), checked against the
  fingerprint saved with the checkpoint (`CheckpointError` when the base changed), LoRA is applied
  and the saved values are restored into it. The returned model carries the LoRA adapters
  (`ernie_jax.model.lora.merge_lora` merges them; `ernie_jax.interop.peft.save_peft_adapter`
  writes them in peft's format).
`tokenizer_dir` is where the run's tokenizer files are: the tokenizer path of the run's data config
when it is a file or directory, else the workdir when it holds a trained `tokenizer.json`, else None.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.loading import from_pretrained
from ernie_jax.model.state import path_str
from ernie_jax.parallel import MeshConfig, make_mesh
from ernie_jax.train.checkpoint import Checkpointer
from ernie_jax.train.dpo_config import parse_dpo
from ernie_jax.train.sft import FineTuning, is_frozen_base
from ernie_jax.train.sft_config import parse_sft


@dataclasses.dataclass
class Trained:
  model: nnx.Module
  step: int
  kind: str  # "pretrain" | "full" | "lora"
  base: str  # the run's init_from ("" = random initialisation)
  tokenizer_dir: str | None
  config: dict[str, Any]  # the run's config (as saved with the checkpoint)
  moved_buffers: tuple[str, ...] = ()  # LoRA runs: base buffers the run changed (the MoE correction bias)


def _tokenizer_dir(workdir: str, data_cfg: dict) -> str | None:
  tok = str(data_cfg.get("tokenizer") or "")
  if tok and tok not in ("bytes", "bpe") and os.path.exists(tok):
    return tok if os.path.isdir(tok) else os.path.dirname(os.path.abspath(tok))
  if os.path.exists(os.path.join(workdir, "tokenizer.json")):
    return workdir
  return None


def load_trained(workdir: str, step: int | None = None, *, mesh=None) -> Trained:
  """The trained model of `workdir` at `step` (default: the latest checkpoint); see the module docstring."""
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise CheckpointError(f"{workdir} holds no training checkpoints (no checkpoints/ directory)")
  with Checkpointer(workdir, every_steps=0, keep=1_000_000, async_save=False) as ckpt:
    steps = ckpt.all_steps()
    if not steps:
      raise CheckpointError(f"{ckpt.directory} holds no checkpoint")
    step = max(steps) if step is None else step
    if step not in steps:
      raise CheckpointError(f"{ckpt.directory} has no step {step} (steps: {sorted(steps)})")
    meta = ckpt.read_json(step)
    config = meta.get("config") or {}
    finetune = (config.get("finetune") or {}).get("method")
    base = (meta.get("base") or {}).get("init_from") or config.get("init_from", "")
    tokenizer_dir = _tokenizer_dir(workdir, config.get("data") or {})
    if finetune != "lora":
      model = from_pretrained(os.path.join(ckpt.directory, str(step)), mesh=mesh)
      return Trained(model, step, finetune or "pretrain", base, tokenizer_dir, config)
    cfg = (parse_dpo if "dpo" in config else parse_sft)(config)  # a DPO or an SFT run
    recipe = FineTuning()
    mesh = mesh or make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    _, model = recipe.model_config(cfg, ckpt, None, mesh)  # the base with LoRA applied
    recipe.check_resume(cfg, meta, ckpt)  # the same base the adapters were trained on (fingerprint)
    _, held = nnx.split_state(nnx.State({"model": nnx.state(model)}), is_frozen_base, ...)
    base_buffers = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(held["model"])
                    if not isinstance(v, nnx.LoRAParam)}
    restored = ckpt.restore_model(step, held["model"])
    moved = tuple(sorted(path_str(p) for p, v in nnx.to_flat_state(restored)
                         if p in base_buffers and not np.array_equal(np.asarray(v.get_value()), base_buffers[p])))
    nnx.update(model, restored)
    return Trained(model, step, "lora", base, tokenizer_dir, config, moved)
