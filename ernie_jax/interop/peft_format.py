"""PEFT LoRA adapter format (peft 0.21, transformers 5 ERNIE 4.5 classes) <-> our LoRA arrays.

Pure mapping, no model: `to_peft` turns {parameter path: array} of our LoRA parameters
(`<base path>_lora_a` with the base weight's input axes then rank, `<base path>_lora_b` with rank then
its output axes; stacked layer / expert axes leading, see `ernie_jax.model.lora`) into the tensors and
`adapter_config.json` that peft's `save_pretrained` writes; `from_peft` is the inverse, for adapters made
by peft. `ernie_jax.interop.peft` applies them to models. Module names per model family (dense, MoE,
VL: `Ernie4_5ForCausalLM`, `Ernie4_5_MoeForCausalLM`, `Ernie4_5_VLMoeForConditionalGeneration`) come
from the data tables of `ernie_jax.interop.peft_layouts`.

PEFT's layout:
  * Linear modules (attention `self_attn.{q,k,v,o}_proj`, dense MLP `mlp.{gate,up,down}_proj`, shared
    experts `mlp.shared_experts.{gate,up,down}_proj`, the VL resampler's
    `resampler_model.{spatial,temporal}_linear.{fc1,fc2}`): `base_model.model.<module>.lora_A.weight`
    [r, in] and `lora_B.weight` [out, r] (torch Linear layout), delta W = scale * B @ A. `target_modules`
    lists for each adapted kind of module its shortest name suffix that no other Linear of the model
    has (`q_proj`; `shared_experts.gate_proj` when the dense MLPs are not adapted; `spatial_linear.fc1`,
    as `fc1` would also hit the VL vision tower).
  * Routed experts are fused 3-D parameters in transformers 5 (`<experts>.gate_up_proj` [E, 2I, H],
    `<experts>.down_proj` [E, H, I]; `<experts>` is `mlp.experts`, or on VL `mlp.text_moe.experts` and
    `mlp.vision_moe.experts`); peft reaches them only through `target_parameters` (its `ParamWrapper`):
    lora_A.weight [E*R, in] (row e*R + k), lora_B.weight [out, R*E] (column k*E + e),
    delta W[e] = scale * B[:, :, e] @ A[e]. With both parameters of an expert module targeted the
    wrappers nest: gate_up_proj is the inner one (`<experts>.base_layer.lora_A.weight`), down_proj the
    outer (`<experts>.lora_A.weight`); with one, it is `<experts>.lora_*`. Our separate gate / up
    adapters (rank r each) are exported fused at rank 2r: A = [A_gate; A_up] along the rank,
    B = blockdiag(B_gate, B_up), with `rank_pattern` / `alpha_pattern` entries (alpha 2*alpha, or
    sqrt(2)*alpha with rsLoRA) so the scale is unchanged: exact. Import splits a fused gate_up adapter of
    rank R into gate and up adapters of rank R sharing A. Adapters in the transformers-4 per-expert
    layout of the MoE text model (`mlp.experts.E.gate_proj.lora_A.weight`) import too.
    peft's ParamWrapper refuses lora_dropout != 0, so adapters with experts are written with
    lora_dropout 0 (dropout is a training setting; the weights are unaffected).

What PEFT cannot represent, and is refused (never exported lossy), naming the modules:
  * on MoE text models (model_type ernie4_5_moe), the MLP of dense layers (layers before
    moe_layer_start_index) and the shared experts: peft 0.21 rewrites every `target_modules` entry
    ending in gate_proj / up_proj / down_proj into the fused routed-expert `target_parameters`
    (its transformers-4 -> 5 MoE conversion), so those modules cannot be targeted at all. The VL model
    (ernie4_5_vl_moe) has no such rewrite: everything our LoRA adapts there has a PEFT layout;
  * MTP blocks (no module of transformers' classes).
Import refuses peft features with no equivalent here: DoRA, LoRA biases (`bias` != "none",
`lora_bias`), `modules_to_save`, trainable tokens, embedding LoRA, `layers_to_transform`,
`layer_replication` and the other LoRA variants, each named in a one-line `PeftFormatError`; and
adapters on Linears our LoRA does not adapt (the VL vision tower, `resampler_model.mlp`, the LM head).

Ranks and scales: we have one rank and one alpha for all targets. Import uses the largest rank R of the
adapter, zero-pads smaller ones (exact), and the scale most targets share; a target with a different
scale (alpha_pattern / rank_pattern with different alpha/r) has its B multiplied by its scale / ours.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ernie_jax.interop.peft_layouts import FUSED_PARAMS, layout_of, matches, modules, suffixes, target_name
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.interop.transforms import Linear

PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_V4_EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj$")


class PeftFormatError(CheckpointError):
  """A PEFT adapter that does not fit the model, uses an unsupported peft feature, or LoRA targets
  that PEFT cannot represent."""


@dataclass(frozen=True)
class Settings:
  """Our LoRA hyper-parameters (the fields of `ernie_jax.config.lora.LoraConfig` that matter here)."""
  rank: int
  alpha: float
  rslora: bool = False
  dropout: float = 0.0


def scale_of(rank: int, alpha: float, rslora: bool) -> float:
  return alpha / math.sqrt(rank) if rslora else alpha / rank


# ==================================================================================================
# Export
def _unrepresentable_error(cfg, names: list[str]) -> PeftFormatError:
  shown = ", ".join(names[:4]) + (f" (and {len(names) - 4} more)" if len(names) > 4 else "")
  return PeftFormatError(f"PEFT cannot represent the LoRA on {shown}: {layout_of(cfg).hint} to export a PEFT "
                         "adapter, or merge the LoRA (merge_lora) and export the model")


def _fuse_gate_up(lora, ex, gu: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """peft's (lora_A, lora_B) of a fused gate_up_proj from our gate / up adapters (rank len(gu) * r, A
  stacked along the rank, B block-diagonal; an absent one gives zero rows of B)."""
  a = np.concatenate([np.asarray(lora[p + "_lora_a"][ex.index], np.float32) for p in gu], axis=-1)  # [E, H, R]
  n_e, big_r = a.shape[0], a.shape[-1]
  inter = lora[gu[0] + "_lora_b"].shape[-1]
  b = np.zeros((n_e, 2 * inter, big_r), np.float32)  # [E, out = gate rows | up rows, R]
  k = 0
  for p in gu:
    x = np.asarray(lora[p + "_lora_b"][ex.index], np.float32)  # [E, r, I]
    o = 0 if p == ex.gate else inter
    b[:, o:o + inter, k:k + x.shape[1]] = x.transpose(0, 2, 1)
    k += x.shape[1]
  return (np.ascontiguousarray(a.transpose(0, 2, 1).reshape(n_e * big_r, -1)),
          np.ascontiguousarray(b.transpose(1, 2, 0).reshape(b.shape[1], -1)))


def _down(lora, ex) -> tuple[np.ndarray, np.ndarray]:
  a = np.asarray(lora[ex.down + "_lora_a"][ex.index], np.float32)  # [E, I, r]
  b = np.asarray(lora[ex.down + "_lora_b"][ex.index], np.float32)  # [E, r, H]
  n_e, rk = a.shape[0], a.shape[-1]
  return (np.ascontiguousarray(a.transpose(0, 2, 1).reshape(n_e * rk, -1)),
          np.ascontiguousarray(b.transpose(2, 1, 0).reshape(b.shape[2], -1)))


def to_peft(cfg, lora: dict[str, np.ndarray], settings: Settings, *,
            base_model_name_or_path: str = "") -> tuple[dict[str, np.ndarray], dict]:
  """(tensors, adapter_config) in peft's saved format for our LoRA arrays `lora` ({path: array},
  `<base>_lora_a` / `<base>_lora_b`, full stacked arrays). Raises PeftFormatError naming the targets
  PEFT cannot represent."""
  targets = sorted(p[:-len("_lora_a")] for p in lora if p.endswith("_lora_a"))
  for t in targets:
    if t + "_lora_b" not in lora:
      raise PeftFormatError(f"LoRA parameter '{t}_lora_b' is missing (its '{t}_lora_a' is present)")
  mods, refused = modules(cfg), layout_of(cfg).fused_by_peft
  r, alpha, rslora = settings.rank, float(settings.alpha), settings.rslora
  tensors: dict[str, np.ndarray] = {}
  covered: set[str] = set()
  bad: list[str] = []
  adapted: set[str] = set()
  for name, m in mods.linear.items():
    if m.path + "_lora_a" not in lora:
      continue
    covered.add(m.path)
    if refused and re.search(refused, name):
      bad.append(name)
      continue
    a = np.asarray(lora[m.path + "_lora_a"][m.index], np.float32)
    b = np.asarray(lora[m.path + "_lora_b"][m.index], np.float32)
    tensors[f"{PREFIX}{name}.lora_A.weight"] = Linear(m.in_axes).from_param(a)
    tensors[f"{PREFIX}{name}.lora_B.weight"] = Linear(1).from_param(b)
    adapted.add(name)
  ranks: dict[str, int] = {}  # adapted fused parameter -> its rank
  for key, ex in mods.experts.items():
    have = [p for p in (ex.gate, ex.up, ex.down) if p + "_lora_a" in lora]
    covered.update(have)
    gu = [p for p in (ex.gate, ex.up) if p in have]
    outer = f"{PREFIX}{key}"
    inner = f"{PREFIX}{key}.base_layer" if gu and ex.down in have else outer
    if gu:
      a, b = _fuse_gate_up(lora, ex, gu)
      tensors[f"{inner}.lora_A.weight"], tensors[f"{inner}.lora_B.weight"] = a, b
      ranks[f"{key}.gate_up_proj"] = sum(lora[p + "_lora_a"].shape[-1] for p in gu)
    if ex.down in have:
      tensors[f"{outer}.lora_A.weight"], tensors[f"{outer}.lora_B.weight"] = _down(lora, ex)
      ranks[f"{key}.down_proj"] = lora[ex.down + "_lora_a"].shape[-1]
  bad += sorted(t for t in targets if t not in covered)
  if bad:
    raise _unrepresentable_error(cfg, bad)
  if not tensors:
    raise PeftFormatError("the model has no LoRA parameters to export")
  rank_pattern, alpha_pattern = {}, {}
  for big_r in sorted(set(ranks.values()) - {r}):
    for key in suffixes([p for p, k in ranks.items() if k == big_r], ranks):
      rank_pattern[key] = big_r
      alpha_pattern[key] = alpha * (math.sqrt(big_r / r) if rslora else big_r / r)
  config = {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or None,
    "r": r, "lora_alpha": alpha, "use_rslora": rslora,
    "lora_dropout": 0.0 if ranks else float(settings.dropout),
    "target_modules": suffixes(adapted, set(mods.linear) | mods.other_linear),
    "target_parameters": suffixes(ranks, mods.fused_params) or None,
    "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
    "bias": "none", "lora_bias": False, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
    "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
    "layer_replication": None, "revision": None, "trainable_token_indices": None,
    "exclude_modules": None, "megatron_config": None, "megatron_core": "megatron.core", "loftq_config": {},
    "eva_config": None, "corda_config": None, "use_qalora": False,
  }
  return tensors, config


# ==================================================================================================
# Import
# (config field, value that means "not used")
_UNSUPPORTED = (
  ("use_dora", (False, None)), ("lora_bias", (False, None)), ("modules_to_save", (None, [], ())),
  ("trainable_token_indices", (None, {}, [])), ("layers_to_transform", (None, [], ())),
  ("layer_replication", (None, [])), ("fan_in_fan_out", (False, None)), ("use_qalora", (False, None)),
  ("use_bdlora", (None, False)), ("velora_config", (None,)), ("kasa_config", (None,)),
  ("monteclora_config", (None,)), ("arrow_config", (None,)), ("alora_invocation_tokens", (None,)),
  ("megatron_config", (None,)),
)


def check_config(config: dict, where: str) -> None:
  """Refuse adapters whose peft features have no equivalent here (one line naming the field)."""
  if config.get("peft_type") != "LORA":
    raise PeftFormatError(f"{where}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
  if config.get("bias", "none") != "none":
    raise PeftFormatError(f"{where}: bias={config['bias']!r} (LoRA bias terms) is not supported; only 'none'")
  for field, unused in _UNSUPPORTED:
    if config.get(field, unused[0]) not in unused:
      raise PeftFormatError(f"{where}: {field}={config[field]!r} is not supported (no equivalent in ernie_jax LoRA)")
  for field in ("r", "lora_alpha"):
    if not isinstance(config.get(field), (int, float)) or isinstance(config.get(field), bool):
      raise PeftFormatError(f"{where}: '{field}' is missing or not a number")


def _pattern(patterns: dict, key: str, default):
  """peft's rank_pattern / alpha_pattern lookup (`peft.utils.other.get_pattern_key`)."""
  for pat in patterns or {}:
    if re.match(rf"(.*\.)?({pat})$", key):
      return patterns[pat]
  return default


