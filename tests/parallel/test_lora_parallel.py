"""LoRA under expert parallelism on 8 fake CPU devices (data2 x expert4): the routed experts' adapters
are split over the `expert` axis with their experts, and logits, loss and the gradients w.r.t. every
LoRA parameter equal the single-device run for every transport (all_to_all with a capacity that
drops nothing, ragged_all_to_all, allgather) — for the text model and for the VL MoE block (two
expert sets restricted to their tokens). LoRA dropout runs inside the shard_map."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.helpers import rel
from ernie_jax import ErnieForCausalLM, ModelConfig
from ernie_jax.config import LoraConfig, VLConfig
from ernie_jax.model import lora
from ernie_jax.model.moe import MoE, vl_expert_sets
from ernie_jax.model.state import path_str
from ernie_jax.parallel import MeshConfig, batch_spec, make_mesh, state_shardings

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

CFG = ModelConfig.tiny_moe(num_hidden_layers=2, moe_layer_start_index=1, moe_num_experts=8, moe_k=2,
                           initializer_range=0.3, moe_impl="blocked")
LCFG = LoraConfig(rank=4, targets=("attn", "shared", "experts"))
TRANSPORTS = ["all_to_all", "ragged_all_to_all", "allgather"]
B, S = 8, 8


def _randomize(model, seed=0):
  leaves, tree = jax.tree.flatten(nnx.state(model, nnx.LoRAParam))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, v.shape, v.dtype) for k, v in zip(keys, leaves)]))
  return model


def _model(cfg, lcfg=LCFG):
  return _randomize(lora.apply_lora(ErnieForCausalLM(cfg, rngs=nnx.Rngs(0)), lcfg, rngs=nnx.Rngs(1)))


def _tokens():
  return jnp.asarray(np.random.RandomState(0).randint(3, CFG.vocab_size, (B, S)), jnp.int32)


def _loss(model, tokens):
  logits = model(tokens).logits
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean(), logits


@nnx.jit
def _loss_and_grads(model, tokens):
  return nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)(model, tokens)


def _flat(grads):
  return {path_str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}


def _with_transport(model, transport: str):
  """The model's MoE blocks switched to `transport`, with a capacity that drops nothing (0)."""
  for _, m in nnx.iter_graph(model):
    if isinstance(m, MoE):
      m.transport, m.capacity_factor = transport, 0.0
  return model


@pytest.fixture(scope="module")
def single_device():
  graphdef, state = nnx.split(_model(CFG))
  (loss, logits), grads = _loss_and_grads(nnx.merge(graphdef, state), _tokens())
  return (graphdef, state), (loss, logits, _flat(grads))


def _on_mesh(model, mesh):
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_text_lora_values_and_grads_match_single_device(single_device, transport):
  (graphdef, state), (ref_loss, ref_logits, ref_grads) = single_device
  mesh = make_mesh(MeshConfig(data=2, expert=4))
  model = _on_mesh(_with_transport(nnx.merge(graphdef, state), transport), mesh)
  experts = model.groups[1].blocks.layers[0].mlp.experts
  for v in (experts.gate_lora_a, experts.down_lora_b):  # adapters split with their experts, rank whole
    assert v[...].sharding.spec[1] == "expert" and v[...].sharding.spec[-2:].count("expert") == 0
    assert v[...].addressable_shards[0].data.shape[1] == CFG.moe_num_experts // 4
  with jax.set_mesh(mesh):
    tokens = jax.device_put(_tokens(), NamedSharding(mesh, batch_spec(mesh)))
    (loss, logits), grads = _loss_and_grads(model, tokens)
  assert rel(loss, ref_loss) <= 1e-5 and rel(logits, ref_logits) <= 1e-5
  flat = _flat(grads)
  assert flat.keys() == ref_grads.keys()
  assert any("experts/gate_lora_a" in p for p in flat)
  for p, g in flat.items():
    assert rel(g, ref_grads[p]) <= 3e-5, p


