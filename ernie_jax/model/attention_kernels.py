"""Fused causal attention kernels for training and scoring (no KV cache), chosen by `model.attention_impl`:

* "xla": `attention.causal_attend`, query blocks in plain JAX (every backend; the CPU path);
* "splash": the Pallas splash-attention kernel for TPU (`jax.experimental.pallas.ops.tpu.splash_attention`):
  flash attention that skips fully masked blocks, with packed documents as segment ids in the kernel (no
  [S, S] mask in memory). Off TPU it runs in Pallas interpret mode (correct and slow: for tests);
* "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash attention on NVIDIA GPUs
  (bfloat16 / float16 only). Packed documents enter as a boolean [B, 1, S, S] mask, which cuDNN reads
  from memory (slower than the unpacked causal case, which it generates in the kernel);
* "auto": splash on TPU, xla elsewhere (cuDNN is opt-in: it refuses float32).

All take q [B, S, N, D], k / v [B, S, K, D] (N = K * G query heads grouped by kv head) and optional
segment_ids [B, S], and return [B, S, N, D] with softmax(q k^T / sqrt(D)) v over the keys t <= s of the
same segment. Under a mesh, splash runs inside `jax.shard_map` (a Pallas call is not partitioned by
GSPMD): batch and heads split as the activation rules say, the sequence whole on each device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ernie_jax.parallel.sharding import DEFAULT_RULES, logical_to_spec

try:  # present in every jax this project supports; kept optional so a missing Pallas only disables splash
  from jax.experimental.pallas.ops.tpu import splash_attention as _splash
except ImportError:  # pragma: no cover - depends on the installed jax
  _splash = None

QKV_AXES = ("batch", "length", "act_heads", None)


def resolve(impl: str, backend: str | None = None) -> str:
  """'auto' -> 'splash' on TPU, 'xla' elsewhere; an explicit choice is kept."""
  if impl != "auto":
    return impl
  return "splash" if (backend or jax.default_backend()) == "tpu" else "xla"


def splash_block(seq: int) -> int:
  """Query / key block of the splash kernel: 512 when the (padded) sequence allows, else 256 or 128."""
  return next(b for b in (512, 256, 128) if seq % b == 0)


@functools.lru_cache(maxsize=32)
def _splash_kernel(seq: int, groups: int, block: int, interpret: bool):
  """A kernel for one kv head: q [G, S, D], k / v [S, D] (cached: its mask tables are built on the host)."""
  mask = _splash.MultiHeadMask([_splash.CausalMask((seq, seq)) for _ in range(groups)])
  sizes = _splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                             block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  with jax.ensure_compile_time_eval():  # its tables become constants, never tracers of the trace that built it
    return _splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash_local(q, k, v, segment_ids, *, interpret: bool):
  """Splash attention on local arrays (one device's batch rows and heads)."""
  b, s, n, d = q.shape
  kv = k.shape[2]
  pad = -s % 128  # the kernel tiles the sequence in 128-multiples: pad at the end (causality hides the padding)
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
    if segment_ids is not None:  # the padded rows form their own segment (they see only themselves)
      segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).min)
  sp = s + pad
  kernel = _splash_kernel(sp, n // kv, splash_block(sp), interpret)
  qh = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, sp, kv, n // kv, d).transpose(0, 2, 3, 1, 4)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]
  if segment_ids is None:
    per_head = lambda qq, kk, vv: kernel(qq, kk, vv)  # noqa: E731
    out = jax.vmap(jax.vmap(per_head))(qh, kh, vh)
  else:
    seg = segment_ids.astype(jnp.int32)
    per_head = lambda qq, kk, vv, ss: kernel(qq, kk, vv, segment_ids=_splash.SegmentIds(ss, ss))  # noqa: E731
    out = jax.vmap(jax.vmap(per_head, in_axes=(0, 0, 0, None)))(qh, kh, vh, seg)
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, sp, n, d)  # [B, K, G, S, D] -> [B, S, N, D]
  return out[:, :s]


def splash_attend(q, k, v, segment_ids=None, *, rules=None, interpret: bool | None = None):
  """Causal (+segment) attention with the TPU splash kernel; under a mesh, inside shard_map.

  interpret: Pallas interpret mode (default: on unless the backend is TPU)."""
  if _splash is None:
    raise RuntimeError("model.attention_impl='splash' needs jax.experimental.pallas.ops.tpu.splash_attention, "
                       f"which jax {jax.__version__} does not provide: use attention_impl='xla'")
  interpret = jax.default_backend() != "tpu" if interpret is None else interpret
  local = functools.partial(_splash_local, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return local(q, k, v, segment_ids)
  rules = DEFAULT_RULES if rules is None else rules
  qs = logical_to_spec(QKV_AXES, q.shape, rules, mesh, what="splash attention q")
  ks = logical_to_spec(QKV_AXES, k.shape, rules, mesh, what="splash attention k/v")
  if qs[1] is not None:
    raise ValueError(f"model.attention_impl='splash' needs the whole sequence on each device, but the rule for "
                     f"'length' splits it over {qs[1]!r}: map 'length' to None or use attention_impl='xla'")
  seg_spec = jax.sharding.PartitionSpec(qs[0], None)
  if segment_ids is None:
    fn = lambda q, k, v: local(q, k, v, None)  # noqa: E731
    return jax.shard_map(fn, mesh=mesh, in_specs=(qs, ks, ks), out_specs=qs, check_vma=False)(q, k, v)
  return jax.shard_map(local, mesh=mesh, in_specs=(qs, ks, ks, seg_spec), out_specs=qs,
                       check_vma=False)(q, k, v, segment_ids)


def fused_attend(impl: str, q, k, v, segment_ids=None, *, rules=None):
  """The kernel `impl` ('splash' or 'cudnn'; 'xla' is `attention.causal_attend`)."""
  if impl == "splash":
    return splash_attend(q, k, v, segment_ids, rules=rules)
  if impl == "cudnn":
    return cudnn_attend(q, k, v, segment_ids)
  raise ValueError(f"no fused attention kernel {impl!r}: expected 'splash' or 'cudnn'")


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """[B, 1, S, S] boolean: query s and key t belong to the same segment (causality is applied apart)."""
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def cudnn_attend(q, k, v, segment_ids=None, *, implementation: str = "cudnn"):
  """Causal (+segment) attention through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU).

  implementation: passed on ('xla' runs the same call anywhere: what the CPU tests check)."""
  mask = None if segment_ids is None else segment_mask(segment_ids)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)
