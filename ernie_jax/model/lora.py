"""LoRA for the text and VL models, including every routed expert (applied post hoc, merged on demand).

`apply_lora(model, cfg, rngs=...)` adds to each targeted base weight `w` of a module (an `Attention`'s
q/k/v/o, an `MLP`'s gate/up/down — the dense MLP and the shared experts —, an `Experts` set's stacked
gate/up/down, the VL resampler's spatial / temporal linears) two `nnx.LoRAParam`s on the same module:

* `w_lora_a`: W's input axes then the rank, e.g. `attn.q_lora_a` [H, r], `attn.o_lora_a` [N, D, r],
  `mlp.experts.gate_lora_a` [E, H, r]; initialised like PEFT's kaiming-uniform(a=sqrt(5)) on the
  [r, in] weight of a Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = product of the input axes;
* `w_lora_b`: the rank then W's output axes (`attn.q_lora_b` [r, N, D], `mlp.experts.gate_lora_b`
  [E, r, I]); zeros, so a fresh adapter leaves the model's function unchanged.

Both are in W's dtype and carry W's logical axis names with the rank axis unsharded (`None`):
routed experts keep the leading `experts` axis on both (split over the `expert` mesh axis like
their experts, by `ernie_jax.parallel.state_shardings` / `shard_model`), and layers of scanned groups
the leading `layers` axis, so `nnx.scan` slices them per layer like every other parameter. When W
is already laid out on a mesh, the adapters are placed by the same rules. The module also gets the
static attributes `lora_scale` (`scale(cfg)`) and `lora_dropout`, and with dropout a `lora_salt`
(`lora_ops.LoraSalt`, a unique int32 per module and layer). The root model records the config
(`lora_config(model)`).

The forward (`lora_ops`) computes `x W + scale * (dropout(x) A) B` on activations — for routed
experts inside the grouped matmul of every `moe_impl` (ragged_dot, blocked, loop) and every
`moe_transport` (all_to_all, ragged_all_to_all, allgather, none) — never `A @ B`. A module without
LoRA parameters runs exactly its code without LoRA.

Training: the trainable filter is `nnx.LoRAParam` (`TRAINABLE`); note that `nnx.Param` also matches
LoRAParams (a subclass), the frozen base is `nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))`. Dropout
(cfg.dropout > 0) is active only for model calls traced inside `with dropout_key(key):`, entered
inside the jitted step with a traced key (e.g. `jax.random.fold_in(seed_key, step)`); elsewhere
(eval, generation) the branch has no dropout.

Not supported: FP8 models (`fp8_recipe != "none"`: a ConfigError naming the field); the vision
tower (ERNIEKit does not target it either); the router and the norms are never targets.

`merge_lora(model)` returns a new model (same class, config and sharding rules, no LoRA state) with
W + scale * A·B computed in fp32 and cast to W's dtype (per expert for the routed experts).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from ernie_jax.config.base import ConfigError
from ernie_jax.config.lora import DEFAULT_TARGETS, LoraConfig
from ernie_jax.model.attention import Attention
from ernie_jax.model.layers import MLP
from ernie_jax.model.lora_ops import LoraSalt, dropout_key
from ernie_jax.model.moe.block import Experts
from ernie_jax.model.state import path_str
from ernie_jax.model.vl.vision import Linear
from ernie_jax.parallel.sharding import DEFAULT_RULES, logical_to_spec

GROUPS = ("attn", "mlp", "shared", "experts", "text_experts", "vision_experts", "resampler")
TRAINABLE = nnx.LoRAParam
_ATTR = "lora_cfg"  # the root model's record of the applied LoraConfig
_MODULE_ATTRS = ("lora_scale", "lora_dropout", "lora_salt")

__all__ = ["GROUPS", "TRAINABLE", "LoraConfig", "apply_lora", "dropout_key", "is_lora_path", "lora_config",
           "lora_targets", "merge_lora", "scale"]


class _Site(NamedTuple):
  """A weight LoRA can target: module path, module, weight attribute, groups, and the number of
  its natural batch (expert) and input axes (the stacked `layers` axes come before them)."""

  path: tuple
  module: nnx.Module
  name: str
  groups: tuple[str, ...]
  n_batch: int
  n_in: int

  @property
  def key(self) -> str:
    """Dotted path without list indices, for suffix matching: 'groups.blocks.layers.attn.q'."""
    return ".".join(str(p) for p in self.path + (self.name,) if not isinstance(p, int))

  def lead(self, w) -> int:
    """Leading axes of the weight before its natural ones (stacked layers) + its batch axes."""
    natural = {Attention: 3, MLP: 2, Experts: 3, Linear: 2}[type(self.module)]
    return w.ndim - natural + self.n_batch


def scale(cfg: LoraConfig) -> float:
  """alpha / rank, or alpha / sqrt(rank) with rsLoRA (alpha 0 means 2 * rank)."""
  alpha = cfg.effective_alpha
  return alpha / math.sqrt(cfg.rank) if cfg.rslora else alpha / cfg.rank


def lora_config(model) -> LoraConfig | None:
  """The LoraConfig applied to `model`, or None."""
  return getattr(model, _ATTR, None)


def is_lora_path(path) -> bool:
  """True for the state path ('/'-joined string or key tuple) of a LoRA parameter or LoRA state."""
  last = path.rsplit("/", 1)[-1] if isinstance(path, str) else str(getattr(path[-1], "key", path[-1]))
  return last.endswith("_lora_a") or last.endswith("_lora_b") or last == "lora_salt"


def _sites(model) -> list[_Site]:
  out = []
  for path, m in nnx.iter_graph(model):
    if isinstance(m, Attention):
      out += [_Site(path, m, n, ("attn",), 0, 2 if n == "o" else 1) for n in ("q", "k", "v", "o")]
    elif isinstance(m, MLP):
      group = "shared" if path and path[-1] == "shared" else "mlp"
      out += [_Site(path, m, n, (group,), 0, 1) for n in ("gate", "up", "down")]
    elif isinstance(m, Experts):
      groups = ("experts",) if path[-1] == "experts" else ("experts", path[-1])
      out += [_Site(path, m, n, groups, 1, 1) for n in ("gate", "up", "down")]
    elif (isinstance(m, Linear) and len(path) >= 3 and path[-3] == "resampler"
          and path[-2] in ("spatial_linear", "temporal_linear")):
      out.append(_Site(path, m, "kernel", ("resampler",), 0, 1))
  return out


def _matches(site: _Site, target: str) -> bool:
  if target in GROUPS:
    return target in site.groups
  keys = [site.key] + ([site.key.rsplit(".", 1)[0]] if site.name == "kernel" else [])
  return any(k == target or k.endswith("." + target) for k in keys)


def _short(key: str) -> str:
  """The module-relative suffix of a site key: 'attn.q', 'mlp.experts.gate', 'spatial_linear.fc1'."""
  parts = key.split(".")
  for anchor in ("layers", "block", "resampler"):
    if anchor in parts:
      parts = parts[len(parts) - parts[::-1].index(anchor):]
      break
  return ".".join(p for p in parts if p != "kernel")


def _select(sites: list[_Site], cfg: LoraConfig) -> list[_Site]:
  """The sites the targets select; unknown targets, and (unless the default targets are used) targets
  that match nothing in this model, are ConfigErrors naming them."""
  chosen = set()
  for t in cfg.targets:
    hits = {i for i, s in enumerate(sites) if _matches(s, t)}
    if not hits and (t not in GROUPS or cfg.targets != DEFAULT_TARGETS):
      suffixes = sorted({_short(s.key) for s in sites})
      what = "matches no weight of this model" if t in GROUPS else "is unknown"
      raise ConfigError("lora.targets", f"target {t!r} {what}; valid: the groups {', '.join(GROUPS)} present "
                        f"in the model, or a path suffix such as {', '.join(suffixes)}")
    chosen |= hits
  if not chosen:
    raise ConfigError("lora.targets", f"{cfg.targets} select no weight of this model")
  return [s for i, s in enumerate(sites) if i in chosen]


def _place(value, names, like, rules):
  """`value` laid out on `like`'s mesh by the logical `names` (unchanged when `like` is not sharded)."""
  sharding = getattr(like, "sharding", None) if not isinstance(like, jax.core.Tracer) else None
  if not isinstance(sharding, NamedSharding):
    return value
  spec = logical_to_spec(names, value.shape, rules, sharding.mesh, what="LoRA parameter")
  return jax.device_put(value, NamedSharding(sharding.mesh, spec))


