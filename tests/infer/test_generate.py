"""Generation: KV-cached greedy decoding vs transformers, cached vs full-forward logits, sampling,
stop tokens, tokenizers, the CLI and input validation. CPU, tiny random models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ernie_jax
from tests.helpers import REPO_ROOT
from ernie_jax.infer.generate import (decode_step, generate, generate_array, pad_prompts,
                                      prefill)
from ernie_jax.infer.sampling import sample
from ernie_jax.data.tokenizers import TokenizerError, load_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = REPO_ROOT
VOCAB = 128
# Different lengths on purpose (they are right-padded into one batch). No pad/eos ids inside.
PROMPTS = [[5, 17, 33, 8, 91], [12, 4], [100, 3, 77, 45, 60, 21, 9, 14, 120, 66, 31]]
NEW = 32


# --------------------------------------------------------------------------------------------------
# Tiny random transformers models with large weights (so greedy decoding is not trivial).
def _scramble(model, seed: int):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "e_score_correction_bias" in name:
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
      elif p.ndim >= 2:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
      else:  # RMSNorm weights
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
  return model.eval()


def _hf_dense():
  cfg = transformers.Ernie4_5Config(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=False)
  return _scramble(transformers.Ernie4_5ForCausalLM(cfg), 0)


def _hf_moe():
  cfg = transformers.Ernie4_5_MoeConfig(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_num_experts=8, moe_k=2,
    moe_intermediate_size=32, moe_num_shared_experts=1, moe_layer_start_index=1,
    tie_word_embeddings=True)
  return _scramble(transformers.Ernie4_5_MoeForCausalLM(cfg), 1)


def _hf_greedy(hf, prompt, n):
  """transformers' greedy generate on one unpadded prompt, eos stopping disabled."""
  hf.generation_config.eos_token_id = None
  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=None,
                      pad_token_id=0)
  return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["dense", "moe"])
def pair(request, tmp_path_factory):
  """(transformers model, its saved dir, ernie_jax model loaded from that dir)."""
  torch.manual_seed(0)
  hf = _hf_dense() if request.param == "dense" else _hf_moe()
  path = tmp_path_factory.mktemp(f"hf_{request.param}")
  hf.save_pretrained(path)
  model = ernie_jax.from_pretrained(path)
  return request.param, hf, str(path), model


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf_dense_only")
  _hf_dense().save_pretrained(path)
  return str(path), ernie_jax.from_pretrained(path)


# --------------------------------------------------------------------------------------------------
def test_greedy_matches_transformers(pair):
  kind, hf, _, model = pair
  ref = [_hf_greedy(hf, p, NEW) for p in PROMPTS]
  for r in ref:
    assert len(r) == NEW
    assert len(set(r)) > 3, f"{kind}: reference output is degenerate: {r}"
  out = generate(model, PROMPTS, max_new_tokens=NEW, stop_tokens=())
  assert out == ref


def test_cached_logits_equal_full_forward(pair):
  kind, _, _, model = pair
  n = 12
  tokens, lengths = pad_prompts(PROMPTS, 16, model.config.pad_token_id)
  cache = model.init_cache(len(PROMPTS), 32)
  logits, cache = prefill(model, tokens, lengths, cache)
  steps = [np.asarray(logits)]
  seqs = [list(p) for p in PROMPTS]
  for t in range(n - 1):
    cur = np.asarray(jnp.argmax(logits, -1))
    for s, c in zip(seqs, cur):
      s.append(int(c))
    logits, cache = decode_step(model, cur, lengths + t, cache)
    steps.append(np.asarray(logits))
  cached = np.stack(steps, axis=1)  # [B, n, V]: logits predicting new token j of each row

  # Full forward over each (prompt + generated) sequence, right-padded into one batch: causal
  # attention makes the padding irrelevant for the positions compared.
  full_tokens, _ = pad_prompts(seqs, 32, model.config.pad_token_id)
  graphdef, state = nnx.split(model)
  full = np.asarray(jax.jit(lambda st, t: nnx.merge(graphdef, st)(t).logits)(state, full_tokens))
  for b, p in enumerate(PROMPTS):
    want = full[b, len(p) - 1:len(p) - 1 + n]
    scale = np.abs(want).max()
    np.testing.assert_allclose(cached[b], want, rtol=0, atol=1e-5 * scale, err_msg=f"{kind} row {b}")


