"""ERNIE 4.5 VL forward throughput, ernie_jax vs transformers, same weights, same inputs, on CPU.

  python benchmarks/vl_forward.py                       # small config (see the flags)
  python benchmarks/vl_forward.py --images 8 --image-size 224 --text 128 --iters 3

Two measurements for each implementation:
* vision: ViT + resampler on `--images` images of `--image-size`^2 pixels -> images/s;
* full: vision + language-model forward of a batch of prompts (one image each + `--text` text
  tokens) -> prompt tokens/s.
Prints both, the ratios (ours / transformers) and max |Δ logits| / max |logits| as a sanity check.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _time(fn, iters):
  fn()  # warm-up / compile
  t = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - t) / iters


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=4, help="images per batch (one per prompt)")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--text", type=int, default=96, help="text tokens per prompt")
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--k", type=int, default=2)
  p.add_argument("--vision-hidden", type=int, default=256)
  p.add_argument("--vision-depth", type=int, default=4)
  p.add_argument("--impl", default="blocked", help="MoE grouped-matmul implementation")
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from flax import nnx

  import ernie_jax
  from ernie_jax.model.vl import forward
  from ernie_jax.model.vl.rope3d import tokens_per_grid
  from ernie_jax.data import vl_preprocess as vp
  from tests import vl_reference as ref

  if args.threads:
    torch.set_num_threads(args.threads)
  h = args.hidden
  text = dict(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=args.layers, num_attention_heads=h // 64,
              num_key_value_heads=max(1, h // 256), head_dim=64, moe_num_experts=args.experts, moe_k=args.k,
              moe_intermediate_size=[h, h // 2], moe_num_shared_experts=1, vocab_size=32000,
              rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [11, 11, 10]})
  vision = dict(depth=args.vision_depth, hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                num_heads=args.vision_hidden // 64)
  torch_model = ref.build(seed=0, text=text, vision=vision)
  with tempfile.TemporaryDirectory() as d:
    torch_model.save_pretrained(d)
    model = ernie_jax.from_pretrained(d, moe_impl=args.impl)

  rs = np.random.RandomState(0)
  images = [rs.randint(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8) for _ in range(args.images)]
  pv, grids = vp.preprocess_images(images)
  n_img_tok = tokens_per_grid(grids[0], False, model.config.vision)
  rows = [list(rs.randint(3, 99, args.text // 2)) + ref.image_span(grids[0]) + list(rs.randint(3, 99, args.text // 2))
          for _ in range(args.images)]
  ids = np.array(rows)
  n_tok = ids.size
  print(f"config: LM H{h} L{args.layers} E{args.experts}x2 top-{args.k}; ViT H{args.vision_hidden} "
        f"depth {args.vision_depth}; {args.images} images of {args.image_size}px = {grids[0]} patches "
        f"({n_img_tok} LM tokens each); batch {ids.shape} = {n_tok} tokens; jax {jax.__version__}, "
        f"torch threads {torch.get_num_threads()}")

  # vision tower + resampler
  tg = torch.tensor(grids)
  tpv = torch.tensor(pv)

  def torch_vision():
    with torch.no_grad():
      return torch_model.model.get_image_features(tpv, tg).pooler_output

  graphdef, state = nnx.split(model)
  enc = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode_vision(x, grids))
  jpv = jnp.asarray(pv)
  ours_vision = lambda: jax.block_until_ready(enc(state, jpv))
  tv, ov = _time(torch_vision, args.iters), _time(ours_vision, args.iters)
  print(f"vision  transformers {args.images / tv:8.2f} images/s   ernie_jax {args.images / ov:8.2f} images/s   "
        f"ratio {tv / ov:.2f}x")

  # full forward
  def torch_full():
    return ref.forward(torch_model, ids, pixel_values=pv, image_grid=grids)

  ours_full = lambda: jax.block_until_ready(forward(model, ids, pixel_values=pv, image_grid_thw=grids).logits)
  tf, of = _time(torch_full, args.iters), _time(ours_full, args.iters)
  print(f"full    transformers {n_tok / tf:8.1f} tokens/s   ernie_jax {n_tok / of:8.1f} tokens/s   "
        f"ratio {tf / of:.2f}x  ({args.images / tf:.2f} vs {args.images / of:.2f} prompts/s)")
  want = torch_full()
  got = np.asarray(forward(model, ids, pixel_values=pv, image_grid_thw=grids).logits)
  print(f"max |Δ logits| / max |logits| = {np.abs(got - want).max() / np.abs(want).max():.2e}")


if __name__ == "__main__":
  main()
