"""ERNIE 4.5 VL against transformers' `Ernie4_5_VLMoeForConditionalGeneration` (tiny random configs):
vision tower, resampler, 3-D position ids, full logits (square / non-square images, two images and
a video in one prompt, text only, padded batch), loading through `ernie_jax.from_pretrained`, and
greedy generation with an image."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ernie_jax
from ernie_jax.infer.generate_vl import generate_vl
from ernie_jax.interop import hf_vl
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.model.vl import Ernie45VLForConditionalGeneration, forward, prepare_inputs
from ernie_jax.model.vl import rope3d
from tests.helpers import rel
from tests import vl_reference as ref

SQUARE, WIDE, TALL, VIDEO = (1, 4, 4), (1, 4, 6), (1, 6, 4), (2, 4, 4)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  torch_model = ref.build(seed=0)
  path = tmp_path_factory.mktemp("vl") / "hf"
  torch_model.save_pretrained(str(path))
  model = ernie_jax.from_pretrained(path)
  return torch_model, model, str(path)


def test_from_pretrained_dispatches_vl_and_reads_config(pair):
  torch_model, model, path = pair
  assert isinstance(model, Ernie45VLForConditionalGeneration)
  c = model.config
  assert c.layer_kinds == ("dense", "moe", "moe") and c.mrope_section == (3, 3, 2)
  assert c.moe_intermediate_size == (32, 16) and c.vision.depth == 2 and c.image_token_id == ref.IMAGE
  # every parameter equals its torch counterpart after the name / layout mapping
  state = torch_model.state_dict()
  layer = model.layer(1).mlp
  np.testing.assert_array_equal(layer.text_router.kernel[...],
                                state["model.language_model.layers.1.mlp.text_moe.gate.weight"].numpy().T)
  np.testing.assert_array_equal(
    layer.vision_router.correction_bias[...],
    state["model.language_model.layers.1.mlp.vision_moe.gate.moe_statics.e_score_correction_bias"].numpy()[0])
  gate_up = state["model.language_model.layers.1.mlp.vision_moe.experts.gate_up_proj"].numpy()  # [E, 2I, H]
  np.testing.assert_array_equal(layer.vision_experts.gate[...], gate_up[:, :16].transpose(0, 2, 1))


def test_vision_tower_and_resampler_match(pair):
  torch_model, model, _ = pair
  grids = [SQUARE, WIDE, TALL, VIDEO]
  pv = ref.pixels(grids, seed=1)
  with torch.no_grad():
    hv = torch_model.model.vision_tower(torch.tensor(pv), torch.tensor(grids)).last_hidden_state
    hr = torch_model.model.resampler_model(hv, torch.tensor(grids)).numpy()
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, pv, hv):
    m = nnx.merge(graphdef, state)
    return m.vision_model(pv, grids), m.resampler(hv, grids)

  jv, jr = run(state, jnp.asarray(pv), jnp.asarray(hv.numpy()))
  assert rel(jv, hv.numpy()) <= 1e-5
  assert jr.shape == hr.shape == (4 + 6 + 6 + 4, 64)
  assert rel(jr, hr) <= 1e-5


def test_position_ids_match_reference(pair):
  torch_model, model, _ = pair
  rows = [[5] + ref.image_span(WIDE) + [6, 7] + ref.video_span(VIDEO) + [8] + ref.image_span(TALL) + [9],
          [5, 6] + ref.image_span(SQUARE) + [7]]
  s = max(map(len, rows))
  ids = np.array([r + [0] * (s - len(r)) for r in rows])
  mask = (np.arange(s)[None] < np.array([[len(r)] for r in rows])).astype(np.int64)
  grids = [WIDE, TALL, SQUARE]
  want, want_delta = torch_model.model.get_rope_index(
    torch.tensor(ids), torch.tensor(ref.mm_types(ids)), torch.tensor(grids), torch.tensor([VIDEO]),
    attention_mask=torch.tensor(mask))
  prep = prepare_inputs(model.config, ids, image_grid_thw=grids, video_grid_thw=[VIDEO], attention_mask=mask)
  np.testing.assert_array_equal(prep["positions"].transpose(2, 0, 1), want.numpy())
  np.testing.assert_array_equal(prep["rope_deltas"], want_delta.numpy()[:, 0])
  np.testing.assert_array_equal(prep["token_types"] * mask, ref.moe_types(ids) * mask)
  # h / w really are swapped between the wide and the tall image
  wide = prep["positions"][0, 2:2 + 6]
  assert wide[:, 1].max() - wide[:, 1].min() == 1 and wide[:, 2].max() - wide[:, 2].min() == 2
  with pytest.raises(ValueError, match="image placeholder tokens"):
    prepare_inputs(model.config, ids, image_grid_thw=[WIDE], video_grid_thw=[VIDEO], attention_mask=mask)


def test_3d_rope_slot_assignment():
  """Slot i < h+w: even -> h, odd -> w; the last t slots -> t (spec §4.2, HF mrope_section)."""
  axes = rope3d.slot_axes(128, (22, 22, 20))
  assert (axes[:44:2] == rope3d.H_AXIS).all() and (axes[1:44:2] == rope3d.W_AXIS).all()
  assert (axes[44:] == rope3d.T_AXIS).all()
  pos = jnp.asarray([[[3, 3, 3]]])
  cos3, _ = rope3d.mrope_angles(pos, 16, 10000.0, (3, 3, 2))
  from ernie_jax.model.layers import rope_angles

  cos1, _ = rope_angles(jnp.asarray([[3]]), 16, 10000.0)
  np.testing.assert_allclose(cos3, cos1, rtol=1e-6)  # text tokens: plain 1-D RoPE


def test_logits_square_and_nonsquare_images_padded_batch(pair):
  torch_model, model, _ = pair
  rows = [[5, 6] + ref.image_span(SQUARE) + [7, 8, 9], [10] + ref.image_span(WIDE) + [11]]
  s = max(map(len, rows))
  ids = np.array([r + [0] * (s - len(r)) for r in rows])
  mask = (np.arange(s)[None] < np.array([[len(r)] for r in rows])).astype(np.int64)
  pv = ref.pixels([SQUARE, WIDE], seed=2)
  want = ref.forward(torch_model, ids, pixel_values=pv, image_grid=[SQUARE, WIDE], attention_mask=mask)
  out = forward(model, ids, pixel_values=pv, image_grid_thw=[SQUARE, WIDE], attention_mask=mask)
  got = np.asarray(out.logits)
  for b, r in enumerate(rows):  # right padding never influences the real tokens
    assert rel(got[b, :len(r)], want[b, :len(r)]) <= 1e-5
  np.testing.assert_array_equal(np.asarray(out.vision_mask) & (mask > 0), (ref.moe_types(ids) > 0) & (mask > 0))


def test_logits_two_images_and_a_video(pair):
  torch_model, model, _ = pair
  ids = np.array([[5] + ref.image_span(TALL) + [6, 7] + ref.image_span(SQUARE) + [8] + ref.video_span(VIDEO) + [9, 3]])
  pv, pvv = ref.pixels([TALL, SQUARE], seed=3), ref.pixels([VIDEO], seed=4)
  want = ref.forward(torch_model, ids, pixel_values=pv, image_grid=[TALL, SQUARE], videos=pvv, video_grid=[VIDEO])
  out = forward(model, ids, pixel_values=pv, image_grid_thw=[TALL, SQUARE], pixel_values_videos=pvv,
                video_grid_thw=[VIDEO])
  assert rel(out.logits, want) <= 1e-5


def test_logits_text_only(pair):
  torch_model, model, _ = pair
  ids = np.random.RandomState(0).randint(3, 100, (2, 9))
  want = ref.forward(torch_model, ids)
  out = forward(model, ids)
  assert rel(out.logits, want) <= 1e-5
  assert not np.asarray(out.vision_mask).any()


def test_greedy_generation_with_image_matches_reference(tmp_path):
  torch_model = ref.build(seed=3, tie_word_embeddings=False)  # untied head: varied greedy tokens
  torch_model.save_pretrained(str(tmp_path))
  model = ernie_jax.from_pretrained(tmp_path)
  assert model.lm_head is not None
  prompts = [[5, 6] + ref.image_span(WIDE) + [7, 8], [9] + ref.image_span(SQUARE) + [10, 11, 12, 13]]
  pv = ref.pixels([WIDE, SQUARE], seed=5)
  got = generate_vl(model, prompts, max_new_tokens=6, pixel_values=pv, image_grid_thw=[WIDE, SQUARE],
                    stop_tokens=())
  start, seen = 0, set()
  for p, g in zip(prompts, [WIDE, SQUARE]):
    n = g[0] * g[1] * g[2]
    ids = torch.tensor([p])
    with torch.no_grad():
      out = torch_model.generate(
        input_ids=ids, pixel_values=torch.tensor(pv[start:start + n]), image_grid_thw=torch.tensor([g]),
        mm_token_type_ids=torch.tensor(ref.mm_types(np.array([p]))),
        moe_mm_token_type_ids=torch.tensor(ref.moe_types(np.array([p]))),
        max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    start += n
    want = out[0, len(p):].tolist()
    assert got.pop(0) == want
    seen |= set(want)
  assert len(seen) > 3  # not a degenerate repetition


def test_checkpoint_errors_name_the_tensor(pair, tmp_path):
  from safetensors.numpy import load_file, save_file
  import shutil

  _, model, path = pair
  shutil.copy(f"{path}/config.json", tmp_path / "config.json")
  tensors = load_file(f"{path}/model.safetensors")
  bad = dict(tensors)
  bad["model.layers.1.mlp.gate.weight_1"] = bad["model.layers.1.mlp.gate.weight_1"].T.copy()  # [E, H]
  save_file(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"mlp\.gate\.weight_1.*shape \[4, 64\], expected \[64, 4\]"):
    ernie_jax.from_pretrained(tmp_path)
  bad = dict(tensors)
  del bad["model.layers.2.mlp.experts.7.down_proj.weight"]
  save_file(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.experts\.7\.down_proj"):
    ernie_jax.from_pretrained(tmp_path)
  # export is the inverse of loading
  exported = hf_vl.state_to_hf(model)
  assert exported.keys() == tensors.keys()
  for k, v in tensors.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_sharded_loading_and_expert_parallel_forward(pair):
  from jax.sharding import NamedSharding

  from ernie_jax.parallel import DEFAULT_RULES, MeshConfig, batch_spec, logical_to_spec, make_mesh

  torch_model, _, path = pair
  mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2))
  model = ernie_jax.from_pretrained(path, mesh=mesh, moe_transport="all_to_all", moe_capacity_factor=0)
  for p, var in nnx.to_flat_state(nnx.state(model)):
    want = logical_to_spec(var.get_metadata()["out_sharding"], var.shape, DEFAULT_RULES, mesh)
    assert var[...].sharding.spec == want, p
  assert model.groups[1].blocks.layers[0].mlp.vision_experts.gate[...].sharding.spec[1] == "expert"
  rows = [[5] + ref.image_span(SQUARE) + [6, 7, 8, 9]] * 2 + [[10] + ref.image_span(WIDE) + [11]] * 2
  ids = np.array([r + [0] * (12 - len(r)) for r in rows])
  grids = [SQUARE, SQUARE, WIDE, WIDE]
  pv = ref.pixels(grids, seed=6)
  want = ref.forward(torch_model, ids, pixel_values=pv, image_grid=grids)
  prep = prepare_inputs(model.config, ids, image_grid_thw=grids)
  graphdef, state = nnx.split(model)
  with jax.set_mesh(mesh):
    tok = jax.device_put(ids, NamedSharding(mesh, batch_spec(mesh)))
    logits = jax.jit(lambda st, t, pos, pv: nnx.merge(graphdef, st)(
      t, positions=pos, pixel_values=pv, image_grid_thw=tuple(grids)).logits)(state, tok, prep["positions"], pv)
  for b, r in enumerate(rows):
    assert rel(np.asarray(logits)[b, :len(r)], want[b, :len(r)]) <= 1e-5


def test_long_frames_attend_in_query_chunks():
  from ernie_jax.model.vl.vision import _dense_attend, frame_attend, frame_runs

  q, k, v = (jax.random.normal(jax.random.key(i), (2, 37, 2, 8)) for i in range(3))
  np.testing.assert_allclose(frame_attend(q, k, v, chunk=16), _dense_attend(q, k, v), rtol=1e-5, atol=1e-6)
  assert frame_runs([(1, 4, 4), (1, 4, 6), (1, 6, 4), (2, 4, 4)]) == [(0, 1, 16), (16, 2, 24), (64, 2, 16)]


def test_call_with_images_and_no_positions_derives_them(pair):
  """transformers' way of calling the VL model (ids + pixels + grids, no positions) gives the reference
  logits (issue 14 item 7: it used to fall back to text positions silently); traced ids are refused."""
  torch_model, model, _ = pair
  ids = np.array([[5] + ref.image_span(WIDE) + [6, 7] + ref.video_span(VIDEO) + [8, 3]])
  pv, pvv = ref.pixels([WIDE], seed=5), ref.pixels([VIDEO], seed=6)
  want = ref.forward(torch_model, ids, pixel_values=pv, image_grid=[WIDE], videos=pvv, video_grid=[VIDEO])
  got = model(jnp.asarray(ids), pixel_values=jnp.asarray(pv), image_grid_thw=[WIDE],
              pixel_values_videos=jnp.asarray(pvv), video_grid_thw=[VIDEO])
  assert rel(got.logits, want) <= 1e-5
  full = forward(model, ids, pixel_values=pv, image_grid_thw=[WIDE], pixel_values_videos=pvv, video_grid_thw=[VIDEO])
  assert rel(got.logits, full.logits) <= 1e-6
  graphdef, state = nnx.split(model)

  @jax.jit
  def traced(state, ids, pv, pvv):
    return nnx.merge(graphdef, state)(ids, pixel_values=pv, image_grid_thw=[WIDE], pixel_values_videos=pvv,
                                      video_grid_thw=[VIDEO]).logits

  with pytest.raises(ValueError, match="pass positions="):
    traced(state, jnp.asarray(ids), jnp.asarray(pv), jnp.asarray(pvv))
  with pytest.raises(ValueError, match="image_grid_thw"):
    model(jnp.asarray(ids), image_embeds=jnp.zeros((4, model.config.hidden_size)))


def test_generate_vl_reports_non_finite_logits(pair):
  """A NaN weight makes generation with an image raise one error instead of decoding token 0 (issue 14 item 6)."""
  from ernie_jax.infer.generate import NonFiniteLogitsError

  _, model, _ = pair
  broken = nnx.clone(model)
  broken.norm.weight.value = broken.norm.weight.value.at[0].set(np.nan)
  prompt = [[5] + ref.image_span(SQUARE) + [6]]
  with pytest.raises(NonFiniteLogitsError, match="non-finite"):
    generate_vl(broken, prompt, max_new_tokens=3, pixel_values=ref.pixels([SQUARE], seed=7),
                image_grid_thw=[SQUARE], stop_tokens=())