# --------------------------------------------------------------------------------------------------
# Sampling.
def test_sampling_reductions_to_greedy():
  logits = jax.random.normal(jax.random.key(0), (16, 50)) * 3
  greedy = np.asarray(jnp.argmax(logits, -1))
  key = jax.random.key(1)
  np.testing.assert_array_equal(sample(logits, key), greedy)  # static temperature 0
  # Traced temperature / top_p: one program per top_k for all settings; traced 0 means greedy.
  f = jax.jit(sample, static_argnames="top_k")
  np.testing.assert_array_equal(f(logits, key, temperature=0.0, top_p=0.5), greedy)
  np.testing.assert_array_equal(f(logits, key, temperature=1.5, top_k=1, top_p=1.0), greedy)
  np.testing.assert_array_equal(f(logits, key, temperature=1.0, top_p=1e-6), greedy)
  # Same key, same draw; only tokens of the top-k set are drawn.
  a = np.asarray(f(logits, key, temperature=2.0, top_k=5, top_p=1.0))
  np.testing.assert_array_equal(a, f(logits, key, temperature=2.0, top_k=5, top_p=1.0))
  top5 = np.asarray(jax.lax.top_k(logits, 5)[1])
  many = np.stack([np.asarray(f(logits, k, temperature=2.0, top_k=5, top_p=1.0))
                   for k in jax.random.split(jax.random.key(2), 30)])  # [30, 16]
  assert all(np.isin(many[:, i], top5[i]).all() for i in range(16))
  assert len(np.unique(many[:, 0])) > 1  # it does sample


def test_sampling_distribution():
  logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0, 0.3])
  n, t = 4000, 0.8
  batch = jnp.tile(logits, (n, 1))

  def freqs(**kw):
    toks = np.asarray(sample(batch, jax.random.key(7), **kw))
    return np.bincount(toks, minlength=6) / n

  p = np.asarray(jax.nn.softmax(logits / t))
  np.testing.assert_allclose(freqs(temperature=t), p, atol=0.03)
  # top-k 3: renormalised over the 3 best.
  keep = np.argsort(-p)[:3]
  pk = np.zeros(6)
  pk[keep] = p[keep] / p[keep].sum()
  np.testing.assert_allclose(freqs(temperature=t, top_k=3), pk, atol=0.03)
  # top-p: the smallest prefix (by probability) with mass >= 0.7.
  order = np.argsort(-p)
  m = int(np.searchsorted(np.cumsum(p[order]), 0.7) + 1)
  pp = np.zeros(6)
  pp[order[:m]] = p[order[:m]] / p[order[:m]].sum()
  assert 1 < m < 6
  np.testing.assert_allclose(freqs(temperature=t, top_p=0.7), pp, atol=0.03)


def test_generate_sampling_seeded(dense_model):
  _, model = dense_model
  kw = dict(max_new_tokens=16, temperature=1.0, top_k=20, top_p=0.95, stop_tokens=())
  a = generate(model, PROMPTS, seed=3, **kw)
  assert a == generate(model, PROMPTS, seed=3, **kw)
  assert a != generate(model, PROMPTS, seed=4, **kw)
  greedy = generate(model, PROMPTS, max_new_tokens=16, stop_tokens=())
  assert generate(model, PROMPTS, max_new_tokens=16, temperature=1.0, top_k=1, seed=5,
                  stop_tokens=()) == greedy


# --------------------------------------------------------------------------------------------------
def test_stop_tokens(dense_model):
  _, model = dense_model
  pad = model.config.pad_token_id
  ref = generate(model, PROMPTS, max_new_tokens=16, stop_tokens=())
  # A stop token that row 0 produces at index >= 2 and that some other row never produces.
  stop = next(t for j, t in enumerate(ref[0]) if j >= 2 and t not in ref[0][:j]
              and any(t not in r for r in ref[1:]))
  g = generate_array(model, PROMPTS, max_new_tokens=16, stop_tokens=[stop])
  out = g.to_lists()
  for r, o in zip(ref, out):
    want = r[:r.index(stop) + 1] if stop in r else r  # stop token included, nothing after it
    assert o == want
  assert len(out[0]) < 16 and any(len(o) == 16 for o in out[1:])
  assert g.steps == 16
  assert (g.tokens[0, len(out[0]):] == pad).all()
  # Every row stops at its first token: the loop ends after one step.
  g = generate_array(model, PROMPTS, max_new_tokens=16, stop_tokens=[r[0] for r in ref])
  assert g.steps == 1 and g.to_lists() == [[r[0]] for r in ref]
  assert (g.tokens[:, 1:] == pad).all()
  # Default: the config's eos id.
  eos = model.config.eos_token_id
  assert generate(model, PROMPTS, max_new_tokens=16) == [
    r[:r.index(eos) + 1] if eos in r else r for r in ref]


def test_bfloat16_smoke(dense_model):
  path, _ = dense_model
  model = ernie_jax.from_pretrained(path, dtype="bfloat16", param_dtype="bfloat16")
  out = generate(model, PROMPTS[:2], max_new_tokens=4, temperature=0.7, top_p=0.9)
  assert all(1 <= len(o) <= 4 and all(0 <= t < VOCAB for t in o) for o in out)


