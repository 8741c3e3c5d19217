"""SFT pipeline: packing keeps conversations whole and apart (targets / loss_mask right at segment boundaries),
padding, truncation at a turn boundary and drop counting, bad-row skipping counted, resume via get_state /
set_state, process sharding, held-out batches, config errors, and the embedded stdlib Q&A dataset."""

import json

import numpy as np
import pytest

from ernie_jax.data import KEYS, ByteTokenizer, DataError, stdlib_qa
from ernie_jax.data.chat_template import render_chat
from ernie_jax.data.sft import (ChatDataConfig, load_chat_tokenizer, make_chat_eval_batches, make_chat_pipeline,
                                train_rows)

TOK = ByteTokenizer()


def _conv(i, turns=1, answer_len=10, loss=True):
  msgs = [{"role": "system", "content": f"sys {i}"}] if i % 3 == 0 else []
  for t in range(turns):
    msgs += [{"role": "user", "content": f"q{i}.{t}?"},
             {"role": "assistant", "content": f"<think>\n\n</think>\n\n{'a' * answer_len} {i}.{t}", "loss": loss}]
  return {"messages": msgs}


def _jsonl(tmp_path, rows, name="chats.jsonl"):
  p = tmp_path / name
  p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(p)


def _example(messages):
  ids, mask = render_chat(messages, TOK)
  return ids[:-1], ids[1:], mask[1:]


def _segments(batch):
  """Every (inputs, targets, loss_mask, positions) of every segment of every row."""
  out = []
  for r in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][r]
    assert np.all(batch["loss_mask"][r][seg == 0] == 0) and np.all(batch["inputs"][r][seg == 0] == 0)
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))  # contiguous
      out.append(tuple(batch[k][r][idx] for k in ("inputs", "targets", "loss_mask", "positions")))
  return out


def test_packing_keeps_conversations_whole_and_apart(tmp_path):
  rows = [_conv(i, turns=1 + i % 2, answer_len=3 + 5 * (i % 4)) for i in range(12)]
  cfg = ChatDataConfig(paths=_jsonl(tmp_path, rows), eval_fraction=0.0, seq_len=160, shuffle=False, packing_bins=2)
  pipe = make_chat_pipeline(cfg, TOK, batch_size=2)
  want = {tuple(_example(r["messages"])[0]): _example(r["messages"]) for r in rows}
  seen, per_row = [], []
  for _ in range(8):  # more than one epoch
    b = next(pipe)
    assert set(b) == set(KEYS) and all(v.shape == (2, 160) and v.dtype == np.int32 for v in b.values())
    per_row += [len(np.unique(s[s > 0])) for s in b["segment_ids"]]
    for inputs, targets, loss_mask, positions in _segments(b):
      ref = want[tuple(inputs)]  # a whole conversation, tokens and mask exactly as rendered alone
      np.testing.assert_array_equal(targets, ref[1])
      np.testing.assert_array_equal(loss_mask, ref[2])
      np.testing.assert_array_equal(positions, np.arange(len(inputs)))
      assert inputs[0] == TOK.bos_id and targets[-1] == TOK.eos_id and loss_mask[-1] == 1  # own EOS, trained
      seen.append(tuple(inputs))
  assert max(per_row) > 1  # rows do hold several conversations
  assert set(seen) == set(want)  # every conversation, none cut or lost
  assert pipe.stats == {"rows": 12, "truncated": 0, "dropped": 0, "skipped": 0}


def test_padding_one_conversation_per_row(tmp_path):
  rows = [_conv(i) for i in range(5)]
  cfg = ChatDataConfig(paths=_jsonl(tmp_path, rows), eval_fraction=0.0, seq_len=64, packing=False, shuffle=False)
  b = next(make_chat_pipeline(cfg, TOK, batch_size=5))
  for r, row in enumerate(rows):
    inputs, targets, mask = _example(row["messages"])
    n = len(inputs)
    np.testing.assert_array_equal(b["inputs"][r][:n], inputs)
    np.testing.assert_array_equal(b["targets"][r][:n], targets)
    np.testing.assert_array_equal(b["loss_mask"][r][:n], mask)
    np.testing.assert_array_equal(b["segment_ids"][r], (np.arange(64) < n).astype(np.int32))
    assert not b["targets"][r][n:].any() and not b["loss_mask"][r][n:].any()