@dataclass
class _Piece:
  """One of our LoRA'd base weights at one stacked index, from one adapter module."""
  path: str
  index: tuple[int, ...]
  a: np.ndarray  # our layout: in axes + (rank,)
  b: np.ndarray  # (rank,) + out axes
  scale: float
  source: str  # adapter module name (errors)
  stacked: bool = False  # a / b carry the expert axis first (a fused expert parameter)


def _expect(name: str, x: np.ndarray, shape: tuple[int, ...]) -> None:
  if tuple(x.shape) != tuple(shape):
    raise PeftFormatError(f"tensor '{name}' has shape {list(x.shape)}, expected {list(shape)} for the model")


def _rank_of(name: str, a_shape, n_e: int) -> int:
  if len(a_shape) != 2 or a_shape[0] % n_e or a_shape[0] == 0:
    raise PeftFormatError(f"tensor '{name}' has shape {list(a_shape)}, expected [{n_e} * rank, in]")
  return a_shape[0] // n_e


def _unknown_module(cfg, mods, mod: str, a_name: str, where: str) -> PeftFormatError:
  lay = layout_of(cfg)
  if mod in mods.other_linear:
    why = (f"a Linear that ernie_jax's LoRA does not adapt; it adapts "
           f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in mods.linear}))} and the routed experts")
  else:
    why = lay.describe(cfg, lay.checkpoint_name(mod) + ".weight")
  return PeftFormatError(f"tensor '{a_name}' in {where}: module '{mod}' is not a LoRA-able module of the model "
                         f"({why})")


