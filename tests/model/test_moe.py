"""MoE routing and the grouped-matmul implementations against the per-expert loop oracle."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax import ErnieForCausalLM, ModelConfig
from ernie_jax.config import LoraConfig
from ernie_jax.model import lora
from ernie_jax.model.moe import dispatch, expert_loop
from ernie_jax.model.moe.dispatch import experts_loop, experts_sorted
from ernie_jax.model.moe.router import route
from ernie_jax.train.tasks import merge_here
from tests.helpers import scan_residuals


def _problem(seed=0, tokens=40, hidden=16, inter=12, experts=6, k=3, skew=True):
  rs = np.random.RandomState(seed)
  x = jnp.asarray(rs.randn(tokens, hidden), jnp.float32)
  gate = jnp.asarray(rs.randn(experts, hidden, inter) / 4, jnp.float32)
  up = jnp.asarray(rs.randn(experts, hidden, inter) / 4, jnp.float32)
  down = jnp.asarray(rs.randn(experts, inter, hidden) / 4, jnp.float32)
  logits = rs.randn(tokens, experts) + (np.arange(experts) * 1.5 if skew else 0)  # uneven groups
  idx = jnp.asarray(np.argsort(-logits, -1)[:, :k], jnp.int32)
  w = jax.nn.softmax(jnp.asarray(rs.randn(tokens, k), jnp.float32))
  return x, gate, up, down, idx, w


@pytest.mark.parametrize("impl", ["ragged_dot", "blocked"])
def test_grouped_equals_loop_values_and_grads(impl):
  args = _problem()
  counts = np.bincount(np.asarray(args[4]).ravel(), minlength=6)
  assert counts.min() == 0 or counts.max() > 2 * counts.min()  # the groups really are uneven

  def loss(fn, x, gate, up, down, w, idx):
    y = fn(x, gate, up, down, idx, w)
    return jnp.sum(jnp.sin(y))  # non-linear so every output element's gradient differs

  oracle = lambda *a: experts_loop(*a)
  fast = lambda *a: experts_sorted(*a, impl=impl)
  x, gate, up, down, idx, w = args
  np.testing.assert_allclose(fast(x, gate, up, down, idx, w), oracle(x, gate, up, down, idx, w),
                             rtol=1e-5, atol=1e-5)
  g_fast = jax.grad(lambda *p: loss(fast, *p, idx), argnums=(0, 1, 2, 3, 4))(x, gate, up, down, w)
  g_ref = jax.grad(lambda *p: loss(oracle, *p, idx), argnums=(0, 1, 2, 3, 4))(x, gate, up, down, w)
  for name, a, b in zip(("x", "gate", "up", "down", "weights"), g_fast, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"grad wrt {name}")


def test_blocked_handles_empty_experts_and_one_token():
  x, gate, up, down, idx, w = _problem(tokens=1, k=2)
  np.testing.assert_allclose(experts_sorted(x, gate, up, down, idx, w, impl="blocked"),
                             experts_loop(x, gate, up, down, idx, w), rtol=1e-5, atol=1e-6)


def test_route_matches_spec_formula():
  rs = np.random.RandomState(0)
  x = rs.randn(10, 8).astype(np.float32)
  kernel = rs.randn(8, 6).astype(np.float32)
  bias = (rs.randn(6) * 0.2).astype(np.float32)
  r = route(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), k=2, norm_min=1e-12)
  logits = x.astype(np.float64) @ kernel
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  sel = np.argsort(-(p + bias), -1, kind="stable")[:, :2]  # bias for selection only
  w = np.take_along_axis(p, sel, -1)  # unbiased weights
  w /= np.maximum(w.sum(-1, keepdims=True), 1e-12)
  np.testing.assert_array_equal(np.sort(np.asarray(r.indices), -1), np.sort(sel, -1))
  order = np.argsort(np.asarray(r.indices), -1)
  np.testing.assert_allclose(np.take_along_axis(np.asarray(r.weights), order, -1),
                             np.take_along_axis(w, np.argsort(sel, -1), -1), rtol=1e-5)
  np.testing.assert_allclose(r.probs, p, rtol=1e-5)
  np.testing.assert_allclose(r.logits, logits, rtol=1e-5, atol=1e-5)


def test_route_norm_min_guards_zero_mass():
  kernel = jnp.zeros((4, 3))
  x = jnp.zeros((2, 4))
  r = route(x, kernel, None, k=1, norm_min=1e9)  # mass 1/3 < norm_min: divide by norm_min
  np.testing.assert_allclose(r.weights, np.full((2, 1), (1 / 3) / 1e9), rtol=1e-5)


def test_router_grad_flows_through_weights_not_selection():
  rs = np.random.RandomState(1)
  x = jnp.asarray(rs.randn(6, 8), jnp.float32)
  kernel = jnp.asarray(rs.randn(8, 5), jnp.float32)
  bias = jnp.asarray(rs.randn(5), jnp.float32)
  g = jax.grad(lambda b: route(x, kernel, b, 2, 1e-12).weights.sum())(bias)
  np.testing.assert_array_equal(g, np.zeros(5))  # the bias never receives gradient
  gk = jax.grad(lambda kk: (route(x, kk, bias, 2, 1e-12).weights * jnp.arange(2.0)).sum())(kernel)
  assert np.abs(np.asarray(gk)).max() > 0


def test_expert_loop_chunks_cover_every_group_and_nothing_else():
  """The CPU grouped matmul (`expert_loop`) on groups that need big chunks, tails, several small chunks and
  none, with rows past the last group (masked-out tokens): values and gradients (its own backward passes)
  against a gather of each row's weights with autodiff."""
  rs = np.random.RandomState(3)
  sizes = np.array([0, 37, 1, 40, 0, 10])
  rows, h, i = 100, 8, 6  # 88 rows in groups, 12 past them
  assert expert_loop.chunk_sizes(rows, len(sizes)) == (32, 8)
  xs = jnp.asarray(rs.randn(rows, h), jnp.float32)
  gate, up = (jnp.asarray(rs.randn(len(sizes), h, i) / 3, jnp.float32) for _ in range(2))
  down = jnp.asarray(rs.randn(len(sizes), i, h) / 3, jnp.float32)
  group = np.repeat(np.arange(len(sizes)), sizes)
  inside = jnp.asarray(np.arange(rows) < sizes.sum())[:, None]
  g_of = jnp.asarray(np.concatenate([group, np.zeros(rows - sizes.sum(), int)]))

  def reference(xs, gate, up, down):
    a = jnp.einsum("rh,rhi->ri", xs, gate[g_of])
    hid = jnp.where(inside, jax.nn.silu(a) * jnp.einsum("rh,rhi->ri", xs, up[g_of]), 0)
    return jnp.where(inside, jnp.einsum("ri,rih->rh", hid, down[g_of]), 0)

  def looped(xs, gate, up, down):
    gs = jnp.asarray(sizes, jnp.int32)
    return expert_loop.matmul(expert_loop.swiglu_hidden(xs, gate, up, gs), down, gs)

  args = (xs, gate, up, down)
  np.testing.assert_allclose(looped(*args), reference(*args), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(looped(*args))[sizes.sum():] == 0)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
  got = jax.grad(loss(looped), argnums=(0, 1, 2, 3))(*args)
  want = jax.grad(loss(reference), argnums=(0, 1, 2, 3))(*args)
  for name, a, b in zip(("xs", "gate", "up", "down"), got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_gpu_ragged_dot_lowering_is_chosen_by_what_jax_ships(monkeypatch):
  """On GPU, ragged_dot goes through jax's Pallas-Triton kernels when this jax has them (a process-wide flag),
  else the line names the fallback; other backends are left alone."""
  flag = dispatch.PALLAS_RAGGED_DOT_FLAG
  before = jax.config.values.get(flag)
  assert "own lowering" in dispatch.use_gpu_grouped_matmul_kernel("ragged_dot", "tpu")
  assert dispatch.use_gpu_grouped_matmul_kernel("blocked", "gpu") is None  # not a ragged_dot model: nothing to say
  monkeypatch.setattr(dispatch, "has_pallas_ragged_dot", lambda: False)
  assert "moe_impl=blocked" in dispatch.use_gpu_grouped_matmul_kernel("ragged_dot", "gpu")
  assert jax.config.values.get(flag) == before
  if flag in jax.config.values:  # the flag exists from jax 0.10 on; the kernels behind it in later versions
    monkeypatch.setattr(dispatch, "has_pallas_ragged_dot", lambda: True)
    try:
      assert "Pallas-Triton" in dispatch.use_gpu_grouped_matmul_kernel("ragged_dot", "gpu")
      assert jax.config.values[flag] is True
    finally:
      jax.config.update(flag, before)



@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
def test_save_dots_experts_keeps_the_expert_values_and_the_gradients(impl):
  """remat=save_dots_experts: the same gradients as no remat, and the routed experts' gate/up outputs and
  per-assignment outputs are among the saved residuals (save_dots recomputes them: grouped matmuls are no
  plain dots)."""
  cfg = ModelConfig.tiny_moe(num_hidden_layers=2, moe_layer_start_index=0, moe_impl=impl)
  tokens = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 16)), jnp.int32)

  def run(remat):
    graphdef, params, rest = nnx.split(ErnieForCausalLM(cfg.replace(remat=remat), rngs=nnx.Rngs(0)), nnx.Param, ...)
    f = lambda p: jnp.sum(merge_here(graphdef, p, rest)(tokens).logits ** 2)
    return jax.jit(jax.grad(f))(params), collections.Counter(shape for _, shape in scan_residuals(f, params))

  want, _ = run("none")
  got, kept = run("save_dots_experts")
  _, kept_dots = run("save_dots")
  rows, layers = tokens.size * cfg.moe_k, cfg.num_hidden_layers  # (no expert parallelism: k rows per token)
  assert kept - kept_dots == collections.Counter({(layers, rows, cfg.moe_intermediate_size): 2,  # gate, up
                                                  (layers, rows, cfg.hidden_size): 1})  # expert outputs
  assert not kept_dots - kept
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_save_dots_experts_with_expert_lora_keeps_the_summed_projections():
  """LoRA on the routed experts (moe_impl=blocked runs them as a lax.map over row blocks): save_dots keeps
  each block's base and adapter dots of gate and up; save_dots_experts keeps their sums (named moe_gate_up)
  instead, two values fewer per layer, and the per-assignment outputs; gradients equal no remat."""
  cfg = ModelConfig.tiny_moe(num_hidden_layers=2, moe_layer_start_index=0, moe_impl="blocked")
  tokens = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 16)), jnp.int32)

  def run(remat):
    model = ErnieForCausalLM(cfg.replace(remat=remat), rngs=nnx.Rngs(0))
    lora.apply_lora(model, LoraConfig(rank=4, targets=("experts",)), rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    f = lambda p: jnp.sum(merge_here(graphdef, p, rest)(tokens).logits ** 2)
    return jax.jit(jax.grad(f))(params), collections.Counter(shape for _, shape in scan_residuals(f, params))

  want, _ = run("none")
  got, kept = run("save_dots_experts")
  _, kept_dots = run("save_dots")
  rows, layers, i = tokens.size * cfg.moe_k, cfg.num_hidden_layers, cfg.moe_intermediate_size
  block = dispatch._block_size(rows, cfg.moe_num_experts)
  blocks = -(-rows // block) + cfg.moe_num_experts
  assert kept_dots[(layers, blocks, block, i)] == 4 and kept[(layers, blocks, block, i)] == 2
  assert kept[(layers, rows, cfg.hidden_size)] == 1  # the expert outputs before the combine
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
