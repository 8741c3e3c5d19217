"""ModelConfig: presets, HF / Paddle config.json readers, validation errors that name the field."""

from __future__ import annotations

import json

import pytest

from ernie_jax import ConfigError, ModelConfig
from ernie_jax.config import VLConfig
from ernie_jax.model.decoder import layer_groups, layer_locations
from ernie_jax.interop import hf_config, paddle_config


def test_presets_match_spec():
  c = ModelConfig.ernie45_0p3b()
  assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
          c.head_dim, c.intermediate_size, c.is_moe) == (1024, 18, 16, 2, 128, 3072, False)
  c = ModelConfig.ernie45_21b_a3b()
  assert c.layer_kinds == ("dense",) + ("moe",) * 27
  assert layer_groups(c.layer_kinds) == [(("dense",), 1), (("moe",), 27)]
  c = ModelConfig.ernie45_300b_a47b()
  assert c.layer_kinds[:3] == ("dense",) * 3 and c.layer_kinds.count("moe") == 51
  assert not c.tie_word_embeddings and c.moe_num_shared_experts == 0 and c.moe_k == 8
  for name in ModelConfig.PRESETS:
    ModelConfig.preset(name)


def test_layer_groups_cover_layers_in_order():
  kinds = ("dense", "moe", "dense", "moe", "dense", "dense")
  groups = layer_groups(kinds)
  assert groups == [(("dense", "moe"), 2), (("dense",), 2)]
  flat = [k for unit, reps in groups for _ in range(reps) for k in unit]
  assert tuple(flat) == kinds
  assert layer_locations(kinds)[3] == (0, 1, 1)


def _hf_moe(**kw):
  d = dict(model_type="ernie4_5_moe", vocab_size=1000, hidden_size=64, intermediate_size=128,
           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, moe_num_experts=8,
           moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1, moe_layer_start_index=1,
           moe_layer_end_index=-1, rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
  d.update(kw)
  return d


def test_from_hf(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(_hf_moe()))
  c = hf_config.read_text(tmp_path)
  assert c.moe_layer_end_index == 3 and c.head_dim == 16 and c.rope_theta == 500000.0
  dense = hf_config.read_text(dict(model_type="ernie4_5", vocab_size=100, hidden_size=64,
                                   intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1))
  assert dense.head_dim == 128 and not dense.is_moe  # the HF dense default


def test_from_paddle_list_fields_and_defaults():
  d = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, moe_num_experts=[8, 8], moe_k=2,
           moe_intermediate_size=[32, 16], moe_num_shared_experts=1, moe_layer_start_index=[1, 1],
           moe_layer_end_index=[3, 3], moe_use_aux_free=True, num_nextn_predict_layers=1,
           tie_word_embeddings=True)
  c = paddle_config.read_text(d)
  assert (c.moe_num_experts, c.moe_intermediate_size, c.moe_layer_start_index) == (8, 32, 1)
  assert c.rope_theta == 10000.0 and c.rms_norm_eps == 1e-6  # PaddleFormers defaults
  assert c.num_mtp_layers == 1


@pytest.mark.parametrize("changes, field", [
  (dict(num_key_value_heads=3), "num_key_value_heads"),
  (dict(moe_k=9), "moe_k"),
  (dict(moe_k=0), "moe_k"),
  (dict(moe_layer_start_index=7), "moe_layer_start_index"),
  (dict(moe_layer_end_index=9), "moe_layer_end_index"),
  (dict(moe_layer_start_index=2, moe_layer_end_index=1), "moe_layer_end_index"),
  (dict(moe_layer_start_index=2, moe_layer_end_index=2, moe_layer_interval=2), "moe_layer_interval"),
  (dict(head_dim=15), "head_dim"),
  (dict(hidden_size=0), "hidden_size"),
  (dict(dtype="float64"), "dtype"),
  (dict(moe_impl="magic"), "moe_impl"),
  (dict(eos_token_id=5000), "eos_token_id"),
  (dict(moe_intermediate_size=0), "moe_intermediate_size"),
  (dict(scan_unroll=0), "scan_unroll"),
  (dict(attention_impl="flash"), "attention_impl"),
  (dict(attention_impl="cudnn"), "attention_impl"),  # cuDNN attention refuses float32
])
def test_contradictions_name_the_field(changes, field):
  with pytest.raises(ConfigError) as e:
    ModelConfig.tiny_moe(num_hidden_layers=4, **changes)
  assert e.value.field == field and field in str(e.value)


def test_reader_errors_name_the_field():
  with pytest.raises(ConfigError, match="model_type"):
    hf_config.read_text(_hf_moe(model_type="llama"))
  with pytest.raises(ConfigError, match="hidden_size"):
    d = _hf_moe()
    del d["hidden_size"]
    hf_config.read_text(d)
  with pytest.raises(ConfigError, match="rope_type"):
    hf_config.read_text(_hf_moe(rope_parameters={"rope_type": "yarn", "factor": 4.0}))
  with pytest.raises(ConfigError, match="moe_k"):
    hf_config.read_text(_hf_moe(moe_k=20))
  with pytest.raises(ConfigError, match="unknown field"):
    ModelConfig.from_dict({**ModelConfig.tiny_dense().to_dict(), "hiden_size": 3})


def test_round_trip_dict():
  c = ModelConfig.tiny_moe(num_mtp_layers=1)
  assert ModelConfig.from_dict(c.to_dict()) == c


def test_null_fields_read_as_their_defaults():
  """transformers >= 5.25 writes unset MoE fields as null (e.g. num_nextn_predict_layers): the defaults apply."""
  c = hf_config.read_text(_hf_moe(num_nextn_predict_layers=None, moe_norm_min=None))
  assert c.num_mtp_layers == 0 and c.moe_norm_min == 1e-12


def test_vl_round_trip_keeps_token_ids_and_nulls_read_as_defaults():
  """The VL reader once took the token-id VALUES as keys and always returned the defaults: eos 7 came back as 2."""
  cfg = VLConfig.tiny(pad_token_id=5, bos_token_id=6, eos_token_id=7)
  d = hf_config.write_vl(cfg)
  assert hf_config.read_vl(d) == cfg
  d["text_config"]["eos_token_id"] = [7, 8]  # generation configs list several stop ids: the first is ours
  assert hf_config.read_vl(d).eos_token_id == 7
  for key in ("moe_norm_min", "rms_norm_eps", "moe_num_shared_experts", "max_position_embeddings"):
    d["text_config"][key] = None
  for key in ("depth", "patch_size", "hidden_act", "rms_norm_eps"):
    d["vision_config"][key] = None
  d["tie_word_embeddings"] = None
  c = hf_config.read_vl(d)
  assert (c.moe_norm_min, c.rms_norm_eps, c.moe_num_shared_experts, c.max_position_embeddings,
          c.tie_word_embeddings) == (1e-12, 1e-5, 2, 131072, cfg.tie_word_embeddings)
  assert (c.vision.depth, c.vision.patch_size, c.vision.hidden_act, c.vision.layer_norm_eps) == (
    32, 14, "quick_gelu", 1e-6)