def test_truncate_at_turn_boundary_and_drop(tmp_path):
  three = _conv(1, turns=3, answer_len=20)["messages"]
  two_len = len(render_chat(three[:4], TOK)[0])
  seq_len = two_len + 5  # two turns fit, three do not
  long_single = _conv(2, answer_len=seq_len)  # even its only turn does not fit
  unsupervised_first = {"messages": _conv(4, turns=1, answer_len=5, loss=False)["messages"] +
                        _conv(5, turns=1, answer_len=seq_len)["messages"]}  # fits only with an untrained turn
  path = _jsonl(tmp_path, [{"messages": three}, long_single, unsupervised_first, _conv(3)])
  cfg = ChatDataConfig(paths=path, eval_fraction=0.0, seq_len=seq_len, packing=False, shuffle=False)
  pipe = make_chat_pipeline(cfg, TOK, batch_size=2)
  b = next(pipe)
  inputs, targets, mask = _example(three[:4])  # the first two turns, whole
  n = len(inputs)
  np.testing.assert_array_equal(b["inputs"][0][:n], inputs)
  np.testing.assert_array_equal(b["loss_mask"][0][:n], mask)
  assert b["targets"][0][n - 1] == TOK.eos_id and b["segment_ids"][0][n] == 0
  np.testing.assert_array_equal(b["inputs"][1][:len(_example(_conv(3)["messages"])[0])],
                                _example(_conv(3)["messages"])[0])
  assert pipe.stats == {"rows": 4, "truncated": 1, "dropped": 2, "skipped": 0}
  drop = make_chat_pipeline(cfg.__class__(**{**cfg.__dict__, "overlong": "drop"}), TOK, batch_size=1)
  np.testing.assert_array_equal(next(drop)["inputs"][0][:len(_example(_conv(3)["messages"])[0])],
                                _example(_conv(3)["messages"])[0])
  assert drop.stats["dropped"] == 3 and drop.stats["truncated"] == 0


def test_bad_rows_skipped_and_counted(tmp_path):
  rows = [_conv(0), "{not json", {"messages": [{"role": "user", "content": "x"}]}, _conv(1), {"src": ["a"]}]
  path = _jsonl(tmp_path, rows)
  with pytest.raises(DataError, match=f"{path}:2: not valid JSON"):
    p = make_chat_pipeline(ChatDataConfig(paths=path, eval_fraction=0.0, shuffle=False), TOK, batch_size=1)
    [next(p) for _ in range(3)]
  pipe = make_chat_pipeline(ChatDataConfig(paths=path, eval_fraction=0.0, shuffle=False, bad_rows="skip"), TOK,
                            batch_size=1, )
  [next(pipe) for _ in range(3)]
  assert pipe.stats == {"rows": 5, "truncated": 0, "dropped": 0, "skipped": 3}


def test_resume_gives_the_same_batches(tmp_path):
  rows = [_conv(i, turns=1 + i % 3, answer_len=4 + i % 7) for i in range(40)]
  cfg = ChatDataConfig(paths=_jsonl(tmp_path, rows), eval_fraction=0.0, seq_len=128, seed=3)
  pipe = make_chat_pipeline(cfg, TOK, batch_size=3)
  for _ in range(15):  # into the second epoch
    next(pipe)
  state = json.loads(json.dumps(pipe.get_state()))
  after = [next(pipe) for _ in range(4)]
  fresh = make_chat_pipeline(cfg, TOK, batch_size=3)
  fresh.set_state(state)
  again = [next(fresh) for _ in range(4)]
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(after, again) for k in KEYS)
  first = next(make_chat_pipeline(cfg, TOK, batch_size=3))
  other_seed = next(make_chat_pipeline(cfg.__class__(**{**cfg.__dict__, "seed": 4}), TOK, batch_size=3))
  assert not np.array_equal(first["inputs"], other_seed["inputs"])