def apply_lora(model, cfg: LoraConfig, *, rngs: nnx.Rngs):
  """Add LoRA parameters for `cfg.targets` to `model` in place (see the module docstring); returns it."""
  if lora_config(model) is not None:
    raise ValueError(f"apply_lora: the model already has LoRA ({lora_config(model)}); merge_lora it first")
  if getattr(getattr(model, "config", None), "fp8_recipe", "none") != "none":
    raise ConfigError("fp8_recipe", f"LoRA does not support FP8 models (fp8_recipe={model.config.fp8_recipe!r}); "
                      "use fp8_recipe='none'")
  rules = getattr(model, "sharding_rules", None) or DEFAULT_RULES
  sites = _select(_sites(model), cfg)
  r, salt_base, salted = cfg.rank, 0, set()
  for s in sites:
    var = getattr(s.module, s.name)
    w = var[...]
    names = tuple(var.get_metadata().get("out_sharding") or (None,) * w.ndim)
    nb = s.lead(w)
    batch, ins, outs = w.shape[:nb], w.shape[nb:nb + s.n_in], w.shape[nb + s.n_in:]
    bound = 1.0 / math.sqrt(math.prod(ins))
    a_names, b_names = names[:nb + s.n_in] + (None,), names[:nb] + (None,) + names[nb + s.n_in:]
    a = jax.random.uniform(rngs.params(), batch + ins + (r,), jnp.float32, -bound, bound).astype(w.dtype)
    b = jnp.zeros(batch + (r,) + outs, w.dtype)
    setattr(s.module, f"{s.name}_lora_a", nnx.LoRAParam(_place(a, a_names, w, rules), sharding_names=a_names,
                                                        eager_sharding=False))
    setattr(s.module, f"{s.name}_lora_b", nnx.LoRAParam(_place(b, b_names, w, rules), sharding_names=b_names,
                                                        eager_sharding=False))
    s.module.lora_scale = scale(cfg)
    s.module.lora_dropout = float(cfg.dropout)
    if cfg.dropout > 0 and id(s.module) not in salted:
      salted.add(id(s.module))
      lead = nb - s.n_batch  # stacked layer axes
      n = math.prod(w.shape[:lead])
      salt = (salt_base + jnp.arange(n, dtype=jnp.int32)).reshape(w.shape[:lead])
      salt_base += n
      s.module.lora_salt = LoraSalt(_place(salt, names[:lead], w, rules), sharding_names=names[:lead],
                                    eager_sharding=False)
  setattr(model, _ATTR, cfg)
  return model