def _fused_param(mod: str, key: str, tparams, a_name: str, where: str) -> str:
  """Which fused parameter of expert module `key` the adapter module `mod` (`key` or `key.base_layer`)
  holds: peft wraps the targeted parameters in registration order, gate_up_proj innermost."""
  targeted = [p for p in FUSED_PARAMS if any(matches(f"{key}.{p}", t) for t in tparams)]
  depth = mod.count(".base_layer")
  if depth >= len(targeted) or mod != key + ".base_layer" * depth:
    raise PeftFormatError(f"tensor '{a_name}' in {where}: module '{mod}' does not match "
                          f"target_parameters={list(tparams)}")
  return targeted[len(targeted) - 1 - depth]


def from_peft(cfg, config: dict, tensors: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], *,
              where: str = "adapter") -> tuple[Settings, tuple[str, ...], dict[str, np.ndarray]]:
  """(settings, our LoraConfig targets, {path: array} of our LoRA parameters) for a peft adapter.

  config: adapter_config.json; tensors: adapter_model.safetensors; shapes: {base path: full shape} of the
  model's parameters. Every error is one line naming the tensor / module / config field."""
  check_config(config, where)
  r0, alpha0, rslora = int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora", False))
  rank_pat, alpha_pat = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
  tparams = config.get("target_parameters") or []
  mods = modules(cfg)
  by_module: dict[str, dict[str, np.ndarray]] = {}
  for name, x in tensors.items():
    if not name.startswith(PREFIX):
      raise PeftFormatError(f"tensor '{name}' in {where}: not a PEFT LoRA tensor (no '{PREFIX}' prefix)")
    m = re.match(r"^(.*)\.(lora_A|lora_B)\.weight$", name[len(PREFIX):])
    if not m:
      what = ("DoRA magnitude" if "lora_magnitude_vector" in name else "embedding LoRA" if "lora_embedding" in name
              else "a LoRA bias" if name.endswith(".bias") else "not a lora_A / lora_B weight")
      raise PeftFormatError(f"tensor '{name}' in {where}: {what}, not supported")
    by_module.setdefault(m.group(1), {})[m.group(2)] = x
  pieces: list[_Piece] = []

  def scale(key: str, rank: int) -> float:
    rk = int(_pattern(rank_pat, key, r0))
    if rk != rank:
      raise PeftFormatError(f"module '{key}' in {where} has LoRA rank {rank} but adapter_config.json gives {rk}")
    return scale_of(rank, float(_pattern(alpha_pat, key, alpha0)), rslora)

  for mod, ab in sorted(by_module.items()):
    for part in ("lora_A", "lora_B"):
      if part not in ab:
        raise PeftFormatError(f"tensor '{PREFIX}{mod}.{part}.weight' is missing from {where}")
    a_name, b_name = f"{PREFIX}{mod}.lora_A.weight", f"{PREFIX}{mod}.lora_B.weight"
    a, b = np.asarray(ab["lora_A"], np.float32), np.asarray(ab["lora_B"], np.float32)
    if mod in mods.linear:
      lm = mods.linear[mod]
      w = shapes[lm.path][len(lm.index):]
      rank = _rank_of(a_name, a.shape, 1)
      _expect(a_name, a, (rank, int(np.prod(w[:lm.in_axes]))))
      _expect(b_name, b, (int(np.prod(w[lm.in_axes:])), rank))
      pieces.append(_Piece(lm.path, lm.index, Linear(lm.in_axes).to_param(a, tuple(w[:lm.in_axes]) + (rank,)),
                           Linear(1).to_param(b, (rank,) + tuple(w[lm.in_axes:])), scale(mod, rank), mod))
      continue
    key = mod.split(".base_layer", 1)[0]
    vm = _V4_EXPERT_RE.match(mod) if layout_of(cfg).per_expert_v4 else None
    ex = mods.experts.get(vm.group(1) if vm else key)
    if ex is None:
      raise _unknown_module(cfg, mods, mod, a_name, where)
    n_e, h, inter = shapes[ex.gate][len(ex.index)], *shapes[ex.gate][len(ex.index) + 1:]
    if vm:  # transformers-4 per-expert Linear
      e, kind = int(vm.group(2)), vm.group(3)
      if e >= n_e:
        raise PeftFormatError(f"tensor '{a_name}' in {where}: expert {e} but the model has {n_e} experts")
      path = {"gate": ex.gate, "up": ex.up, "down": ex.down}[kind]
      fin, fout = (inter, h) if kind == "down" else (h, inter)
      rank = _rank_of(a_name, a.shape, 1)
      _expect(a_name, a, (rank, fin))
      _expect(b_name, b, (fout, rank))
      pieces.append(_Piece(path, ex.index + (e,), a.T, b.T, scale(f"{mod}", rank), mod))
      continue
    param = _fused_param(mod, key, tparams, a_name, where)
    is_gu = param == "gate_up_proj"
    pname = f"{key}.{param}"
    rank = _rank_of(a_name, a.shape, n_e)
    fin, fout = (h, 2 * inter) if is_gu else (inter, h)
    _expect(a_name, a, (n_e * rank, fin))
    _expect(b_name, b, (fout, rank * n_e))
    s = scale(pname, rank)
    a3 = a.reshape(n_e, rank, fin).transpose(0, 2, 1)  # [E, in, R]
    b3 = b.reshape(fout, rank, n_e).transpose(2, 1, 0)  # [E, R, out]
    if is_gu:
      pieces.append(_Piece(ex.gate, ex.index, a3, b3[:, :, :inter], s, pname, True))
      pieces.append(_Piece(ex.up, ex.index, a3, b3[:, :, inter:], s, pname, True))
    else:
      pieces.append(_Piece(ex.down, ex.index, a3, b3, s, pname, True))
  if not pieces:
    raise PeftFormatError(f"{where} holds no LoRA tensors")
  units = {(m.path, m.index): name for name, m in mods.linear.items()}
  for key, ex in mods.experts.items():
    for e in range(shapes[ex.gate][len(ex.index)]):
      for kind, path in (("gate", ex.gate), ("up", ex.up), ("down", ex.down)):
        units[(path, ex.index + (e,))] = f"{key}.{e}.{kind}_proj"
  return _assemble(pieces, units, shapes, rslora, where)


