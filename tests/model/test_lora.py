"""LoRA (ernie_jax.model.lora): a fresh adapter (B = 0) leaves the logits bit-identical; merged equals
unmerged for the dense, MoE (attention, dense MLP, shared and routed experts) and VL (both expert sets,
resampler) models; the routed-expert branch of every moe_impl equals the loop oracle run with the
effective weights W + scale A·B; only LoRA parameters get gradients; dropout; bad targets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import rel
from ernie_jax import ErnieForCausalLM, ModelConfig
from ernie_jax.config import ConfigError, LoraConfig, VLConfig
from ernie_jax.model import Ernie45VLForConditionalGeneration, lora
from ernie_jax.model.lora_ops import ExpertLora, Lora
from ernie_jax.model.moe.dispatch import experts_loop, routed_experts
from ernie_jax.model.state import path_str

DENSE = ModelConfig.tiny_dense(initializer_range=0.1)
MOE = ModelConfig.tiny_moe(initializer_range=0.1, moe_impl="blocked")
VL = VLConfig.tiny(initializer_range=0.1)
LCFG = LoraConfig(rank=4)  # one adapter config, so the tests share compiled functions
TOKENS = jnp.asarray(np.random.RandomState(0).randint(3, 120, (2, 16)), jnp.int32)


def randomize(model, seed: int = 0, std: float = 0.05):
  """Give every LoRA parameter (A and B) random values."""
  state = nnx.state(model, nnx.LoRAParam)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(tree, [std * jax.random.normal(k, v.shape, v.dtype) for k, v in zip(keys, leaves)]))
  return model


@nnx.jit
def logits(model, tokens):
  return model(tokens).logits


def logits_o2(model, tokens):
  """Logits compiled at XLA's default optimisation level, as training and inference run (the suite compiles at O0
  for speed, see conftest.py, and O0 rounds differently)."""
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits, compiler_options={"xla_backend_optimization_level": 2})
  return run(state, tokens)


def _lora_model(cfg, lcfg=LCFG, seed=0):
  model = ErnieForCausalLM(cfg, rngs=nnx.Rngs(seed))
  return lora.apply_lora(model, lcfg, rngs=nnx.Rngs(seed + 1))


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_fresh_adapter_gives_base_logits_exactly(cfg):
  model = ErnieForCausalLM(cfg, rngs=nnx.Rngs(0))
  base = np.asarray(logits(model, TOKENS))
  lora.apply_lora(model, LCFG, rngs=nnx.Rngs(1))
  assert lora.lora_config(model) == LCFG
  kinds = {p.split("/")[-2] + "/" + p.split("/")[-1] for p in lora.lora_targets(model)}
  want = {"attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down"}
  if cfg.is_moe:
    want |= {f"{m}/{w}" for m in ("experts", "shared") for w in ("gate", "up", "down")}
  assert kinds == want
  a = model.groups[-1].blocks.layers[0].attn
  assert np.any(np.asarray(a.q_lora_a[...]) != 0) and not np.any(np.asarray(a.q_lora_b[...]))
  np.testing.assert_array_equal(np.asarray(logits(model, TOKENS)), base)


def test_shapes_metadata_and_init():
  model = _lora_model(MOE, LoraConfig(rank=4, alpha=16, targets=("attn.o", "experts")))
  layer = model.groups[1].blocks.layers[0]
  e = layer.mlp.experts
  reps, n_exp, h, i = e.gate.shape
  assert e.gate_lora_a.shape == (reps, n_exp, h, 4) and e.gate_lora_b.shape == (reps, n_exp, 4, i)
  assert e.down_lora_a.shape == (reps, n_exp, i, 4) and e.down_lora_b.shape == (reps, n_exp, 4, h)
  assert e.gate_lora_a.get_metadata()["out_sharding"] == ("layers", "experts", "embed", None)
  assert e.gate_lora_b.get_metadata()["out_sharding"] == ("layers", "experts", None, "expert_mlp")
  assert layer.attn.o_lora_a.get_metadata()["out_sharding"] == ("layers", "heads", "head_dim", None)
  assert isinstance(e.gate_lora_a, nnx.LoRAParam) and e.gate_lora_a[...].dtype == e.gate[...].dtype
  assert getattr(layer.attn, "q_lora_a", None) is None and getattr(layer.mlp.shared, "gate_lora_a", None) is None
  # PEFT's kaiming-uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)); fan_in of o is heads * head_dim
  bound = 1 / np.sqrt(MOE.num_attention_heads * MOE.head_dim)
  oa = np.asarray(layer.attn.o_lora_a[...])
  assert np.abs(oa).max() <= bound and np.abs(oa).max() > 0.8 * bound
  assert lora.scale(LoraConfig(rank=4, alpha=16)) == 4.0
  assert lora.scale(LoraConfig(rank=4)) == 2.0
  assert lora.scale(LoraConfig(rank=4, alpha=16, rslora=True)) == 8.0
  paths = {path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model))}
  lora_paths = {path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
  assert {p for p in paths if lora.is_lora_path(p)} == lora_paths and len(lora_paths) == 2 * (2 + 3)
  # the abstract model (checkpoint restore) can carry LoRA too
  abstract = nnx.eval_shape(lambda: _lora_model(MOE, LoraConfig(rank=4)))
  assert lora.lora_targets(abstract) == lora.lora_targets(_lora_model(MOE, LoraConfig(rank=4)))


@pytest.fixture(scope="module")
def random_lora():
  """{config: its model with LCFG adapters holding random A and B} (built once, never mutated)."""
  return {id(cfg): randomize(_lora_model(cfg)) for cfg in (DENSE, MOE)}


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_merged_equals_unmerged(cfg, random_lora):
  model = random_lora[id(cfg)]
  base = ErnieForCausalLM(cfg, rngs=nnx.Rngs(0))
  want = np.asarray(logits_o2(model, TOKENS))
  merged = lora.merge_lora(model)
  assert lora.lora_config(merged) is None and not lora.lora_targets(merged)
  assert not nnx.state(merged, nnx.LoRAParam)
  assert lora.lora_targets(model)  # the input model is left unchanged
  got = np.asarray(logits_o2(merged, TOKENS))
  assert rel(got, want) <= 3e-6  # fp32 rounding: (W + BA) x vs W x + B (A x)
  assert rel(want, np.asarray(logits(base, TOKENS))) > 1e-3  # the adapters do change the model
  # merged weights W + scale A·B, per expert, from numpy
  e, me = model.groups[-1].blocks.layers[0].mlp, merged.groups[-1].blocks.layers[0].mlp
  name = "experts" if cfg.is_moe else None
  if name:
    w, a, b = (np.asarray(v[...], np.float64) for v in (e.experts.down, e.experts.down_lora_a, e.experts.down_lora_b))
    np.testing.assert_allclose(np.asarray(me.experts.down[...]), w + lora.scale(LCFG) * a @ b,
                               rtol=1e-5, atol=1e-7)


def _vl_inputs():
  from ernie_jax.model.vl import prepare_inputs

  grid = (1, 4, 4)
  rs = np.random.RandomState(0)
  image = [VL.image_start_token_id] + [VL.image_token_id] * 4 + [VL.image_end_token_id]
  ids = np.array([[5, 6] + image + list(rs.randint(3, 99, 8))] * 2)
  prep = prepare_inputs(VL, ids, image_grid_thw=[grid, grid])
  return (jnp.asarray(ids), jnp.asarray(prep["positions"]), jnp.asarray(prep["token_types"]),
          jnp.asarray(rs.randn(32, 588).astype(np.float32)), (grid, grid))


@nnx.jit(static_argnames=("grid",))
def _vl_logits(model, ids, positions, types, pixels, grid):
  return model(ids, positions=positions, token_types=types, pixel_values=pixels, image_grid_thw=grid).logits


def test_vl_merged_equals_unmerged():
  model = Ernie45VLForConditionalGeneration(VL, rngs=nnx.Rngs(0))
  base = np.asarray(_vl_logits(model, *_vl_inputs()))
  lora.apply_lora(model, LoraConfig(rank=4, targets=("attn", "mlp", "shared", "experts", "resampler")),
                  rngs=nnx.Rngs(1))
  sets = {p.rsplit("/", 2)[-2] for p in lora.lora_targets(model)}
  assert {"text_experts", "vision_experts", "shared", "fc1", "fc2"} <= sets
  assert len([p for p in lora.lora_targets(model) if "resampler" in p]) == 4  # spatial / temporal fc1, fc2
  np.testing.assert_array_equal(np.asarray(_vl_logits(model, *_vl_inputs())), base)  # B = 0
  randomize(model)
  want = np.asarray(_vl_logits(model, *_vl_inputs()))
  got = np.asarray(_vl_logits(lora.merge_lora(model), *_vl_inputs()))
  assert rel(got, want) <= 3e-6 and rel(want, base) > 1e-3  # fp32 rounding (1.3e-6 on an AMD EPYC, < 1e-6 on a Xeon)
  # each expert set's adapter matters (a set's B zeroed changes the logits)
  for name in ("text_experts", "vision_experts"):
    e = model.groups[-1].blocks.layers[0].mlp
    b = getattr(e, name).down_lora_b
    keep = b[...]
    b[...] = jnp.zeros_like(keep)
    assert rel(np.asarray(_vl_logits(model, *_vl_inputs())), want) > 1e-6, name
    b[...] = keep


def test_vl_set_targets_select_one_set():
  model = Ernie45VLForConditionalGeneration(VL, rngs=nnx.Rngs(0))
  lora.apply_lora(model, LoraConfig(rank=2, targets=("vision_experts", "mlp.text_experts.down")), rngs=nnx.Rngs(1))
  got = {"/".join(p.split("/")[-2:]) for p in lora.lora_targets(model)}
  assert got == {"vision_experts/gate", "vision_experts/up", "vision_experts/down", "text_experts/down"}


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["loop", "blocked", "ragged_dot"])
@pytest.mark.parametrize("which", ["all", "down"])
def test_routed_lora_matches_loop_with_effective_weights(impl, which):
  rs = np.random.RandomState(0)
  t, h, i, e, k, r, s = 24, 16, 12, 4, 2, 3, 1.5
  arr = lambda *shape: jnp.asarray(rs.randn(*shape).astype(np.float32) * 0.3)
  x, gate, up, down = arr(t, h), arr(e, h, i), arr(e, h, i), arr(e, i, h)
  idx = jnp.asarray(np.stack([rs.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)
  w = jax.nn.softmax(arr(t, k), axis=-1)
  ad = {n: (arr(e, h if n != "down" else i, r), arr(e, r, i if n != "down" else h)) for n in ("gate", "up", "down")}
  names = ("gate", "up", "down") if which == "all" else ("down",)
  adapters = ExpertLora(*(Lora(*ad[n], scale=s) if n in names else None for n in ("gate", "up", "down")))
  eff = {n: (wt + s * np.einsum("ehr,eri->ehi", *ad[n]) if n in names else wt)
         for n, wt in (("gate", gate), ("up", up), ("down", down))}
  want = experts_loop(x, eff["gate"], eff["up"], eff["down"], idx, w)
  got = routed_experts(x, gate, up, down, idx, w, impl, lora=adapters)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
  assert rel(want, experts_loop(x, gate, up, down, idx, w)) > 1e-2  # the adapters matter


# --------------------------------------------------------------------------------------------------
def test_only_lora_params_get_gradients(random_lora):
  model = random_lora[id(MOE)]

  @nnx.jit
  def grads(model, tokens):
    def loss(m):
      return jnp.mean(jax.nn.logsumexp(m(tokens).logits, -1))
    return nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)

  g = grads(model, TOKENS)
  flat = {path_str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(g)}
  want = {f"{p}_lora_{x}" for p in lora.lora_targets(model) for x in "ab"}
  assert set(flat) == want
  for p, v in flat.items():
    assert np.isfinite(v).all() and np.abs(v).max() > 0, p


def test_dropout_only_inside_dropout_key():
  model = randomize(_lora_model(MOE, LoraConfig(rank=4, dropout=0.5)))
  merged_model = lora.merge_lora(model)
  assert not [p for p, _ in nnx.to_flat_state(nnx.state(merged_model)) if lora.is_lora_path(p)]
  assert any(p[-1] == "lora_salt" for p, _ in nnx.to_flat_state(nnx.state(model)))
  merged = np.asarray(logits(merged_model, TOKENS))
  plain = np.asarray(logits(model, TOKENS))
  assert rel(plain, merged) <= 1e-6  # no dropout outside the context

  @nnx.jit
  def dropped(model, tokens, key):
    with lora.dropout_key(key):
      return model(tokens).logits

  a, a2 = (np.asarray(dropped(model, TOKENS, jax.random.key(1))) for _ in range(2))
  b = np.asarray(dropped(model, TOKENS, jax.random.key(2)))
  np.testing.assert_array_equal(a, a2)
  assert rel(a, plain) > 1e-4 and rel(a, b) > 1e-4
  # the base path of the model is untouched: with B = 0 dropout changes nothing
  zero = lora.apply_lora(ErnieForCausalLM(MOE, rngs=nnx.Rngs(0)), LoraConfig(rank=4, dropout=0.5), rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(np.asarray(dropped(zero, TOKENS, jax.random.key(1))), np.asarray(logits(zero, TOKENS)))

  # a concrete key entered outside jit would be compiled in: refused
  # (the context must be entered inside the jitted function: a compiled function never sees it)
  with pytest.raises(ValueError, match="dropout_key"):
    with lora.dropout_key(jax.random.key(3)):
      nnx.jit(lambda m, t: m(t).logits)(model, TOKENS)


def test_dropout_mask_rate_and_scaling():
  from ernie_jax.model.lora_ops import dropout

  x = jnp.ones((200, 100))
  y = np.asarray(dropout(x, Lora(x, x, jax.random.key(0), rate=0.25)))
  assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
  assert abs((y == 0).mean() - 0.25) < 0.02


def test_bad_targets_and_unsupported_models_are_errors():
  dense = ErnieForCausalLM(DENSE, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="'attn.qq'.*unknown"):
    lora.apply_lora(dense, LoraConfig(targets=("attn", "attn.qq")), rngs=nnx.Rngs(1))
  with pytest.raises(ConfigError, match="'experts' matches no weight"):
    lora.apply_lora(dense, LoraConfig(targets=("attn", "experts")), rngs=nnx.Rngs(1))
  assert lora.lora_config(dense) is None and not lora.lora_targets(dense)  # nothing was added
  with pytest.raises(ConfigError, match="router"):
    lora.apply_lora(ErnieForCausalLM(MOE, rngs=nnx.Rngs(0)), LoraConfig(targets=("router",)), rngs=nnx.Rngs(1))
  with pytest.raises(ConfigError, match="fp8_recipe"):
    lora.apply_lora(ErnieForCausalLM(DENSE.replace(fp8_recipe="current"), rngs=nnx.Rngs(0)), LoraConfig(),
                    rngs=nnx.Rngs(1))
  for bad in (dict(rank=0), dict(dropout=1.0), dict(alpha=-1.0), dict(targets=())):
    with pytest.raises(ConfigError, match="lora\\."):
      LoraConfig(**bad)
  # the default targets skip groups the model lacks (a dense model has no experts)
  lora.apply_lora(dense, LoraConfig(), rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="already has LoRA"):
    lora.apply_lora(dense, LoraConfig(), rngs=nnx.Rngs(1))
