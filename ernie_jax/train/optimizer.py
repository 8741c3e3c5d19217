"""AdamW with a weight-decay mask, warmup + cosine / linear / constant schedule, global-norm clipping.

Weight decay (decision, following ERNIE's PaddleFormers trainer, which decays every parameter whose
name contains neither "norm" nor "bias"): decayed are all weight matrices (attention, MLP, experts,
router, MTP projection, LM head) and, unless `decay_embeddings=False`, the token embedding; never
decayed are RMSNorm weights (any parameter under a module whose name contains "norm") and biases.
The MoE correction bias is a Buffer, not a Param, so the optimizer never sees it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 3e-4  # peak learning rate, reached at the end of warmup
  warmup_steps: int = 100  # linear warmup from 0
  schedule: str = "cosine"  # decay after warmup: cosine | linear | constant
  decay_steps: int = 0  # steps of the decay phase after warmup (0: until the last training step)
  min_lr_ratio: float = 0.1  # final learning rate = min_lr_ratio * lr
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1  # decoupled (AdamW), multiplied by the current learning rate
  decay_embeddings: bool = True  # include the token embedding (and the tied LM head) in weight decay
  clip_norm: float = 1.0  # global-norm gradient clipping; 0 disables it


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> lr over `warmup_steps`, then cosine / linear decay to min_lr_ratio * lr
  over `decay_steps` (default: the remaining steps), constant afterwards."""
  warmup = max(cfg.warmup_steps, 0)
  decay = cfg.decay_steps or max(total_steps - warmup, 1)
  end = cfg.lr * cfg.min_lr_ratio
  warm = optax.linear_schedule(0.0, cfg.lr, warmup) if warmup else optax.constant_schedule(cfg.lr)
  if cfg.schedule == "constant":
    rest = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "linear":
    rest = optax.linear_schedule(cfg.lr, end, decay)
  elif cfg.schedule == "cosine":
    rest = optax.cosine_decay_schedule(cfg.lr, decay, alpha=cfg.min_lr_ratio)
  else:
    raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
  return optax.join_schedules([warm, rest], [warmup]) if warmup else rest


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def decays(path, decay_embeddings: bool = True) -> bool:
  """Whether the parameter at `path` (a tree path of the model's parameter state) is decayed."""
  names = [_key_name(k) for k in path]
  if any("norm" in n or "bias" in n for n in names):
    return False
  if not decay_embeddings and names and names[0] == "embed":
    return False
  return True


def decay_mask(params, decay_embeddings: bool = True):
  """A tree of bools matching `params` (True = weight decay applies)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: decays(p, decay_embeddings), params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(transformation, schedule): clip_by_global_norm -> AdamW(schedule, mask)."""
  schedule = lr_schedule(cfg, total_steps)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=lambda params: decay_mask(params, cfg.decay_embeddings))
  if cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw), schedule
  return adamw, schedule


def global_norm(tree) -> jax.Array:
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
