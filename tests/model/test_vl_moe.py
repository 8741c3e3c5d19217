"""Modality-isolated MoE: routing isolation (a vision token never reaches a text expert and vice
versa), the heterogeneous MoE against a direct numpy version, expert parallelism, and the VL
losses (per-modality aux / z / orthogonal, token-balanced LM loss, correction-bias update)
against direct numpy formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ernie_jax.model.vl import Ernie45VLForConditionalGeneration, VLConfig
from ernie_jax.model.moe import MoE, vl_expert_sets
from ernie_jax.train import vl_losses as vll

CFG = VLConfig.tiny(initializer_range=0.3)


# The VL objective of one batch outside the train step (the train step uses `tasks.VisionLanguage`).
def router_loss(model, out, mask=None, *, aux_coef: float = 1e-2, z_coef: float = 1e-4,
                orth_coef: float = 1e-2) -> jax.Array:
  """c_aux * L_aux + c_z * L_z + c_orth * L_orth for a `VLOutput` (0 without MoE layers)."""
  if out.router is None:
    return jnp.zeros((), jnp.float32)
  vision = jnp.zeros(out.logits.shape[:2], bool) if out.vision_mask is None else out.vision_mask
  loss = aux_coef * vll.load_balance_loss(out.router, vision, mask) + z_coef * vll.z_loss(out.router, vision, mask)
  if orth_coef:
    loss = loss + orth_coef * vll.orthogonal_loss(model)
  return loss


def vl_loss(model, batch: dict, *, image_grid_thw=None, video_grid_thw=None,
            token_balance_seqlen: float | None = None, aux_coef: float = 1e-2, z_coef: float = 1e-4,
            orth_coef: float = 1e-2):
  """The VL training objective for one batch -> (loss, metrics).

  batch: "inputs", "targets", "loss_mask" [B, S]; "positions" [B, S, 3] and "token_types" [B, S]
  (from `prepare_inputs`); optional "pixel_values" / "pixel_values_videos" with the static grids
  passed as arguments. The LM loss covers text-typed targets only and is token-balanced
  (default token_balance_seqlen = B * S); the router loss adds its gradient but not its value
  (`loss + router - stop_gradient(router)`, as the reference VL criterion does).
  """
  tokens, targets = batch["inputs"], batch["targets"]
  out = model(tokens, positions=batch.get("positions"), token_types=batch.get("token_types"),
              pixel_values=batch.get("pixel_values"), image_grid_thw=image_grid_thw,
              pixel_values_videos=batch.get("pixel_values_videos"), video_grid_thw=video_grid_thw)
  mask = batch["loss_mask"].astype(jnp.float32) * vll.text_target_mask(targets, model.config)
  balance = token_balance_seqlen or float(tokens.shape[0] * tokens.shape[1])
  lm = vll.token_balanced_lm_loss(out.logits, targets, mask, balance)
  router = router_loss(model, out, batch.get("attention_mask"), aux_coef=aux_coef, z_coef=z_coef,
                       orth_coef=orth_coef)
  return lm + router - jax.lax.stop_gradient(router), {"lm_loss": lm, "router_loss": router}


def _moe(impl="auto", **kw):
  cfg = CFG.replace(moe_impl=impl, **kw)
  moe = MoE(cfg, vl_expert_sets(cfg), rngs=nnx.Rngs(0))
  for r in (moe.text_router, moe.vision_router):
    r.correction_bias[...] = jax.random.normal(jax.random.key(7), r.correction_bias.shape) * 0.05
  return moe


def _inputs(b=4, s=8):
  x = jax.random.normal(jax.random.key(1), (b, s, CFG.hidden_size))
  vision = jax.random.bernoulli(jax.random.key(2), 0.4, (b, s))
  return x, vision


_call = nnx.jit(lambda m, x, v: m(x, v))
_call_text = nnx.jit(lambda m, x: m(x, None))


def _np_route(x, kernel, bias, k):
  logits = x @ kernel
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  idx = np.argsort(-(p + bias), axis=-1, kind="stable")[:, :k]
  w = np.take_along_axis(p, idx, -1)
  return idx, w / np.maximum(w.sum(-1, keepdims=True), 1e-12)


def _np_swiglu(x, g, u, d):
  a = x @ g
  return ((a / (1 + np.exp(-a))) * (x @ u)) @ d


def _np_moe(moe, x, vision):
  """Direct per-token reference of the heterogeneous MoE."""
  xt = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  vis = np.asarray(vision).reshape(-1)
  y = np.zeros_like(xt)
  for t in range(xt.shape[0]):
    router, experts = (moe.vision_router, moe.vision_experts) if vis[t] else (moe.text_router, moe.text_experts)
    idx, w = _np_route(xt[t:t + 1], np.asarray(router.kernel[...]), np.asarray(router.correction_bias[...]), CFG.moe_k)
    for e, we in zip(idx[0], w[0]):
      y[t] += we * _np_swiglu(xt[t], *(np.asarray(a[...])[e] for a in (experts.gate, experts.up, experts.down)))
    y[t] += _np_swiglu(xt[t], *(np.asarray(a[...]) for a in (moe.shared.gate, moe.shared.up, moe.shared.down)))
  return y.reshape(x.shape)


@pytest.mark.parametrize("impl", ["loop", "blocked", "ragged_dot"])
def test_routing_isolation_and_numpy_reference(impl):
  moe = _moe(impl)
  x, vision = _inputs()
  y, r = _call(moe, x, vision)
  np.testing.assert_allclose(y, _np_moe(moe, x, vision), rtol=2e-5, atol=2e-5)
  vis = np.asarray(vision)
  # perturbing the text experts never changes a vision token's output (and vice versa)
  for name, kept in (("text_experts", vis), ("vision_experts", ~vis)):
    experts = getattr(moe, name)
    saved = [a[...] for a in (experts.gate, experts.up, experts.down)]
    for a in (experts.gate, experts.up, experts.down):
      a[...] = a[...] + 3.0 * jax.random.normal(jax.random.key(5), a.shape)
    y2, _ = _call(moe, x, vision)
    np.testing.assert_array_equal(np.asarray(y2)[kept], np.asarray(y)[kept])
    assert np.abs(np.asarray(y2)[~kept] - np.asarray(y)[~kept]).min() > 0
    for a, v in zip((experts.gate, experts.up, experts.down), saved):
      a[...] = v
  # text-only routing (generated tokens) == every token typed text, without the vision experts
  y_text, _ = _call_text(moe, x)
  y_zero, _ = _call(moe, x, jnp.zeros_like(vision))
  np.testing.assert_allclose(y_text, y_zero, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("transport", ["all_to_all", "allgather", "ragged_all_to_all"])
def test_expert_parallel_transports_match_local(transport):
  from ernie_jax.parallel import MeshConfig, make_mesh

  x, vision = _inputs(b=8, s=4)
  local = _moe("blocked")
  want, _ = _call(local, x, vision)
  moe = _moe("blocked", moe_transport=transport, moe_capacity_factor=0.0)  # 0: nothing can drop
  mesh = make_mesh(MeshConfig(data=2, expert=4))
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
    y, r = _call(moe, xs, vision)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert int(r.text.dropped) == 0 and int(r.vision.dropped) == 0


# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def forward_out():
  model = Ernie45VLForConditionalGeneration(CFG, rngs=nnx.Rngs(0))
  rs = np.random.RandomState(0)
  tokens = rs.randint(3, 99, (2, 12))
  tokens[0, 2:7] = [CFG.image_start_token_id, CFG.image_token_id, CFG.image_token_id, CFG.image_token_id,
                    CFG.image_end_token_id]
  tokens[1, 5:8] = [CFG.video_start_token_id, CFG.video_token_id, CFG.video_end_token_id]
  out = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens))
  return model, tokens, out


def _np_lb(probs, idx_unbiased, mask, num_experts):
  n = max(mask.sum(), 1)
  me = (probs * mask[:, None]).sum(0) / n
  hits = np.zeros_like(probs)
  for t in range(len(mask)):
    hits[t, idx_unbiased[t]] = 1
  ce = (hits * mask[:, None]).sum(0) / n
  return num_experts * (me * ce).sum()


def test_per_modality_router_losses_match_numpy(forward_out):
  model, tokens, out = forward_out
  vis = np.isin(tokens, CFG.vision_token_ids).reshape(-1)
  assert (np.asarray(out.vision_mask).reshape(-1) == vis).all() and vis.sum() == 8
  pad = np.ones(tokens.shape, np.float32)
  pad[1, -2:] = 0
  pad = pad.reshape(-1)
  lb = zl = 0.0
  for r, m in ((out.router.text, (~vis) * pad), (out.router.vision, vis * pad)):
    probs, logits = np.asarray(r.probs, np.float64), np.asarray(r.logits, np.float64)
    for l in range(probs.shape[0]):
      top = np.argsort(-probs[l], axis=-1, kind="stable")[:, :CFG.moe_k]
      lb += _np_lb(probs[l], top, m, CFG.moe_num_experts)
      lse = np.log(np.exp(logits[l]).sum(-1))
      zl += (lse ** 2 * m).sum() / m.sum()
  pad2 = pad.reshape(tokens.shape)
  np.testing.assert_allclose(vll.load_balance_loss(out.router, out.vision_mask, pad2), lb, rtol=1e-5)
  np.testing.assert_allclose(vll.z_loss(out.router, out.vision_mask, pad2), zl, rtol=1e-5)
  orth = 0.0
  for kernels in vll.router_kernels(model):
    for w in np.asarray(kernels, np.float64):
      w = w.T / np.linalg.norm(w.T, axis=-1, keepdims=True)
      orth += ((w @ w.T - np.eye(w.shape[0])) ** 2).mean()
  np.testing.assert_allclose(vll.orthogonal_loss(model), orth, rtol=1e-5)
  total = router_loss(model, out, pad.reshape(tokens.shape), aux_coef=0.1, z_coef=0.01, orth_coef=0.5)
  np.testing.assert_allclose(total, 0.1 * lb + 0.01 * zl + 0.5 * orth, rtol=1e-5)


def test_token_balanced_lm_loss_value_and_gradient():
  rs = np.random.RandomState(0)
  logits = rs.randn(2, 5, 11).astype(np.float32)
  targets = rs.randint(0, 11, (2, 5))
  mask = (rs.rand(2, 5) > 0.3).astype(np.float32)
  balance = 2 * 5
  value, grad = jax.value_and_grad(vll.token_balanced_lm_loss)(jnp.asarray(logits), jnp.asarray(targets),
                                                               jnp.asarray(mask), balance)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  nll = -np.log(np.take_along_axis(p, targets[..., None], -1))[..., 0]
  np.testing.assert_allclose(value, (nll * mask).sum() / mask.sum(), rtol=1e-5)
  want = (p - np.eye(11)[targets]) * mask[..., None] / balance
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
  t = jnp.asarray([[5, CFG.image_token_id, CFG.image_end_token_id, CFG.video_start_token_id, 7]])
  np.testing.assert_array_equal(vll.text_target_mask(t, CFG), [[True, False, False, False, True]])


def test_expert_usage_and_correction_bias_update(forward_out):
  model, tokens, out = forward_out
  usage = vll.expert_usage(out.router, out.vision_mask)
  vis = np.isin(tokens, CFG.vision_token_ids).reshape(-1)
  assert usage.shape == (2, 2, CFG.moe_num_experts)
  np.testing.assert_allclose(usage[:, 0].sum(-1), (~vis).sum() * CFG.moe_k)
  np.testing.assert_allclose(usage[:, 1].sum(-1), vis.sum() * CFG.moe_k)
  m = Ernie45VLForConditionalGeneration(CFG, rngs=nnx.Rngs(0))
  before = [np.asarray(m.layer(i).mlp.vision_router.correction_bias[...]) for i in (1, 2)]
  text_before = np.asarray(m.layer(1).mlp.text_router.correction_bias[...])
  vll.update_correction_bias(m, usage, 0.1, text=False)
  for i, b in zip((1, 2), before):
    u = np.asarray(usage[i - 1, 1])
    np.testing.assert_allclose(m.layer(i).mlp.vision_router.correction_bias[...],
                               b + 0.1 * np.sign(u.mean() - u), rtol=1e-6)
  np.testing.assert_array_equal(m.layer(1).mlp.text_router.correction_bias[...], text_before)


def test_vl_training_steps_reduce_the_loss():
  import optax

  from ernie_jax.model.vl import prepare_inputs

  cfg = VLConfig.tiny(initializer_range=0.1)
  model = Ernie45VLForConditionalGeneration(cfg, rngs=nnx.Rngs(1))
  grid = (1, 4, 4)
  rs = np.random.RandomState(0)
  image = [cfg.image_start_token_id] + [cfg.image_token_id] * 4 + [cfg.image_end_token_id]
  row = [5, 6] + image + list(rs.randint(3, 99, 8))
  ids = np.array([row, row])  # the same prompt with two different images
  prep = prepare_inputs(cfg, ids, image_grid_thw=[grid, grid])
  batch = dict(inputs=jnp.asarray(ids[:, :-1]), targets=jnp.asarray(ids[:, 1:]),
               loss_mask=jnp.ones(ids[:, 1:].shape), positions=jnp.asarray(prep["positions"][:, :-1]),
               token_types=jnp.asarray(prep["token_types"][:, :-1]),
               pixel_values=jnp.asarray(rs.randn(32, 588).astype(np.float32)))
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, batch):
    (loss, metrics), grads = nnx.value_and_grad(
      lambda m: vl_loss(m, batch, image_grid_thw=(grid, grid)), has_aux=True)(model)
    opt.update(model, grads)
    return loss, metrics, grads

  loss0, metrics, grads = step(model, opt, batch)
  assert np.isfinite(float(loss0)) and float(metrics["router_loss"]) > 0
  np.testing.assert_allclose(loss0, metrics["lm_loss"], rtol=1e-6)  # router loss: gradient only
  g = grads.groups[1].blocks.layers[0].mlp
  for part in (g.text_experts.gate, g.vision_experts.gate, g.text_router.kernel, g.vision_router.kernel,
               grads.vision_model.blocks.qkv.kernel, grads.resampler.temporal_linear.fc1.kernel):
    assert float(jnp.abs(part[...]).max()) > 0
  for _ in range(8):
    loss, _, _ = step(model, opt, batch)
  assert float(loss) < 0.7 * float(loss0)


def test_every_remat_policy_gives_the_same_gradients():
  """VL shares the text decoder stack, so all remat policies (incl. the named-save ones) apply."""
  from ernie_jax.config.base import REMATS

  tokens = jnp.asarray(np.random.RandomState(0).randint(3, CFG.vocab_size, (2, 8)), jnp.int32)
  tokens = tokens.at[:, 2:4].set(CFG.image_start_token_id)  # some tokens routed to the vision experts

  def grads(remat):
    model = Ernie45VLForConditionalGeneration(CFG.replace(remat=remat), rngs=nnx.Rngs(0))
    loss = lambda m: jnp.sum(m(tokens).logits ** 2)
    return nnx.jit(lambda m: nnx.value_and_grad(loss)(m))(model)

  want_loss, want = grads("none")
  for remat in REMATS[1:]:
    loss, got = grads(remat)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