def _lora_sites(model) -> list[_Site]:
  return [s for s in _sites(model) if getattr(s.module, f"{s.name}_lora_a", None) is not None]


def lora_targets(model) -> dict[str, tuple]:
  """{path of each LoRA'd base weight: (A shape, B shape)}."""
  return {path_str(s.path + (s.name,)): (tuple(getattr(s.module, f"{s.name}_lora_a").shape),
                                         tuple(getattr(s.module, f"{s.name}_lora_b").shape))
          for s in _lora_sites(model)}


def merged_weight(w, a, b, lora_scale: float, batch_axes: int):
  """W + scale * (A contracted with B over the rank), in fp32, cast to W's dtype."""
  a32 = a.astype(jnp.float32).reshape(a.shape[:batch_axes] + (-1, a.shape[-1]))
  b32 = b.astype(jnp.float32).reshape(b.shape[:batch_axes + 1] + (-1,))
  delta = jnp.einsum("...ir,...ro->...io", a32, b32, precision=jax.lax.Precision.HIGHEST).reshape(w.shape)
  return (w.astype(jnp.float32) + lora_scale * delta).astype(w.dtype)


def merge_lora(model):
  """A copy of `model` without LoRA state whose targeted weights are W + scale * A·B (fp32 math, cast to
  W's dtype); `model` is left unchanged. A model without LoRA gives a plain copy."""
  new = nnx.clone(model)
  for s in _lora_sites(new):
    var = getattr(s.module, s.name)
    w = var[...]
    a, b = getattr(s.module, f"{s.name}_lora_a")[...], getattr(s.module, f"{s.name}_lora_b")[...]
    merged = merged_weight(w, a, b, float(s.module.lora_scale), s.lead(w))
    sharding = getattr(w, "sharding", None)
    var[...] = jax.device_put(merged, sharding) if isinstance(sharding, NamedSharding) else merged
    delattr(s.module, f"{s.name}_lora_a")
    delattr(s.module, f"{s.name}_lora_b")
  for _, m in nnx.iter_graph(new):
    if isinstance(m, nnx.Module):
      for attr in _MODULE_ATTRS:
        if hasattr(m, attr) and attr in vars(m):
          delattr(m, attr)
  if _ATTR in vars(new):
    delattr(new, _ATTR)
  return new
