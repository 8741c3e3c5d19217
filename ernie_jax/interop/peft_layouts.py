"""Where PEFT puts LoRA on transformers 5's ERNIE 4.5 classes, per model family, as data tables.

peft names adapters by transformers' *in-memory* module names, which for the VL model differ from the
checkpoint names of our tables (`hf.hf_name_map`, `hf_vl.vl_name_map`): a `Layout` derives them from a
family's checkpoint table with literal renames (the `WeightRenaming`s of transformers'
`conversion_mapping` for that model type), and names which Linears our LoRA can adapt, how the routed
experts are fused and what peft cannot target.

  family (model_type)            LM decoder layer             routed experts (fused 3-D params)     other LoRA-able
  ERNIE 4.5 dense (ernie4_5)     model.layers.N.              -                                      -
  ERNIE 4.5 MoE (ernie4_5_moe)   model.layers.N.              mlp.experts                            -
  ERNIE 4.5 VL (ernie4_5_vl_moe) model.language_model.        mlp.text_moe.experts (ours 0..E-1),    model.resampler_model.
                                   layers.N.                  mlp.vision_moe.experts (E..2E-1)       {spatial,temporal}_linear.{fc1,fc2}

Under a decoder layer: `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj` (dense layers),
`mlp.shared_experts.{gate,up,down}_proj`; a fused expert module holds `gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I]. The VL vision tower (`model.vision_tower.*`) and `resampler_model.mlp` are Linears
our LoRA does not adapt.

peft 0.21 rewrites `target_modules` ending in gate_proj / up_proj / down_proj into the fused experts only
for the model types of its `_MOE_TARGET_MODULE_MAPPING` (through transformers'
`_MODEL_TO_CONVERSION_PATTERN`): ernie4_5_moe (as qwen2_moe), not ernie4_5_vl_moe; so the dense-layer MLPs
and shared experts cannot be targeted on the MoE text model (`fused_by_peft`), and can on the VL model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from ernie_jax.interop import hf, hf_vl
from ernie_jax.interop.transforms import Linear

FUSED_PARAMS = ("gate_up_proj", "down_proj")  # a fused expert module's parameters, in registration order
_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
_DECODER_LINEARS = r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(shared_experts\.)?(gate|up|down)_proj)$"


@dataclass(frozen=True)
class Layout:
  """One model family's PEFT naming (see the module docstring)."""
  name_map: Callable  # cfg -> {checkpoint tensor name: transforms.Read}
  describe: Callable  # (cfg, checkpoint tensor name) -> why it is not part of the model
  lora_modules: str  # regex: checkpoint module names of the Linears our LoRA adapts
  renames: tuple[tuple[str, str], ...] = ()  # ('.checkpoint part.', '.in-memory part.'), on '.' + name + '.'
  expert_sets: tuple[tuple[str, str], ...] = ()  # (our Experts module, transformers' fused module under the layer)
  fused_by_peft: str | None = None  # regex (in-memory names): Linears peft rewrites into the routed experts
  per_expert_v4: bool = False  # transformers-4 per-expert adapters (`mlp.experts.E.gate_proj`) exist
  hint: str = ""  # what to do instead, for export errors

  def peft_name(self, name: str) -> str:
    """Checkpoint module name -> transformers' in-memory (peft) module name."""
    s = f".{name}."
    for ckpt, mem in self.renames:
      s = s.replace(ckpt, mem)
    return s[1:-1]

  def checkpoint_name(self, name: str) -> str:
    """In-memory (peft) module name -> checkpoint module name (for error messages)."""
    s = f".{name}."
    for ckpt, mem in self.renames:
      s = s.replace(mem, ckpt)
    return s[1:-1]


DENSE = Layout(hf.hf_name_map, hf.describe_unexpected, _DECODER_LINEARS,
               hint="Apply LoRA with targets ('attn', 'mlp') (MTP blocks have no PEFT layout)")
MOE = Layout(hf.hf_name_map, hf.describe_unexpected, _DECODER_LINEARS,
             expert_sets=(("experts", "mlp.experts"),),
             fused_by_peft=r"\.mlp\.(shared_experts\.)?(gate|up|down)_proj$", per_expert_v4=True,
             hint="peft 0.21 rewrites gate_proj/up_proj/down_proj targets of ernie4_5_moe models into the fused "
                  "routed experts, so dense-layer MLPs and shared experts cannot be targeted, and MTP blocks have no "
                  "PEFT layout. Apply LoRA with targets ('attn', 'experts')")
