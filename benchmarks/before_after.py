"""Before/after check for refactors: logits of the text dense, text MoE and VL (with an image) models,
and the first 10 pretraining losses of the tiny text MoE and tiny VL configs, saved to one .npz and
compared bit for bit with a saved reference.

  python benchmarks/before_after.py --out /tmp/before.npz            # on the old commit
  python benchmarks/before_after.py --out /tmp/after.npz --compare /tmp/before.npz

The models come from transformers (random tiny configs, the test suite's golden builders, saved with
`save_pretrained`) and are read with `ernie_jax.from_pretrained`, so the check spans loading and the
forward pass. Exit status 1 when any array differs in a single bit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import ernie_jax  # noqa: E402
from ernie_jax.model.vl import forward as vl_forward  # noqa: E402
from experiments import pretrain  # noqa: E402
from experiments.configs import tiny, tiny_vl  # noqa: E402
from tests import hf_reference as ref  # noqa: E402
from tests import vl_reference as vref  # noqa: E402


def logits(tmp: str) -> dict[str, np.ndarray]:
  out = {}
  tokens = ref.random_tokens(128, (2, 12), seed=3)
  for kind in ("dense", "moe"):
    path = ref.save(ref.build(kind, seed=1), os.path.join(tmp, kind))
    model = ernie_jax.from_pretrained(path)
    out[f"logits_{kind}"] = np.asarray(model(jax.numpy.asarray(tokens)).logits)
  torch_vl = vref.build(seed=0)
  torch_vl.save_pretrained(os.path.join(tmp, "vl"))
  model = ernie_jax.from_pretrained(os.path.join(tmp, "vl"))
  grid = (1, 4, 6)
  ids = np.array([[5, 6] + vref.image_span(grid) + [7, 8, 9]])
  res = vl_forward(model, ids, pixel_values=vref.pixels([grid], seed=2), image_grid_thw=[grid])
  out["logits_vl_image"] = np.asarray(res.logits)
  out["logits_vl_text"] = np.asarray(vl_forward(model, ids[:, :2]).logits)
  return out


def losses(tmp: str) -> dict[str, np.ndarray]:
  out = {}
  for name, module in (("tiny", tiny), ("tiny_vl", tiny_vl)):
    c = module.get_config()
    c.workdir = os.path.join(tmp, name)
    c.steps = 10
    c.metrics.log_every = 1
    c.checkpoint.every_steps = 1000
    c.compilation_cache_dir = ""
    c.metrics.progress_bar = False
    c.metrics.tensorboard = False
    pretrain.train(c)
    with open(os.path.join(c.workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    out[f"losses_{name}"] = np.array([r["loss"] for r in rows if "loss" in r], np.float64)
  return out


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  p.add_argument("--compare", default=None, help="a reference .npz written by this script")
  p.add_argument("--skip-training", action="store_true")
  a = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    res = logits(tmp)
    if not a.skip_training:
      res.update(losses(tmp))
  np.savez(a.out, **res)
  for k, v in res.items():
    print(f"{k}: shape {v.shape}, sum {float(np.sum(v, dtype=np.float64)):.10g}")
  if a.compare is None:
    return 0
  want = np.load(a.compare)
  bad = 0
  for k in want.files:
    if k not in res:
      print(f"{k}: not computed here")
      continue
    same = want[k].shape == res[k].shape and np.array_equal(want[k].view(np.uint8), res[k].view(np.uint8))
    bad += not same
    diff = "" if same or want[k].shape != res[k].shape else f" (max |diff| {np.abs(want[k] - res[k]).max():.3g})"
    print(f"{k}: {'bit-identical' if same else 'DIFFERENT'}{diff}")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