# --------------------------------------------------------------------------------------------------
def test_input_validation(dense_model):
  _, model = dense_model
  bad = [
    (dict(prompts=[]), "empty"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[1, 2, 3]), r"\[\[\.\.\.\]\]"),
    (dict(prompts=["hello"]), "tokenizer"),
    (dict(prompts=[[1, VOCAB]]), "outside the vocabulary"),
    (dict(prompts=[[1, -1]]), "outside the vocabulary"),
    (dict(prompts=[[1.0, 2.0]]), "integer"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_len=9), "max_len=9 is too small"),  # needs 3 + 8 - 1 = 10 slots
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(stop_tokens=[VOCAB + 5]), "stop token"),
    (dict(seed="x"), "seed"),
  ]
  for kw, msg in bad:
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=8)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
      generate(model, args.pop("prompts"), **args)
  assert generate(model, [[1, 2], [3]], max_new_tokens=0) == [[], []]
  assert len(generate(model, [[1, 2, 3]], max_new_tokens=8, max_len=10, stop_tokens=())[0]) == 8
  with pytest.raises(ValueError, match="max_position_embeddings"):
    generate(model, [[1]], max_new_tokens=model.config.max_position_embeddings + 1)


# --------------------------------------------------------------------------------------------------
# Tokenizers.
TEXT = ("the quick brown fox jumps over the lazy dog. a small model writes small words. "
        "hello world, hello tokens. generation with a cache is fast.")


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
  spm = pytest.importorskip("sentencepiece")
  d = tmp_path_factory.mktemp("spm")
  lines = [TEXT] + TEXT.split(". ") * 4
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(lines), model_prefix=str(d / "tokenizer"), vocab_size=80,
    model_type="bpe", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
  return str(d / "tokenizer.model")


@pytest.fixture(scope="module")
def hf_tok_file(tmp_path_factory):
  tk = pytest.importorskip("tokenizers")
  tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tk.pre_tokenizers.Metaspace()
  tok.decoder = tk.decoders.Metaspace()
  trainer = tk.trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<s>", "</s>"])
  tok.train_from_iterator([TEXT] * 4, trainer)
  d = tmp_path_factory.mktemp("hftok")
  tok.save(str(d / "tokenizer.json"))
  return str(d / "tokenizer.json")


def test_sentencepiece_tokenizer(spm_file):
  for path in (spm_file, os.path.dirname(spm_file)):
    tok = load_tokenizer(path)
    ids = tok.encode("hello world, the lazy fox")
    assert ids and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == "hello world, the lazy fox"
    assert tok.bos_id == 1 and tok.eos_id == 2  # SentencePiece defaults: <unk>=0 <s>=1 </s>=2
    assert ids[0] != tok.bos_id and tok.encode("hello", add_bos=True)[0] == tok.bos_id
    assert tok.decode(ids + [tok.eos_id]) == "hello world, the lazy fox"
    assert tok.decode(ids + [tok.eos_id], skip_special_tokens=False).endswith("</s>")


def test_hf_tokenizer(hf_tok_file):
  tok = load_tokenizer(os.path.dirname(hf_tok_file))
  assert tok.vocab_size <= VOCAB  # also used as the CLI test's tokenizer
  text = "hello world, the lazy fox jumps."
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.eos_id == 2 and tok.bos_id == 1
  assert tok.decode(ids + [tok.eos_id]) == text


def test_tokenizer_errors(tmp_path, spm_file):
  with pytest.raises(TokenizerError, match="not found"):
    load_tokenizer(tmp_path / "missing")
  with pytest.raises(TokenizerError, match="tokenizer.model"):
    load_tokenizer(tmp_path)
  bad = tmp_path / "tokenizer.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(TokenizerError, match="cannot load"):
    load_tokenizer(tmp_path)


# --------------------------------------------------------------------------------------------------
def test_cli(dense_model, hf_tok_file):
  path, model = dense_model
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [sys.executable, "-m", "ernie_jax.cli.generate"]
  r = subprocess.run(cmd + ["--checkpoint", path, "--tokens", "5 17 33", "--tokens", "12,4",
                            "--prompt", "hello world", "--tokenizer", hf_tok_file,
                            "--max-new-tokens", "6", "--ignore-eos", "--json"],
                     capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert r.returncode == 0, r.stderr
  recs = [json.loads(line) for line in r.stdout.splitlines()]
  assert [r["prompt_ids"] for r in recs[:2]] == [[5, 17, 33], [12, 4]]
  prompt_ids = [r["prompt_ids"] for r in recs]
  assert prompt_ids[2] == load_tokenizer(hf_tok_file).encode("hello world")
  assert [r["output_ids"] for r in recs] == generate(model, prompt_ids, max_new_tokens=6,
                                                     stop_tokens=())
  assert "text" in recs[0]


def test_cli_demo(capsys):
  from ernie_jax.cli.generate import main

  assert main(["--demo", "--max-new-tokens", "4"]) == 0
  out = capsys.readouterr().out
  assert out.count("output ids:") == 3 and "tokens/s" in out

def test_cli_argument_errors(dense_model, capsys):
  from ernie_jax.cli.generate import main

  path, _ = dense_model
  for argv, msg in [([], "exactly one of"), (["--checkpoint", path], "at least one prompt"),
                    (["--checkpoint", path, "--prompt", "hi"], "needs a tokenizer"),
                    (["--demo", "--tokens", "1 x"], "integers")]:
    with pytest.raises(SystemExit) as e:
      main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
  assert main(["--checkpoint", path, "--tokens", f"1 {VOCAB}"]) == 1
  assert "outside the vocabulary" in capsys.readouterr().err
