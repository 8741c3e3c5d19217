"""Pretraining data: sources, tokenizers, packing with segment ids, the grain pipeline (deterministic,
checkpointable, per-process sharded), and that packed documents never see each other in the model."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax import ErnieForCausalLM, ModelConfig
from ernie_jax.data import (ByteTokenizer, DataConfig, DataError, DataPipeline, TextDocuments,
                            TokenWindows, document_example, load_tokenizer_for, unigram_entropy,
                            window_example)
from ernie_jax.data.sources import expand_paths


def _take(pipe, n):
  return [next(pipe) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_byte_tokenizer_roundtrip():
  tok = ByteTokenizer()
  text = "def f(x):\n    return x  # é ✓"
  ids = tok.encode(text)
  assert min(ids) >= 3 and max(ids) < tok.vocab_size == 259
  assert tok.decode(ids) == text
  assert tok.decode([1] + ids + [2], skip_special_tokens=False) == "<s>" + text + "</s>"


def test_document_example_shifts_and_ends():
  ex = document_example(np.array([10, 11, 12]), bos_id=1, eos_id=2, add_bos=True, add_eos=True)
  np.testing.assert_array_equal(ex["inputs"], [1, 10, 11, 12])
  np.testing.assert_array_equal(ex["targets"], [10, 11, 12, 2])
  assert document_example(np.array([], np.int32), bos_id=1, eos_id=2, add_bos=False, add_eos=False) is None


def test_window_example_cuts_at_eos():
  ex = window_example(np.array([5, 6, 2, 7, 8, 2, 9]), eos_id=2)
  np.testing.assert_array_equal(ex["inputs"], [5, 6, 2, 7, 8, 2])
  np.testing.assert_array_equal(ex["targets"], [6, 2, 7, 8, 2, 9])
  np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(ex["positions"], [0, 1, 2, 0, 1, 2])
  # the EOS input would predict the next document's first token: masked
  np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 0, 1, 1, 0])


def _write(tmp_path, name, text):
  p = tmp_path / name
  p.write_text(text)
  return str(p)


def test_text_sources(tmp_path):
  f = _write(tmp_path, "a.txt", "first doc\n\nsecond doc\nthird\n")
  assert [d for d in TextDocuments([f], "line")] == [b"first doc", b"second doc", b"third"]
  assert TextDocuments([f], "file")[0] == b"first doc\n\nsecond doc\nthird\n"
  j = _write(tmp_path, "b.jsonl", json.dumps({"text": "héllo"}) + "\n" + json.dumps({"text": "x"}) + "\n")
  assert list(TextDocuments([j], "jsonl")) == ["héllo", "x"]
  with pytest.raises(DataError, match="no field 'body'"):
    TextDocuments([j], "jsonl", field="body")
  with pytest.raises(DataError, match="no file matches"):
    expand_paths(str(tmp_path / "missing*.txt"))


def test_token_windows_memmap(tmp_path):
  tokens = np.array([5, 6, 2, 7, 8, 9, 2, 10, 11, 12, 13], np.uint16)
  tokens.tofile(tmp_path / "t.bin")
  np.save(tmp_path / "t.npy", tokens.astype(np.int32))
  for path, dtype in ((tmp_path / "t.bin", "uint16"), (tmp_path / "t.npy", "uint16")):
    src = TokenWindows([str(path)], seq_len=4, eos_id=2, dtype=dtype)
    assert len(src) == 2 and src.max_token_id() == 13
    np.testing.assert_array_equal(src.tokens(1), [8, 9, 2, 10, 11])
    np.testing.assert_array_equal(src[1]["segment_ids"], [1, 1, 1, 2])


def test_stdlib_pipeline_packs_deterministically_and_resumes():
  cfg = DataConfig(source="stdlib", seq_len=64, max_documents=40, shuffle_window=16)
  tok = load_tokenizer_for(cfg, None)
  a = DataPipeline(cfg, tok, batch_size=4, eos_id=2)
  first = _take(a, 3)
  b = first[0]
  assert b["inputs"].shape == (4, 64) and b["inputs"].dtype == np.int32
  # targets are the next input within a document; segment ids and positions restart per document
  same = (b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1])
  np.testing.assert_array_equal(np.where(same, b["inputs"][:, 1:], 0), np.where(same, b["targets"][:, :-1], 0))
  assert np.all(np.where(same, b["positions"][:, 1:] == b["positions"][:, :-1] + 1, True))
  assert np.all(b["loss_mask"] == (b["segment_ids"] > 0))
  # same config -> same batches; state save / restore continues exactly
  assert _same(first, _take(DataPipeline(cfg, tok, batch_size=4, eos_id=2), 3))
  state = json.loads(json.dumps(a.get_state()))
  nxt = _take(a, 4)
  c = DataPipeline(cfg, tok, batch_size=4, eos_id=2)
  c.set_state(state)
  assert _same(nxt, _take(c, 4))


def test_pipeline_shard_reads_every_other_document(tmp_path):
  f = _write(tmp_path, "docs.txt", "".join(f"doc{i:03d}\n" for i in range(20)))
  cfg = DataConfig(source="text", paths=f, text_mode="line", seq_len=5, shuffle=False, add_eos=False)
  tok = ByteTokenizer()
  seen = []
  for p in range(2):
    pipe = DataPipeline(cfg, tok, batch_size=1, eos_id=2, shard_index=p, shard_count=2)
    rows = [tok.decode(np.concatenate([r["inputs"][0][:1], r["targets"][0]])) for r in _take(pipe, 10)]
    seen.append(rows)
  assert seen[0] == [f"doc{i:03d}" for i in range(0, 20, 2)]
  assert seen[1] == [f"doc{i:03d}" for i in range(1, 20, 2)]


def test_bpe_tokenizer_trained_and_cached(tmp_path):
  pytest.importorskip("tokenizers")
  cfg = DataConfig(source="stdlib", tokenizer="bpe", bpe_vocab_size=300, bpe_train_documents=20)
  tok = load_tokenizer_for(cfg, str(tmp_path))
  assert os.path.isfile(tmp_path / "tokenizer.json") and tok.vocab_size == 300
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  text = "import os\nprint(os.getcwd())\n"
  assert tok.decode(tok.encode(text)) == text
  assert load_tokenizer_for(cfg, str(tmp_path)).encode(text) == tok.encode(text)  # reused


def test_unigram_entropy_of_bytes():
  cfg = DataConfig(source="stdlib", max_documents=50)
  h = unigram_entropy(cfg, ByteTokenizer(), 2, 320)
  assert 2.0 < h < np.log(256)


def test_packing_never_leaks_attention_across_documents():
  """Logits of a packed row equal the logits of each document run alone (MoE model)."""
  tok = ByteTokenizer()
  docs = [tok.encode_array(t) for t in ("alpha beta gamma", "x = 1", "print('hello world')")]
  rows = [document_example(d, bos_id=1, eos_id=2, add_bos=True, add_eos=True) for d in docs]
  inputs = np.concatenate([r["inputs"] for r in rows])[None]
  seg = np.concatenate([np.full(len(r["inputs"]), i + 1) for i, r in enumerate(rows)])[None]
  pos = np.concatenate([np.arange(len(r["inputs"])) for r in rows])[None]
  for cfg in (ModelConfig.tiny_moe(vocab_size=320),):
    model = ErnieForCausalLM(cfg, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, x, p, s: m(x, p, s).logits)
    packed = forward(model, jnp.asarray(inputs), jnp.asarray(pos), jnp.asarray(seg))[0]
    # each document alone (right-padded to the same length: causal, so padding changes nothing before it)
    alone = np.zeros((len(rows),) + inputs.shape[1:], np.int32)
    for i, r in enumerate(rows):
      alone[i, :len(r["inputs"])] = r["inputs"]
    ones = np.ones_like(alone)
    single = forward(model, jnp.asarray(alone), jnp.broadcast_to(jnp.arange(alone.shape[1]), alone.shape), jnp.asarray(ones))
    start = 0
    for i, r in enumerate(rows):
      n = len(r["inputs"])
      np.testing.assert_allclose(packed[start:start + n], single[i, :n], atol=2e-5, rtol=2e-5)
      start += n


def test_pretokenize_then_train_windows(tmp_path):
  from ernie_jax.cli.pretokenize import main

  f = _write(tmp_path, "c.jsonl", "".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(50)))
  assert main(["--input", f, "--mode", "jsonl", "--tokenizer", "bytes", "--output", str(tmp_path / "c.bin"),
               "--dtype", "uint16"]) == 0
  tokens = np.fromfile(tmp_path / "c.bin", np.uint16)
  assert tokens[-1] == 2 and ByteTokenizer().decode(tokens[:17]) == "document number 0" and tokens[17] == 2
  cfg = DataConfig(source="tokens", paths=str(tmp_path / "c.bin"), seq_len=32, shuffle=False)
  pipe = DataPipeline(cfg, None, batch_size=2, eos_id=2)
  b = next(pipe)
  assert b["inputs"].shape == (2, 32)
  np.testing.assert_array_equal(b["inputs"][0], tokens[:32])
  assert b["segment_ids"][0, 17] == 1 and b["segment_ids"][0, 18] == 2 and b["loss_mask"][0, 17] == 0