def test_process_shards_are_disjoint_and_eval_split(tmp_path):
  rows = [_conv(i) for i in range(20)]
  cfg = ChatDataConfig(paths=_jsonl(tmp_path, rows), eval_fraction=0.2, seq_len=64, packing=False, shuffle=False)
  firsts = []
  for p in range(2):
    pipe = make_chat_pipeline(cfg, TOK, batch_size=8, shard_index=p, shard_count=2)
    firsts.append({tuple(r) for r in next(pipe)["inputs"]})
    assert pipe.stats["rows"] == 8  # 16 training rows, 8 per process
  assert not firsts[0] & firsts[1]
  stats = {}
  ev = make_chat_eval_batches(cfg, TOK, batch_size=3, stats=stats)
  assert len(ev) == 2 and stats["rows"] == 4
  held = {tuple(r) for b in ev for r, s in zip(b["inputs"], b["segment_ids"]) if s.any()}
  assert len(held) == 4 and not held & (firsts[0] | firsts[1])
  assert not any(ev[-1][k][1:].any() for k in KEYS)  # the last batch: 1 conversation + 2 all-zero rows
  assert make_chat_eval_batches(cfg.__class__(**{**cfg.__dict__, "eval_fraction": 0.0}), TOK, batch_size=2) == []


@pytest.mark.parametrize("field,value,match", [
  ("format", "alpaca", "data.format"), ("template", "chatml", "data.template"), ("overlong", "cut", "data.overlong"),
  ("bad_rows", "ignore", "data.bad_rows"), ("seq_len", 0, "data.seq_len"), ("eval_fraction", 1.5, "eval_fraction"),
  ("paths", "/nonexistent/*.jsonl", "data.paths: no file matches"),
])
def test_config_errors_name_the_field(field, value, match):
  with pytest.raises(DataError, match=match):
    make_chat_pipeline(ChatDataConfig(**{field: value}), TOK, batch_size=1)


def test_embedded_dataset_is_deterministic_with_disjoint_splits():
  train, held = stdlib_qa.conversations("train"), stdlib_qa.conversations("heldout")
  stdlib_qa.functions.cache_clear()
  stdlib_qa._conversations.cache_clear()
  assert stdlib_qa.conversations("train") == train and stdlib_qa.conversations("heldout") == held
  assert 300 <= len(train) <= 3000 and 20 <= len(held) <= 300

  def asked(rows):
    return {m["content"].split("`")[1] for r in rows for m in r if m["role"] == "user"}

  assert not asked(train) & asked(held)
  funcs = {f[1]: f for f in stdlib_qa.functions()}
  assert "json.dumps" in funcs and funcs["json.dumps"][3].startswith("Serialize")
  kinds = {"thinking": 0, "empty_think": 0, "multi_turn": 0, "system": 0}
  for r in train:
    answers = [m["content"] for m in r if m["role"] == "assistant"]
    kinds["multi_turn"] += len(answers) > 1
    kinds["system"] += r[0]["role"] == "system"
    for a, q in zip(answers, [m["content"] for m in r if m["role"] == "user"]):
      module, qual, sig, summary = funcs[q.split("`")[1]]
      assert a.endswith(summary) and len(summary) <= stdlib_qa.MAX_ANSWER
      if a.startswith(stdlib_qa.EMPTY_THINK):
        kinds["empty_think"] += 1
      else:  # real reasoning naming the module and the signature
        assert a.startswith("<think>\n") and f" {module}," in a and sig in a and "\n</think>\n\n" in a
        kinds["thinking"] += 1
  assert all(v >= 20 for v in kinds.values()), kinds
  # the default config trains on it: batches come, and the held-out split gives padded batches
  cfg = ChatDataConfig()
  assert next(make_chat_pipeline(cfg, TOK, batch_size=2))["loss_mask"].sum() > 0
  ev = make_chat_eval_batches(cfg, TOK, batch_size=16)
  assert sum(int(b["segment_ids"].max(1).astype(bool).sum()) for b in ev) == len(held)


def test_load_chat_tokenizer_trains_bpe(tmp_path):
  cfg = ChatDataConfig(tokenizer="bpe", bpe_vocab_size=300, bpe_train_rows=50)
  tok = load_chat_tokenizer(cfg, str(tmp_path))
  assert (tmp_path / "tokenizer.json").is_file()
  ids, mask = render_chat(train_rows(cfg)[0], tok)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and mask[-1] == 1  # ERNIE's markers -> <s> / </s>
  assert tok.decode(ids) == tok.decode(tok.encode(tok.decode(ids)))
