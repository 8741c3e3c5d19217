"""`LoraConfig`: what LoRA adds to a model (`ernie_jax.model.lora.apply_lora`).

rank r, alpha (0 means 2 * rank, like ERNIEKit's lora_alpha=-1), rsLoRA (scale alpha / sqrt(r)
instead of alpha / r), dropout on the LoRA branch input (training only) and the targets: group
names `attn` (q, k, v, o), `mlp` (the dense MLP's gate, up, down), `shared` (shared experts),
`experts` (the routed experts of every expert set), the VL sets `text_experts` / `vision_experts`,
`resampler` (the VL resampler's spatial / temporal linears, ERNIEKit's `spatial_linear.0/.2`,
`temporal_linear.0/.2`), or a suffix of a parameter path such as `attn.q` or `mlp.experts.down`.
Which names match what is checked against the model when LoRA is applied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ernie_jax.config.base import ConfigError

DEFAULT_TARGETS = ("attn", "mlp", "shared", "experts")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 8
  alpha: float = 0.0  # 0 -> 2 * rank (ERNIEKit's default lora_alpha=-1 means the same)
  rslora: bool = False  # scale = alpha / sqrt(rank) instead of alpha / rank
  dropout: float = 0.0  # dropout on the LoRA branch input, training only
  targets: tuple[str, ...] = DEFAULT_TARGETS

  def __post_init__(self):
    if isinstance(self.targets, str):
      object.__setattr__(self, "targets", (self.targets,))
    object.__setattr__(self, "targets", tuple(self.targets))
    if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
      raise ConfigError("lora.rank", f"must be a positive integer, got {self.rank!r}")
    if not self.alpha >= 0:
      raise ConfigError("lora.alpha", f"must be >= 0 (0 means 2 * rank), got {self.alpha!r}")
    if not 0 <= self.dropout < 1:
      raise ConfigError("lora.dropout", f"must be in [0, 1), got {self.dropout!r}")
    if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
      raise ConfigError("lora.targets", f"must be a non-empty tuple of names, got {self.targets!r}")

  @property
  def effective_alpha(self) -> float:
    return float(self.alpha) if self.alpha else 2.0 * self.rank

  def replace(self, **changes: Any) -> "LoraConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ConfigError(f"lora.{unknown[0]}", f"unknown field (known: {', '.join(sorted(names))})")
    return cls(**d)