def test_lora_dropout_inside_shard_map():
  mesh = make_mesh(MeshConfig(data=2, expert=4))
  model = _on_mesh(_with_transport(_model(CFG, LCFG.replace(dropout=0.3, targets=("experts",))), "all_to_all"), mesh)

  @nnx.jit
  def run(model, tokens, key):
    with lora.dropout_key(key):
      return model(tokens).logits

  with jax.set_mesh(mesh):
    tokens = jax.device_put(_tokens(), NamedSharding(mesh, batch_spec(mesh)))
    a, a2, b = (np.asarray(run(model, tokens, jax.random.key(k))) for k in (1, 1, 2))
    plain = np.asarray(nnx.jit(lambda m, t: m(t).logits)(model, tokens))
  assert np.isfinite(a).all()
  np.testing.assert_array_equal(a, a2)
  assert rel(a, plain) > 1e-4 and rel(a, b) > 1e-4


# --------------------------------------------------------------------------------------------------
VL = VLConfig.tiny(initializer_range=0.3, moe_num_experts=8)


def _vl_moe():
  cfg = VL.replace(moe_impl="blocked")
  moe = MoE(cfg, vl_expert_sets(cfg), rngs=nnx.Rngs(0))
  return _randomize(lora.apply_lora(moe, LoraConfig(rank=4, targets=("experts", "shared")), rngs=nnx.Rngs(1)))


@nnx.jit
def _vl_value_and_grads(moe, x, vision):
  def f(m):
    y = m(x, vision)[0]
    return jnp.sum(jnp.sin(y)), y

  return nnx.value_and_grad(f, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)(moe)


@pytest.fixture(scope="module")
def vl_single_device():
  x = jax.random.normal(jax.random.key(1), (8, 4, VL.hidden_size))
  vision = jax.random.bernoulli(jax.random.key(2), 0.4, (8, 4))
  graphdef, state = nnx.split(_vl_moe())
  (_, want), want_g = _vl_value_and_grads(nnx.merge(graphdef, state), x, vision)
  return (graphdef, state), (x, vision), (want, want_g)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_vl_expert_sets_lora_match_single_device(vl_single_device, transport):
  (graphdef, state), (x, vision), (want, want_g) = vl_single_device
  mesh = make_mesh(MeshConfig(data=2, expert=4))
  moe = _on_mesh(_with_transport(nnx.merge(graphdef, state), transport), mesh)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
    (_, y), g = _vl_value_and_grads(moe, xs, vision)
  assert rel(y, want) <= 1e-5
  g, want_g = _flat(g), _flat(want_g)
  assert g.keys() == want_g.keys() and {"text_experts/down_lora_b", "vision_experts/gate_lora_a"} <= set(g)
  for p, v in g.items():
    assert rel(v, want_g[p]) <= 3e-5, p


def test_lora_params_sharded_as_the_rules_say():
  from ernie_jax.parallel import DEFAULT_RULES, logical_to_spec, shard_model

  mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  # added to a model already laid out on the mesh (e.g. from_pretrained(..., mesh=)): placed by the rules
  model = lora.apply_lora(shard_model(lambda: ErnieForCausalLM(CFG, rngs=nnx.Rngs(0)), mesh), LCFG, rngs=nnx.Rngs(1))
  state = nnx.state(model, nnx.LoRAParam)
  assert len(jax.tree.leaves(state)) == 2 * (4 * 2 + 3 * 2)
  for path, var in nnx.to_flat_state(state):
    want = logical_to_spec(var.get_metadata()["out_sharding"], var.shape, DEFAULT_RULES, mesh)
    assert var[...].sharding.spec == want, path
  e = model.groups[1].blocks.layers[0].mlp.experts
  assert e.gate_lora_a[...].sharding.spec == P(None, "expert", "fsdp", None)
  assert e.gate_lora_b[...].sharding.spec == P(None, "expert", None, "tensor")
  # the abstract LoRA model (shard_model / checkpoint restore) gets the same layout
  abstract = nnx.eval_shape(lambda: lora.apply_lora(ErnieForCausalLM(CFG, rngs=nnx.Rngs(0)), LCFG, rngs=nnx.Rngs(1)))
  shardings = state_shardings(nnx.state(abstract, nnx.LoRAParam), mesh)
  got = {path_str(p): v.get_value().spec for p, v in nnx.to_flat_state(shardings)}
  assert got == {path_str(p): v[...].sharding.spec for p, v in nnx.to_flat_state(state)}