def _assemble(pieces: list[_Piece], units: dict, shapes, rslora: bool, where: str):
  """Pad every piece to the largest rank, fold differing scales into B, check coverage."""
  covered: dict[tuple, str] = {}
  for p in pieces:
    n_e = p.a.shape[0] if p.stacked else 0
    for u in ([(p.path, p.index + (e,)) for e in range(n_e)] if p.stacked else [(p.path, p.index)]):
      if u in covered:
        raise PeftFormatError(f"{where}: module '{p.source}' and '{covered[u]}' both adapt {units.get(u, u[0])}")
      covered[u] = p.source
  kinds = {target_name(u[0]) for u in covered}
  missing = sorted(name for u, name in units.items() if target_name(u[0]) in kinds and u not in covered)
  if missing:
    raise PeftFormatError(f"{where} has no LoRA tensors for '{missing[0]}'"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                          + " although it adapts that kind of module in other layers")
  big_r = max(p.a.shape[-1] for p in pieces)
  common = Counter(round(p.scale, 12) for p in pieces).most_common(1)[0][0]
  common = next(p.scale for p in pieces if round(p.scale, 12) == common)
  settings = Settings(big_r, common * (math.sqrt(big_r) if rslora else big_r), rslora)
  ours = scale_of(big_r, settings.alpha, rslora)
  out: dict[str, np.ndarray] = {}
  for p in pieces:
    lead = shapes[p.path][:len(p.index)]
    k = 2 if p.stacked else 1
    a_full = out.setdefault(p.path + "_lora_a", np.zeros(lead + p.a.shape[:-1] + (big_r,), np.float32))
    b_full = out.setdefault(p.path + "_lora_b", np.zeros(lead + p.b.shape[:k - 1] + (big_r,) + p.b.shape[k:],
                                                         np.float32))
    rk = p.a.shape[-1]
    b = p.b if abs(p.scale - ours) <= 1e-12 * abs(ours) else p.b * np.float32(p.scale / ours)
    a_full[p.index][..., :rk] = p.a
    if p.stacked:
      b_full[p.index][:, :rk] = b
    else:
      b_full[p.index][:rk] = b
  targets = tuple(sorted(kinds))
  return settings, targets, out