VL = Layout(hf_vl.vl_name_map, hf_vl.describe_unexpected,
            _DECODER_LINEARS + r"|^model\.resampler_model\.(spatial|temporal)_linear\.[02]$",
            renames=((".model.layers.", ".model.language_model.layers."),
                     (".model.vision_model.", ".model.vision_tower."),
                     *((f".{m}_linear.{i}.", f".{m}_linear.{n}.") for m in ("spatial", "temporal")
                       for i, n in (("0", "fc1"), ("2", "fc2"), ("3", "ln")))),
            expert_sets=(("text_experts", "mlp.text_moe.experts"), ("vision_experts", "mlp.vision_moe.experts")),
            hint="Apply LoRA with targets among ('attn', 'mlp', 'shared', 'text_experts', 'vision_experts', "
                 "'resampler')")


def layout_of(cfg) -> Layout:
  return VL if cfg.is_vl else MOE if cfg.is_moe else DENSE


@dataclass(frozen=True)
class Module:
  """One LoRA-able Linear: its peft module name, our base weight (path, stacked index) and the number of
  leading parameter axes that hold the input (`transforms.Linear`)."""
  name: str
  path: str
  index: tuple[int, ...]
  in_axes: int


@dataclass(frozen=True)
class Experts:
  """One layer's fused routed-expert module (one expert set): its peft module name and our three expert
  weight paths."""
  name: str
  gate: str
  up: str
  down: str
  index: tuple[int, ...]  # stacked index without the expert axis


@dataclass(frozen=True)
class Modules:
  """The PEFT view of one model: LoRA-able Linears and fused expert modules by peft name, and every other
  Linear module (peft names) -- which a `target_modules` entry must not match by accident."""
  linear: dict[str, Module]
  experts: dict[str, Experts]
  other_linear: frozenset[str]

  @property
  def fused_params(self) -> list[str]:
    return [f"{e}.{p}" for e in self.experts for p in FUSED_PARAMS]


def modules(cfg) -> Modules:
  """The PEFT view of the model of `cfg`, from its checkpoint name table."""
  lay = layout_of(cfg)
  sets = dict(lay.expert_sets)
  linear, experts, other = {}, {}, set()
  for name, read in lay.name_map(cfg).items():
    slot = read.slots[0]
    m = _EXPERT_RE.match(name)
    if m:
      base, which = slot.path.rsplit("/", 2)[:2]
      if slot.index[-1] == 0 and which in sets:  # the first expert of its set
        key = f"{lay.peft_name(f'model.layers.{m.group(1)}')}.{sets[which]}"
        experts[key] = Experts(key, f"{base}/{which}/gate", f"{base}/{which}/up", f"{base}/{which}/down",
                               slot.index[:-1])
      continue
    if not (name.endswith(".weight") and isinstance(slot.transform, Linear) and len(read.slots) == 1):
      continue
    mod = name[:-len(".weight")]
    if re.match(lay.lora_modules, mod):
      linear[lay.peft_name(mod)] = Module(lay.peft_name(mod), slot.path, slot.index, slot.transform.in_axes)
    else:
      other.add(lay.peft_name(mod))
  return Modules(linear, experts, frozenset(other))


def matches(name: str, target: str) -> bool:
  """peft's list-entry rule for `target_modules` / `target_parameters`: the name or a dotted suffix."""
  return name == target or name.endswith("." + target)


def suffixes(chosen, universe) -> list[str]:
  """Short peft target strings selecting exactly `chosen` among `universe` (names): for each chosen name
  its shortest dotted suffix that no other name of `universe` has ('q_proj', 'shared_experts.gate_proj',
  'spatial_linear.fc1', 'text_moe.experts.gate_up_proj')."""
  chosen = set(chosen)
  others = [o for o in universe if o not in chosen]
  out, seen = set(), {}
  for name in sorted(chosen):
    parts = name.split(".")
    for k in range(1, len(parts) + 1):
      s = ".".join(parts[-k:])
      if s not in seen:
        seen[s] = not any(matches(o, s) for o in others)
      if seen[s]:
        out.add(s)
        break
  return sorted(out)


def target_name(path: str) -> str:
  """Our LoraConfig target (projection suffix) of a base weight path: '.../layers/0/attn/q' -> 'attn.q',
  'resampler/spatial_linear/fc1/kernel' -> 'spatial_linear.fc1'."""
  tail = path.split("/layers/")[-1].split("/", 1)[1]
  return tail.removesuffix("/kernel").replace("/", ".")
