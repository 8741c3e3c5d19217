"""Meshes, sharding rules and expert parallelism on 8 fake CPU devices: logits and gradients equal
the single-device run; capacity drops follow the documented rule; shardings follow the rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from tests.helpers import rel
from ernie_jax import ErnieForCausalLM, ModelConfig
from ernie_jax.model.moe.dispatch import experts_loop
from ernie_jax.model.moe.router import route
from ernie_jax.parallel import (DEFAULT_RULES, MeshConfig, ShardingError, batch_spec, logical_to_spec,
                                make_mesh, shard_model, state_shardings)
from ernie_jax.model.moe.transports.all_to_all import capacity, dispatch_ranks
from ernie_jax.train import moe_losses as ml
from ernie_jax.train.step import create_train_state

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

CFG = ModelConfig.tiny_moe(num_hidden_layers=3, moe_layer_start_index=1, moe_num_experts=8, moe_k=2,
                           initializer_range=0.3)
B, S = 8, 16


def _tokens():
  return jnp.asarray(np.random.RandomState(0).randint(3, CFG.vocab_size, (B, S)), jnp.int32)


def _loss(model, tokens):
  out = model(tokens)
  lm = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], tokens[:, 1:]).mean()
  aux = (1e-2 * ml.load_balance_loss(out.router) + 1e-3 * ml.z_loss(out.router)
         + 1e-2 * ml.orthogonal_loss(ml.router_kernels(model)))
  return lm + aux, out.logits


@nnx.jit
def _loss_and_grads(model, tokens):
  (loss, logits), grads = nnx.value_and_grad(_loss, has_aux=True)(model, tokens)
  return loss, logits, grads


def _reference_state(cfg):
  model = ErnieForCausalLM(cfg, rngs=nnx.Rngs(0))
  # a non-trivial correction bias so selection differs from plain top-k
  for g in model.groups:
    for layer in g.blocks.layers:
      if layer.kind == "moe":
        b = layer.mlp.router.correction_bias
        b[...] = jax.random.normal(jax.random.key(1), b.shape) * 0.05
  return nnx.split(model)


@pytest.fixture(scope="module")
def single_device():
  graphdef, state = _reference_state(CFG)
  loss, logits, grads = _loss_and_grads(nnx.merge(graphdef, state), _tokens())
  return state, (loss, logits, grads)


def _sharded(cfg, mesh_cfg):
  mesh = make_mesh(MeshConfig(**mesh_cfg))
  graphdef, state = _reference_state(cfg)
  state = jax.device_put(state, state_shardings(state, mesh))
  return mesh, nnx.merge(graphdef, state)


MESHES = {
  "data2_expert4": dict(data=2, expert=4),
  "expert8": dict(data=1, expert=8),
  "fsdp2_expert2_tensor2": dict(data=1, fsdp=2, expert=2, tensor=2),
  "data8": dict(data=8),
}


@pytest.mark.parametrize("transport, mesh_name, remat", [
  ("all_to_all", "data2_expert4", "none"), ("all_to_all", "expert8", "none"),
  ("all_to_all", "fsdp2_expert2_tensor2", "none"), ("all_to_all", "data8", "none"),
  ("allgather", "data2_expert4", "none"), ("ragged_all_to_all", "fsdp2_expert2_tensor2", "none"),
  ("none", "fsdp2_expert2_tensor2", "none"), ("none", "data8", "none"),
  # the named expert values (`moe_gate_up`, `moe_expert_out`) each transport saves for the backward pass
  ("all_to_all", "data2_expert4", "save_dots_experts"), ("allgather", "data2_expert4", "save_dots_experts"),
  ("ragged_all_to_all", "fsdp2_expert2_tensor2", "save_dots_experts"),
])
def test_logits_and_grads_match_single_device(single_device, transport, mesh_name, remat):
  ref_state, (ref_loss, ref_logits, ref_grads) = single_device
  cfg = CFG.replace(moe_transport=transport, moe_capacity_factor=0.0, remat=remat)  # 0: nothing can drop
  mesh, model = _sharded(cfg, MESHES[mesh_name])
  with jax.set_mesh(mesh):
    tokens = jax.device_put(_tokens(), NamedSharding(mesh, batch_spec(mesh)))
    loss, logits, grads = _loss_and_grads(model, tokens)
  assert rel(loss, ref_loss) <= 1e-5
  assert rel(logits, ref_logits) <= 1e-5
  flat_ref = dict(nnx.to_flat_state(ref_grads))
  flat = dict(nnx.to_flat_state(grads))
  assert flat.keys() == flat_ref.keys()
  for path, g in flat.items():
    # fp32 sums in another order (per-shard partial sums, then a psum): a few ulps of the largest
    # entry; the embedding gradient (a scatter-add over all tokens) reaches ~1.1e-5 on some CPUs
    assert rel(g[...], flat_ref[path][...]) <= 3e-5, path
  # expert weights really are split over the expert axis (no silent replication)
  gate = model.groups[1].blocks.layers[0].mlp.experts.gate[...]
  if mesh.shape["expert"] > 1:
    assert gate.sharding.spec[1] == "expert"
    assert gate.addressable_shards[0].data.shape[1] == CFG.moe_num_experts // mesh.shape["expert"]


def test_routed_experts_without_expert_parallelism_split_over_the_token_shards():
  """moe_transport=none on a data-parallel mesh: each device sorts and computes only its own tokens'
  assignments (under plain jit XLA gathered every token to every device for the sort and each device
  computed the routed experts of the whole batch). XLA's FLOP count of the loss and its gradient per device, over
  the one-device count: 0.149 before, 0.133 now (1/8 = 0.125 but for the replicated router-kernel losses)."""
  graphdef, state = _reference_state(CFG.replace(moe_impl="blocked"))  # (the path that is token-sharded so far)
  tokens = _tokens()

  def flops(mesh):
    with jax.set_mesh(mesh):
      args = (jax.device_put(state, state_shardings(state, mesh)),
              jax.device_put(tokens, NamedSharding(mesh, batch_spec(mesh))))
      lowered = jax.jit(lambda st, t: _loss(nnx.merge(graphdef, st), t)[0]).lower(*args)
      return lowered.compile().cost_analysis()["flops"]

  one = flops(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
  eight = flops(make_mesh(MeshConfig(data=8)))
  assert eight / one < 0.14, eight / one


def test_every_parameter_sharded_as_the_rules_say():
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  model = shard_model(lambda: ErnieForCausalLM(CFG, rngs=nnx.Rngs(0)), mesh)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    axes = var.get_metadata()["out_sharding"]
    want = logical_to_spec(axes, var.shape, DEFAULT_RULES, mesh)
    got = var[...].sharding
    assert isinstance(got, NamedSharding) and got.spec == want, (path, got, want)
  experts = model.groups[1].blocks.layers[0].mlp.experts
  assert experts.gate[...].sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
  assert model.embed[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_indivisible_sharding_names_the_parameter():
  mesh = make_mesh(MeshConfig(data=1, expert=8))
  bad = CFG.replace(moe_num_experts=4, moe_k=2)
  with pytest.raises(ShardingError, match=r"experts.*not divisible"):
    shard_model(lambda: ErnieForCausalLM(bad, rngs=nnx.Rngs(0)), mesh)


def test_mesh_config_resolution_and_errors():
  assert MeshConfig(data=-1, expert=4).resolve(8) == (2, 1, 1, 4)
  with pytest.raises(ValueError, match="not divisible"):
    MeshConfig(data=-1, expert=3).resolve(8)
  with pytest.raises(ValueError, match="need 16 devices"):
    MeshConfig(data=4, expert=4).resolve(8)
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, expert=2), devices=jax.devices())
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1, "expert": 2}


# ------------------------------------------------------------------------------------------------
def _reference_drop(x, kernel, bias, gate, up, down, k, factor, n_shards, norm_min=1e-12):
  """Plain reference of the documented drop rule: per token shard (source device), each expert keeps
  its first C assignments in token-major order; kept weights are renormalised."""
  num_experts = gate.shape[0]
  ys, dropped = [], 0
  for xs in np.split(np.asarray(x), n_shards):
    r = route(jnp.asarray(xs), kernel, bias, k, norm_min)
    c = capacity(xs.shape[0], k, num_experts, factor)
    counts = np.zeros(num_experts, int)
    keep = np.zeros(r.indices.shape, bool)
    for t in range(xs.shape[0]):
      for j in range(k):
        e = int(r.indices[t, j])
        keep[t, j] = counts[e] < c
        counts[e] += 1
    dropped += int((~keep).sum())
    w = np.where(keep, np.asarray(r.weights), 0)
    w = w / np.maximum(w.sum(-1, keepdims=True), norm_min)
    ys.append(np.asarray(experts_loop(jnp.asarray(xs), gate, up, down, r.indices, jnp.asarray(w, jnp.float32))))
  return np.concatenate(ys), dropped


def test_capacity_drops_match_reference():
  cfg = CFG.replace(moe_transport="all_to_all", moe_capacity_factor=0.5, moe_num_shared_experts=0)
  mesh, model = _sharded(cfg, dict(data=2, expert=4))
  moe = model.layer(1).mlp
  x = jax.random.normal(jax.random.key(3), (4, 16, cfg.hidden_size))
  with jax.set_mesh(mesh):
    y, r = jax.jit(lambda m, x: m(x))(moe, x)
  want, want_dropped = _reference_drop(
    x.reshape(-1, cfg.hidden_size), moe.router.kernel[...], moe.router.correction_bias[...],
    moe.experts.gate[...], moe.experts.up[...], moe.experts.down[...], cfg.moe_k, 0.5, n_shards=8)
  assert want_dropped > 0
  assert int(r.dropped) == want_dropped
  np.testing.assert_allclose(np.asarray(y).reshape(want.shape), want, rtol=1e-5, atol=1e-5)


def test_dispatch_ranks_token_major():
  idx = jnp.asarray([[0, 1], [1, 0], [1, 2]])
  np.testing.assert_array_equal(dispatch_ranks(idx, 3), [0, 0, 1, 1, 2, 0])


def test_from_pretrained_loads_straight_into_sharded_layout(tmp_path):
  import ernie_jax
  from tests import hf_reference as ref

  torch_model = ref.build("moe", seed=5)
  path = ref.save(torch_model, tmp_path / "hf")
  mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2))
  model = ernie_jax.from_pretrained(path, mesh=mesh, moe_transport="all_to_all", moe_capacity_factor=0)
  for p, var in nnx.to_flat_state(nnx.state(model)):
    want = logical_to_spec(var.get_metadata()["out_sharding"], var.shape, DEFAULT_RULES, mesh)
    assert var[...].sharding.spec == want, p
  tokens = ref.random_tokens(torch_model.config.vocab_size, (4, 8))
  with jax.set_mesh(mesh):
    logits = nnx.jit(lambda m, t: m(t).logits)(model, jax.device_put(tokens, NamedSharding(mesh, batch_spec(mesh))))
  expected = ref.logits(torch_model, tokens)
  assert rel(logits, expected) <= 1e-5
  # activations carry logical names too: logits are [batch, length, act_vocab]
  assert logits.sharding.spec == jax.sharding.PartitionSpec(("data", "expert"), None, "tensor")


def _logits_spec(model, mesh, tokens):
  with jax.set_mesh(mesh):
    logits = nnx.jit(lambda m, t: m(t).logits)(model, jax.device_put(tokens, NamedSharding(mesh, batch_spec(mesh))))
  spec = tuple(logits.sharding.spec)
  return spec + (None,) * (logits.ndim - len(spec))


@pytest.mark.parametrize("load", ["shard_model", "from_pretrained", "create_train_state"])
def test_custom_rules_reach_the_activations(tmp_path, load):
  """Rules given to shard_model / from_pretrained / the train state shard the activations too (not only the params):
  with 'act_vocab' replicated instead of on 'tensor', the constrained logits are replicated there."""
  import ernie_jax
  from tests import hf_reference as ref

  mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2))
  rules = tuple((k, None) if k == "act_vocab" else (k, v) for k, v in DEFAULT_RULES)
  if load == "shard_model":
    cfg = ModelConfig.tiny_dense(num_key_value_heads=2)
    make = lambda rules: shard_model(lambda: ErnieForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    vocab = cfg.vocab_size
  elif load == "create_train_state":
    cfg = ModelConfig.tiny_dense(num_key_value_heads=2)

    def make(rules):
      graphdef, state = create_train_state(cfg, optax.sgd(0.1), seed=0, mesh=mesh, rules=rules)
      return nnx.merge(graphdef, state).model
    vocab = cfg.vocab_size
  else:
    torch_model = ref.build("dense", seed=5, num_key_value_heads=2)
    path = ref.save(torch_model, tmp_path / "hf")
    make = lambda rules: ernie_jax.from_pretrained(path, mesh=mesh, rules=rules)
    vocab = torch_model.config.vocab_size
  tokens = ref.random_tokens(vocab, (4, 8))
  assert _logits_spec(make(DEFAULT_RULES), mesh, tokens)[2] == "tensor"
  custom = make(rules)
  assert custom.sharding_rules == rules
  assert _logits_spec(custom, mesh, tokens) == (("data", "expert"), None, None)
