"""Logit and per-component parity with transformers' ERNIE 4.5 classes (tiny random configs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ernie_jax
from ernie_jax.model.layers import apply_rope, rope_angles
from tests import hf_reference as ref

TOL = 1e-5  # max |Δ| <= TOL * max |reference| in fp32

DENSE_CASES = {
  "dense_tied": dict(),
  "dense_untied_3layers": dict(tie_word_embeddings=False, num_hidden_layers=3, num_key_value_heads=2),
}
MOE_CASES = {
  # start 0, k=1, no shared experts, tied
  "moe_start0_k1_shared0": dict(num_hidden_layers=2, moe_layer_start_index=0, moe_k=1,
                                moe_num_shared_experts=0),
  # start 2 (two dense layers first), k=3, two shared experts, untied head
  "moe_start2_k3_shared2_untied": dict(num_hidden_layers=4, moe_layer_start_index=2, moe_k=3,
                                       moe_num_shared_experts=2, tie_word_embeddings=False),
  # interval 2: layers 1, 3 MoE -> groups [dense, moe] x2 + [dense]
  "moe_interval2_k2_shared1": dict(num_hidden_layers=5, moe_layer_start_index=1, moe_layer_interval=2),
  # interval 2 with an end index before the last layer, k=4
  "moe_interval2_end3_k4": dict(num_hidden_layers=6, moe_layer_start_index=0, moe_layer_interval=2,
                                moe_layer_end_index=3, moe_k=4),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (torch model, saved directory); built once per module."""
  out = {}
  for i, (name, kw) in enumerate({**DENSE_CASES, **MOE_CASES}.items()):
    model = ref.build("dense" if name.startswith("dense") else "moe", seed=i, **kw)
    out[name] = (model, ref.save(model, tmp_path_factory.mktemp(name)))
  return out


def _assert_close(ours, theirs, tol=TOL, what="logits"):
  ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  err, scale = np.abs(ours - theirs).max(), np.abs(theirs).max()
  assert scale > 0
  assert err <= tol * scale, f"{what}: max|Δ|={err:.3g} > {tol} x max|ref|={scale:.3g}"


@pytest.mark.parametrize("name", list(DENSE_CASES) + list(MOE_CASES))
def test_logits_match_transformers(checkpoints, name):
  torch_model, path = checkpoints[name]
  tokens = ref.random_tokens(torch_model.config.vocab_size, (2, 24), seed=1)
  expected = ref.logits(torch_model, tokens)
  model = ernie_jax.from_pretrained(path)
  out = model(jnp.asarray(tokens))
  _assert_close(out.logits, expected)
  # the untied head is really used
  assert model.config.tie_word_embeddings == torch_model.config.tie_word_embeddings
  if model.config.is_moe:
    n_moe = sum(k == "moe" for k in model.config.layer_kinds)
    assert out.router.indices.shape == (n_moe, tokens.size, model.config.moe_k)


def test_correction_bias_changes_selection(checkpoints):
  """The random correction bias must alter some top-k choices, else the bias test proves nothing."""
  torch_model, path = checkpoints["moe_start2_k3_shared2_untied"]
  model = ernie_jax.from_pretrained(path)
  tokens = ref.random_tokens(torch_model.config.vocab_size, (2, 24), seed=1)
  r = model(jnp.asarray(tokens)).router
  unbiased = jax.lax.top_k(r.probs, r.indices.shape[-1])[1]
  changed = np.any(np.sort(np.asarray(unbiased), -1) != np.sort(np.asarray(r.indices), -1), -1)
  assert changed.sum() > 0


@pytest.mark.parametrize("impl", ["loop", "blocked", "ragged_dot"])
def test_moe_impls_match_transformers(checkpoints, impl):
  torch_model, path = checkpoints["moe_interval2_end3_k4"]
  tokens = ref.random_tokens(torch_model.config.vocab_size, (2, 16), seed=2)
  model = ernie_jax.from_pretrained(path, moe_impl=impl)
  _assert_close(model(jnp.asarray(tokens)).logits, ref.logits(torch_model, tokens))


# ------------------------------------------------------------------------------------------------
# Per-component parity: capture each HF submodule's input/output during a full forward pass and
# feed the same input to our component.

def _capture(torch_model, tokens):
  records = {}
  hooks = []

  def hook(name):
    def fn(module, args, kwargs, output):
      x = kwargs.get("hidden_states", args[0] if args else None)
      y = output[0] if isinstance(output, tuple) else output
      records[name] = (x.detach().float().numpy(), y.detach().float().numpy())
    return fn

  for i, layer in enumerate(torch_model.model.layers):
    for part in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
      hooks.append(getattr(layer, part).register_forward_hook(hook(f"{i}.{part}"), with_kwargs=True))
  hooks.append(torch_model.model.norm.register_forward_hook(hook("norm"), with_kwargs=True))
  try:
    ref.logits(torch_model, tokens)
  finally:
    for h in hooks:
      h.remove()
  return records


