"""Expert-parallel throughput per transport and mesh: the MoE layer (forward + backward) and a full
train step (forward + backward + AdamW) of a small MoE model.

  python benchmarks/moe_parallel.py                   # CPU: 8 fake devices
  python benchmarks/moe_parallel.py --devices 0       # use the real devices (GPU/TPU)

On CPU the ragged_all_to_all transport runs through its all_to_all emulation (XLA:CPU cannot
compile the real primitive); figures there are about correctness and overheads, not speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--devices", type=int, default=8, help="fake CPU devices (0: real devices)")
  p.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch x seq)")
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--experts", type=int, default=16)
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--meshes", default="data8,data2_expert4,expert8")
  p.add_argument("--transports", default="none,all_to_all,allgather,ragged_all_to_all")
  args = p.parse_args()
  if args.devices:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding

  from ernie_jax import ErnieForCausalLM, ModelConfig
  from ernie_jax.parallel import MeshConfig, batch_spec, make_mesh, shard_model

  n = jax.device_count()
  meshes = {"data8": dict(data=n), "data2_expert4": dict(data=n // 4, expert=4),
            "expert8": dict(data=1, expert=n)}
  cfg0 = ModelConfig(vocab_size=4096, hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                     intermediate_size=4 * args.hidden, moe_num_experts=args.experts, moe_k=args.k,
                     moe_intermediate_size=args.hidden, moe_num_shared_experts=1,
                     moe_layer_start_index=1, moe_capacity_factor=2.0)
  batch = args.tokens // args.seq
  print(f"jax {jax.__version__} {jax.default_backend()} x{n}; MoE {args.experts} experts top-{args.k}, "
        f"hidden {args.hidden}, {args.layers} layers; {batch}x{args.seq} tokens/step")

  def timeit(fn, *a):
    jax.block_until_ready(fn(*a))
    t0 = time.perf_counter()
    for _ in range(args.iters):
      jax.block_until_ready(fn(*a))
    return (time.perf_counter() - t0) / args.iters

  print(f"{'mesh':16s} {'transport':18s} {'MoE layer f+b tok/s':>20s} {'train step tok/s':>18s}")
  for mesh_name in args.meshes.split(","):
    mesh = make_mesh(MeshConfig(**meshes[mesh_name]))
    for transport in args.transports.split(","):
      cfg = cfg0.replace(moe_transport=transport)
      try:
        model = shard_model(lambda: ErnieForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
        moe = model.layer(1).mlp
        with jax.set_mesh(mesh):
          x = jax.device_put(jnp.ones((batch, args.seq, args.hidden)) * 0.1,
                             NamedSharding(mesh, batch_spec(mesh, ndim=3)))
          layer_fb = nnx.jit(nnx.grad(lambda m, x: m(x)[0].sum()))
          t_layer = timeit(layer_fb, moe, x)
          opt = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)

          @nnx.jit
          def step(model, opt, tokens):
            def loss(m):
              logits = m(tokens).logits
              return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
            g = nnx.grad(loss)(model)
            opt.update(model, g)

          tokens = jax.device_put(jnp.ones((batch, args.seq), jnp.int32), NamedSharding(mesh, batch_spec(mesh)))
          t_step = timeit(step, model, opt, tokens)
        print(f"{mesh_name:16s} {transport:18s} {args.tokens / t_layer:20.0f} {args.tokens / t_step:18.0f}")
      except Exception as e:  # report and go on with the other combinations
        print(f"{mesh_name:16s} {transport:18s} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")


if __name__ == "__main__":
  main()
