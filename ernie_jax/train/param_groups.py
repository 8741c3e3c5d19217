"""Which parameters fine-tuning trains, and with which learning rate (ERNIEKit's knobs, through optax).

`GroupsConfig` is the `groups` section of both training configs (pretraining / continued training of
a checkpoint, e.g. ERNIE 4.5 VL on image-caption data, and SFT):
  freeze_router     the MoE routers' kernels do not train (ERNIEKit freezes the gate in some recipes)
  router_lr_ratio   the routers' learning rate = ratio x lr (ERNIEKit `moe_gate_lr_ratio`, VL: 0.01)
  freeze_vision     VL: the vision tower (`vision_model`) does not train (ERNIEKit `freeze_vision`)
  vision_lr_ratio   VL: the vision tower's learning rate = ratio x lr (ERNIEKit `vit_lr_ratio`, 0.9)
`FinetuneConfig` is the `finetune` section of the SFT config (`ernie_jax.train.sft_config`):
  method            "full": every Param trains (minus the frozen groups);
                    "lora": only the LoRA adapters (`nnx.LoRAParam`) train, minus those inside frozen
                    groups; the base is frozen and holds no optimizer state (`ernie_jax.model.lora`)
  lora_plus_ratio   LoRA+: the learning rate of the B matrices = ratio x lr (ERNIEKit `lora_plus_scale`;
                    1 = plain LoRA)
  (and the evaluation / sample settings of SFT)
The MoE correction bias (aux-loss-free balancing) is a Buffer, updated by the task after each step
when `loss.bias_update_lr` > 0 (set it to 0 to turn the update off).

Frozen groups are excluded from the trained filter (`trained_filter`), so they get no gradient and no
optimizer state. Learning-rate ratios are parameter groups of `optax.multi_transform`: one AdamW per
group with the schedule scaled by its ratio (weight decay scales with it, as AdamW's decay is
multiplied by the learning rate), after one global-norm clipping over every trained parameter.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from flax import nnx

from ernie_jax.train.optimizer import OptimConfig, decay_mask, lr_schedule

METHODS = ("full", "lora")
ROUTER, VISION, LORA_B, DEFAULT = "router", "vision", "lora_b", "default"


@dataclasses.dataclass(frozen=True)
class GroupsConfig:
  freeze_router: bool = False  # the MoE routers do not train
  router_lr_ratio: float = 1.0  # the routers' lr = ratio x optim.lr (ERNIEKit moe_gate_lr_ratio)
  freeze_vision: bool = False  # VL: the vision tower does not train
  vision_lr_ratio: float = 1.0  # VL: the vision tower's lr = ratio x optim.lr (ERNIEKit vit_lr_ratio)

  @property
  def is_default(self) -> bool:
    return self == GroupsConfig()


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  method: str = "lora"  # "full" | "lora" (see the module docstring)
  lora_plus_ratio: float = 1.0  # LoRA+: the B matrices' lr = ratio x optim.lr (1 = plain LoRA)
  eval_every: int = 0  # evaluate the held-out assistant loss every N steps (and at the start and end); 0 = start/end
  eval_batches: int = 0  # use at most N held-out batches per evaluation; 0 = all
  sample_prompt: str = ""  # after training, answer this user message greedily (""= the first held-out question)
  sample_tokens: int = 64  # max new tokens of that sample


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def group_of(path) -> str:
  """The parameter group of a state path: "lora_b", "router", "vision" or "default"."""
  names = _names(path)  # (a tree of Variables adds a trailing "value" key)
  if any(n.endswith("_lora_b") for n in names):
    return LORA_B
  if any(n.endswith("router") for n in names):
    return ROUTER
  if names and names[0] == "vision_model":
    return VISION
  return DEFAULT


def trained_filter(method: str, groups: GroupsConfig = GroupsConfig()):
  """The nnx filter of what trains (see the module docstring): every Param ("full") or every LoRAParam ("lora"),
  minus the frozen groups (with LoRA: the adapters inside them, e.g. none in the vision tower with freeze_vision)."""
  trained = nnx.LoRAParam if method == "lora" else nnx.Param
  frozen = []
  if groups.freeze_router:
    frozen.append(lambda path, _: group_of(path) == ROUTER)
  if groups.freeze_vision:
    frozen.append(lambda path, _: group_of(path) == VISION)
  if not frozen:
    return trained
  return nnx.All(trained, nnx.Not(nnx.Any(*frozen)))


def group_ratios(groups: GroupsConfig, lora_plus_ratio: float = 1.0) -> dict[str, float]:
  return {DEFAULT: 1.0, ROUTER: groups.router_lr_ratio, VISION: groups.vision_lr_ratio, LORA_B: lora_plus_ratio}


def make_grouped_optimizer(cfg: OptimConfig, groups: GroupsConfig, total_steps: int, lora_plus_ratio: float = 1.0
                           ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(transformation, base schedule): global-norm clipping, then per-group AdamW (`optax.multi_transform`)
  with the schedule x the group's ratio; weight decay masked as in pretraining (`optimizer.decay_mask`)."""
  schedule = lr_schedule(cfg, total_steps)

  def adamw(ratio: float):
    sched = schedule if ratio == 1.0 else (lambda step: ratio * schedule(step))
    return optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=lambda params: decay_mask(params, cfg.decay_embeddings))

  labels = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: group_of(p), params)  # noqa: E731
  tx = optax.multi_transform({g: adamw(r) for g, r in group_ratios(groups, lora_plus_ratio).items()}, labels)
  if cfg.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx, schedule


def optimizer_state_bytes(state: Any) -> int:
  """Bytes of the optimizer moments in a train state (`state["opt"]`), for the LoRA-vs-full report."""
  opt = state["opt"] if "opt" in state else state
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt) if hasattr(x, "dtype")))