@pytest.mark.parametrize("name", ["dense_tied", "moe_start2_k3_shared2_untied"])
def test_components_match_transformers(checkpoints, name):
  torch_model, path = checkpoints[name]
  tokens = ref.random_tokens(torch_model.config.vocab_size, (2, 12), seed=3)
  rec = _capture(torch_model, tokens)
  model = ernie_jax.from_pretrained(path)
  cfg = model.config
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
  for i in range(cfg.num_hidden_layers):
    layer = model.layer(i)
    x, y = rec[f"{i}.input_layernorm"]
    _assert_close(layer.input_norm(jnp.asarray(x)), y, what=f"layer {i} input_layernorm")
    x, y = rec[f"{i}.self_attn"]
    h, _ = layer.attn(jnp.asarray(x), cos, sin, positions=positions)
    _assert_close(h, y, what=f"layer {i} attention")
    x, y = rec[f"{i}.post_attention_layernorm"]
    _assert_close(layer.post_norm(jnp.asarray(x)), y, what=f"layer {i} post_attention_layernorm")
    x, y = rec[f"{i}.mlp"]
    out = layer.mlp(jnp.asarray(x))
    _assert_close(out[0] if isinstance(out, tuple) else out, y, what=f"layer {i} {layer.kind} mlp")
  x, y = rec["norm"]
  _assert_close(model.norm(jnp.asarray(x)), y, what="final norm")


def test_rope_is_interleaved():
  """Pair (2i, 2i+1) rotates by pos * theta^(-2i/d); checked against a direct numpy formula."""
  d, theta = 8, 10000.0
  x = np.random.RandomState(0).randn(1, 3, 2, d).astype(np.float32)
  pos = np.array([[0, 1, 5]])
  cos, sin = rope_angles(jnp.asarray(pos), d, theta)
  got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
  want = np.empty_like(x)
  for i in range(d // 2):
    ang = pos[..., None] * theta ** (-2 * i / d)
    c, s = np.cos(ang), np.sin(ang)
    want[..., 2 * i] = x[..., 2 * i] * c - x[..., 2 * i + 1] * s
    want[..., 2 * i + 1] = x[..., 2 * i + 1] * c + x[..., 2 * i] * s
  np.testing.assert_allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------------------------------------
BF16_TOL = 0.05  # documented in README: bf16 compute within 5% of max |logit| of the fp32 run


@pytest.mark.parametrize("name", ["dense_tied", "moe_start2_k3_shared2_untied"])
def test_bf16_close_to_fp32(checkpoints, name):
  torch_model, path = checkpoints[name]
  tokens = ref.random_tokens(torch_model.config.vocab_size, (2, 24), seed=4)
  expected = ref.logits(torch_model, tokens)
  model = ernie_jax.from_pretrained(path, dtype="bfloat16", param_dtype="bfloat16")
  logits = model(jnp.asarray(tokens)).logits
  assert logits.dtype == jnp.float32
  assert model.embed[...].dtype == jnp.bfloat16
  _assert_close(logits, expected, tol=BF16_TOL, what="bf16 logits")
  # most next-token predictions agree
  agree = np.mean(np.argmax(np.asarray(logits), -1) == np.argmax(expected, -1))
  assert agree >= 0.9, agree


def test_bf16_checkpoint_loads(tmp_path):
  """A checkpoint saved in bf16 loads (and upcasts to fp32 params) with logits equal to the
  reference run on the same bf16-rounded weights in fp32."""
  import transformers

  bf16_path = ref.save(ref.build("moe", seed=7).to(torch.bfloat16), tmp_path / "bf16")
  rounded = transformers.Ernie4_5_MoeForCausalLM.from_pretrained(bf16_path, dtype=torch.float32).eval()
  tokens = ref.random_tokens(rounded.config.vocab_size, (1, 16), seed=5)
  model = ernie_jax.from_pretrained(bf16_path)
  assert model.embed[...].dtype == jnp.float32
  _assert_close(model(jnp.asarray(tokens)).logits, ref.logits(rounded, tokens))


def test_long_sequence_uses_chunked_attention(checkpoints):
  """S=384 > 128 takes the chunked causal path; still equal to the reference."""
  torch_model, path = checkpoints["moe_interval2_k2_shared1"]
  tokens = ref.random_tokens(torch_model.config.vocab_size, (1, 384), seed=6)
  model = ernie_jax.from_pretrained(path)
  _assert_close(model(jnp.asarray(tokens)).logits, ref.logits(torch_model, tokens))


def test_scan_unroll_gives_the_same_logits_and_gradients(checkpoints):
  """model.scan_unroll (2 of 3 repeated layers per loop iteration, a remainder; then all unrolled) changes only
  how the layer loop is compiled: transformers' logits, and the gradients of the scanned model."""
  torch_model, path = checkpoints["dense_untied_3layers"]
  tokens = jnp.asarray(ref.random_tokens(torch_model.config.vocab_size, (2, 24), seed=7))
  expected = ref.logits(torch_model, np.asarray(tokens))

  def grads(model):
    gdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: jnp.sum(nnx.merge(gdef, p, rest)(tokens).logits ** 2)  # noqa: E731
    return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

  want = grads(ernie_jax.from_pretrained(path))
  for unroll in (2, 3):
    model = ernie_jax.from_pretrained(path, scan_unroll=unroll)
    assert model.config.scan_unroll == unroll
    _assert_close(model(tokens).logits, expected)
    for a, b in zip(grads(model), want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
