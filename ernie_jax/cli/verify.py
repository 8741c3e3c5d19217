"""`--verify`: our model against the transformers reference, and the references themselves.

`verify(orbax_dir, hf_dir)` compares the logits of our model loaded from an Orbax checkpoint with
transformers' on an HF checkpoint (fp32 compute; random tokens, or for VL two prompts with an
image each). For Paddle sources the reference HF checkpoint is made by `paddle_reference` with the
official Paddle -> HF rules (ERNIE tools/paddle2torch/tran_4_5t.py, tran_4_5t_vl.py), written as
string rules independent of the conversion tables, so a mistake in a table cannot hide in both
sides of the comparison. Needs torch + transformers. Sits above `ernie_jax.loading`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from ernie_jax.config import ModelConfig
from ernie_jax.interop import hf_config
from ernie_jax.interop import paddle, paddle_vl
from ernie_jax.interop import safetensors_writer as stw
from ernie_jax.interop.convert import DEFAULT_SHARD_BYTES
from ernie_jax.interop.sources import open_source
from ernie_jax.loading import load_model
from ernie_jax.config import VLConfig
from ernie_jax.model.vl.lm_vl import forward


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclass
class VerifyResult:
  max_abs: float
  rel: float  # max_abs / max |reference logit|
  top1: float  # fraction of positions whose argmax agrees
  tolerance: float
  min_top1: float

  @property
  def ok(self) -> bool:
    return self.rel <= self.tolerance and self.top1 >= self.min_top1

  def __str__(self):
    return (f"max |Δ logits| = {self.max_abs:.3e} ({self.rel:.3e} of max |ref|, tolerance {self.tolerance:.0e}); "
            f"top-1 agreement {self.top1:.2%} (need ≥ {self.min_top1:.0%}): {'OK' if self.ok else 'FAILED'}")


def verify(orbax_dir, hf_dir, *, lossy: bool = False, tolerance: float | None = None, batch: int = 2,
           seq: int = 16, seed: int = 0) -> VerifyResult:
  """Logits of our model loaded from `orbax_dir` vs transformers' from `hf_dir` (both fp32
  compute) on random token sequences (for a VL model: two prompts with an image each, see
  `vl_reference_logits`). Needs torch + transformers."""
  try:
    import torch
    import transformers
  except ImportError:
    raise RuntimeError("--verify needs torch and transformers (pip install 'ernie-jax[convert]')") from None
  ours = load_model(orbax_dir, dtype="float32", param_dtype="float32")
  cfg = ours.config
  if cfg.is_vl:
    a, b = vl_reference_logits(ours, hf_dir, seed=seed)
    return _verify_result(a, b, lossy, tolerance)
  tokens = np.random.RandomState(seed).randint(min(3, cfg.vocab_size - 1), cfg.vocab_size, size=(batch, seq))
  a = np.asarray(ours(jnp.asarray(tokens, jnp.int32)).logits, np.float64)
  del ours
  try:
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  except TypeError:  # transformers 4.x
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
  with torch.no_grad():
    b = ref.eval()(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy().astype(np.float64)
  return _verify_result(a, b, lossy, tolerance)


def _verify_result(a: np.ndarray, b: np.ndarray, lossy: bool, tolerance: float | None) -> VerifyResult:
  diff = float(np.abs(a - b).max())
  tol = tolerance if tolerance is not None else (5e-2 if lossy else 1e-4)
  return VerifyResult(diff, diff / max(float(np.abs(b).max()), 1e-30),
                      float((a.argmax(-1) == b.argmax(-1)).mean()), tol, 0.9 if lossy else 0.99)


@contextlib.contextmanager
def paddle_reference(src: str, cfg: ModelConfig, *, allow_pickle: bool = False, near: str | None = None):
  """A temporary HF checkpoint made from a Paddle one by the official Paddle -> HF rules
  (`paddle_reference_tensors`, or `paddle_vl_reference_tensors` for VL; independent of the
  conversion tables), for `verify`."""
  reader = open_source(src, allow_pickle=allow_pickle)
  work = tempfile.mkdtemp(prefix=".paddle-reference-", dir=near)
  try:
    variant = paddle.detect_variant(reader.keys()) or "native"
    get = lambda n: paddle.decode(reader.get(n), reader.tensors[n].dtype)
    names = sorted(reader.keys(), key=_natural_key)
    vl = cfg.is_vl
    tensors = dict(paddle_vl_reference_tensors(get, names, cfg) if vl
                   else paddle_reference_tensors(get, names, cfg, variant))
    specs = [stw.TensorSpec(n, stw.tag_of(x.dtype), tuple(x.shape)) for n, x in tensors.items()]
    stw.write_checkpoint(work, specs, tensors.__getitem__, DEFAULT_SHARD_BYTES)
    tensors.clear()
    with open(os.path.join(work, "config.json"), "w") as f:
      json.dump(hf_config.write(cfg, "float32"), f)
    yield work
  finally:
    reader.close()
    shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The official Paddle -> HF rule sets (ERNIE tools/paddle2torch/tran_4_5t.py, tran_4_5t_vl.py)
def paddle_reference_tensors(get, names, cfg: ModelConfig, variant: str = "native"):
  """Yield (HF name, numpy array in torch layout) for every Paddle tensor name in `names`.

  get(name) returns the tensor already bit-cast (see `paddle.decode`).
  """
  prefix = paddle.PREFIX[variant]
  d, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
  for name in names:
    if cfg.tie_word_embeddings and name == "lm_head.weight":
      continue
    x = get(name)
    hf_name = "model." + name[len(prefix):] if name.startswith(prefix) else name
    if "qkv_proj" in name:
      if variant == "paddleformers":
        g = nh // nkv
        grouped = x.reshape(x.shape[0], nkv, g + 2, d)
        q = grouped[:, :, :g].reshape(x.shape[0], -1)
        k, v = grouped[:, :, g].reshape(x.shape[0], -1), grouped[:, :, g + 1].reshape(x.shape[0], -1)
      else:
        q, k, v = np.split(x, [nh * d, nh * d + nkv * d], axis=-1)
      for part, new in zip((q, k, v), ("q_proj", "k_proj", "v_proj")):
        yield hf_name.replace("qkv_proj", new), np.ascontiguousarray(part.T)
    elif "up_gate_proj" in name:
      gate, up = np.split(x, 2, axis=-1)
      yield hf_name.replace("up_gate_proj", "gate_proj"), np.ascontiguousarray(gate.T)
      yield hf_name.replace("up_gate_proj", "up_proj"), np.ascontiguousarray(up.T)
    elif any(k in name for k in ("down_proj.weight", "o_proj.weight", "gate.weight",
                                  "mtp_linear_proj")) or name == "lm_head.weight":
      yield hf_name, np.ascontiguousarray(x.T)
    else:
      yield hf_name, x


def paddle_vl_reference_tensors(get, names, cfg: VLConfig):
  """Yield (HF name, numpy array in torch layout) for every Paddle VL tensor name in `names`.

  Rules: `ernie.` -> `model.`; outside the vision tower split `qkv_proj` into [Q | K | V] and
  `up_gate_proj` in halves [gate | up]; transpose every 2-D `.weight` except `embed_tokens`,
  `lm_head` and the routers (`.gate.`). One deviation: an untied `lm_head` [H, V] is transposed
  (the text rule, tran_4_5t.py; the VL script only meets tied heads). get(name) returns the
  tensor already bit-cast (`paddle.decode`)."""
  nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  for name in names:
    if cfg.tie_word_embeddings and name == "lm_head.weight":
      continue
    x = get(name)
    hf_name = name.replace(paddle_vl.PREFIX, "model.")
    if "vision" not in name and "qkv_proj" in name:
      for part, new in zip(np.split(x, [nh * d, nh * d + nkv * d], axis=-1), ("q_proj", "k_proj", "v_proj")):
        yield hf_name.replace("qkv_proj", new), np.ascontiguousarray(part.T)
    elif "vision" not in name and "up_gate_proj" in name:
      gate, up = np.split(x, 2, axis=-1)
      yield hf_name.replace("up_gate_proj", "gate_proj"), np.ascontiguousarray(gate.T)
      yield hf_name.replace("up_gate_proj", "up_proj"), np.ascontiguousarray(up.T)
    elif (name.endswith(".weight") and x.ndim == 2 and "embed_tokens" not in name and ".gate." not in name
          and (name != "lm_head.weight" or not cfg.tie_word_embeddings)):
      yield hf_name, np.ascontiguousarray(x.T)
    else:
      yield hf_name, x


# --------------------------------------------------------------------------------------------------
def vl_reference_logits(model, hf_dir, *, seed: int = 0):
  """(ours, transformers') fp32 logits on a two-row prompt with one image per row (a square and a
  non-square grid) between random text tokens: `verify` for VL checkpoints."""
  import torch
  import transformers

  cfg = model.config
  m = cfg.vision.spatial_merge_size
  grids = [(1, 2 * m, 2 * m), (1, 2 * m, 3 * m)]
  rs = np.random.RandomState(seed)
  text = np.setdiff1d(np.arange(min(3, cfg.vocab_size - 1), cfg.vocab_size), cfg.vision_token_ids)
  n_img = [h * w // (m * m) for _, h, w in grids]
  seq = max(n_img) + 10
  rows = []
  for n in n_img:
    r = rs.choice(text, seq - n - 2).tolist()
    rows.append(r[:3] + [cfg.image_start_token_id] + [cfg.image_token_id] * n + [cfg.image_end_token_id] + r[3:])
  ids = np.asarray(rows)
  pixels = rs.randn(sum(t * h * w for t, h, w in grids), cfg.vision.patch_dim).astype(np.float32)
  ours = np.asarray(forward(model, ids, pixel_values=pixels, image_grid_thw=grids).logits, np.float64)
  ref = transformers.Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(os.fspath(hf_dir), dtype=torch.float32)
  image = ids == cfg.image_token_id
  vision = np.isin(ids, [cfg.image_token_id, cfg.image_start_token_id, cfg.image_end_token_id])
  with torch.no_grad():
    out = ref.eval()(input_ids=torch.as_tensor(ids), mm_token_type_ids=torch.as_tensor(image.astype(np.int64)),
                     moe_mm_token_type_ids=torch.as_tensor(vision.astype(np.int64)),
                     pixel_values=torch.as_tensor(pixels), image_grid_thw=torch.as_tensor(grids))
  return ours, out.logits.float().numpy().astype(np.float64)
