"""DPO preference data: the row layout (chosen / rejected of pair k in segments 2k-1 / 2k, token by token against
`ChatRenderer.encode` of the two full conversations), the ERNIEKit DPO format, packing whole pairs, ref_logps
placement, bad rows by file:line, overlong truncation / dropping, resume, per-pair batches, and the embedded pairs."""

import json
import re

import numpy as np
import pytest

from ernie_jax.data import KEYS, ByteTokenizer, DataError, stdlib_qa
from ernie_jax.data.chat_template import render_chat, render_prompt
from ernie_jax.data.preference import (REF_KEY, PreferenceDataConfig, load_preference_tokenizer,
                                       make_preference_pipeline, num_train_pairs, parse_pair_row,
                                       preference_pair_batches, train_rows)
from ernie_jax.data.tokenizers import get_tokenizer

TOK = get_tokenizer("bytes")
assert isinstance(TOK, ByteTokenizer)

PROMPT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi?"},
          {"role": "assistant", "content": "<think>\n\n</think>\n\nHello."},
          {"role": "user", "content": "What is 2+2?"}]
CHOSEN = "<think>\nTwo and two.\n</think>\n\nFour."  # thinking
REJECTED = "<think>\n\n</think>\n\nFive, I think."  # non-thinking: the empty think tag is not trained
END_THINK = "</think>\n\n"


def _jsonl(tmp_path, rows, name="pairs.jsonl"):
  p = tmp_path / name
  p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(p)


def _row(i, turns=1, answer_len=6):
  msgs = [{"role": "system", "content": f"sys {i}"}] if i % 3 == 0 else []
  for t in range(turns - 1):
    msgs += [{"role": "user", "content": f"q{i}.{t}?"}, {"role": "assistant", "content": f"a{i}.{t}"}]
  msgs.append({"role": "user", "content": f"q{i}?"})
  return {"messages": msgs, "chosen": f"{'c' * answer_len} {i}", "rejected": f"{'r' * (answer_len + i % 4)} {i}"}


def _encode(prompt, answer):
  """ids / mask of prompt + answer as one conversation, the prompt's assistant turns untrained."""
  msgs = [dict(m, loss=False) for m in prompt] + [{"role": "assistant", "content": answer}]
  return render_chat(msgs, TOK)


def _expected_row(pairs, seq_len):
  """The row layout built by hand from (ids, mask) of each pair's chosen and rejected conversations."""
  row = {k: [] for k in KEYS}
  for k, (chosen, rejected) in enumerate(pairs):
    for half, (ids, mask) in enumerate((chosen, rejected)):
      n = len(ids) - 1
      row["inputs"] += list(ids[:-1])
      row["targets"] += list(ids[1:])
      row["loss_mask"] += list(mask[1:])
      row["positions"] += list(range(n))
      row["segment_ids"] += [2 * k + 1 + half] * n
  return {k: np.asarray(v + [0] * (seq_len - len(v)), np.int32) for k, v in row.items()}


def _pairs_of(batch):
  """Per row, the list of (chosen, rejected) segments as dicts of arrays; checks the segment structure."""
  out = []
  for r in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][r]
    n = int((seg > 0).sum())
    assert np.all(seg[n:] == 0) and not any(batch[k][r][n:].any() for k in batch)  # padding: zeros at the end
    if n == 0:  # an all-zero filler row
      out.append([])
      continue
    ids = [int(s) for s in seg[:n][np.r_[True, np.diff(seg[:n]) != 0]]]
    assert ids == list(range(1, len(ids) + 1)) and len(ids) % 2 == 0, ids  # 1, 2, ..., 2m: whole pairs, in order
    segs = [{k: v[r][seg == s] for k, v in batch.items()} for s in ids]
    for s in segs:
      np.testing.assert_array_equal(s["positions"], np.arange(len(s["inputs"])))
    out.append(list(zip(segs[0::2], segs[1::2])))
  return out


def test_row_layout_token_by_token(tmp_path):
  chosen, rejected = _encode(PROMPT, CHOSEN), _encode(PROMPT, REJECTED)
  prompt_len = len(render_prompt(PROMPT, TOK))
  assert not chosen[1][:prompt_len].any() and chosen[1][prompt_len:].all()  # only the (thinking) answer is trained
  empty = len(TOK.encode("<think>\n\n</think>\n\n"))
  assert not rejected[1][:prompt_len + empty].any() and rejected[1][prompt_len + empty:].all()
  assert chosen[0][-1] == rejected[0][-1] == TOK.eos_id  # <|end_of_sentence|>, trained
  simple = _row(1)
  rows = [{"messages": PROMPT, "chosen": {"role": "assistant", "content": CHOSEN}, "rejected": REJECTED}, simple]
  path = _jsonl(tmp_path, rows)
  second = (_encode(simple["messages"], simple["chosen"]), _encode(simple["messages"], simple["rejected"]))
  seq_len = 400
  cfg = PreferenceDataConfig(paths=path, eval_fraction=0.0, seq_len=seq_len, shuffle=False, packing_bins=1,
                             pairs_per_row=2)
  packed = next(make_preference_pipeline(cfg, TOK, batch_size=1))
  want = _expected_row([(chosen, rejected), second], seq_len)  # pair 1 in segments 1 / 2, pair 2 in 3 / 4
  assert set(packed) == set(KEYS) and all(v.dtype == np.int32 and v.shape == (1, seq_len) for v in packed.values())
  for k in KEYS:
    np.testing.assert_array_equal(packed[k][0], want[k], err_msg=k)
  padded = next(make_preference_pipeline(PreferenceDataConfig(**{**cfg.__dict__, "packing": False}), TOK,
                                         batch_size=2))
  for r, pair in enumerate([(chosen, rejected), second]):
    want = _expected_row([pair], seq_len)
    for k in KEYS:
      np.testing.assert_array_equal(padded[k][r], want[k], err_msg=k)
  batches, indices = preference_pair_batches(cfg, TOK, batch_size=2)
  assert all(np.array_equal(batches[0][k], padded[k]) for k in KEYS) and indices[0].tolist() == [0, 1]


def test_erniekit_rows_equal_messages_rows(tmp_path):
  messages = {"messages": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
  erniekit = {"system": "You are terse.", "src": ["Hi?", "What is 2+2?"], "tgt": ["<think>\n\n</think>\n\nHello."],
              "response": [[REJECTED], [CHOSEN]], "sort": [0, 1]}
  with_is_system = {"src": ["You are terse.", "Hi?", "What is 2+2?"], "tgt": ["-", "<think>\n\n</think>\n\nHello."],
                    "response": [CHOSEN, REJECTED], "sort": [2.5, -1], "is_system": 1}
  assert parse_pair_row(erniekit) == parse_pair_row(with_is_system) == parse_pair_row(messages)
  single = {"src": "What is 2+2?", "tgt": [], "response": ["Four.", "Five."], "sort": [1, 0]}
  assert parse_pair_row(single) == parse_pair_row({"messages": [{"role": "user", "content": "What is 2+2?"}],
                                                   "chosen": [{"role": "assistant", "content": "Four."}],
                                                   "rejected": "Five."})
  session = parse_pair_row({"src": ["q"], "tgt": [], "response": [["a", "more?", "b"], ["x", "more?", "y"]],
                            "sort": [1, 0]})  # a multi-turn answer: its user turn is not trained
  assert [(m["role"], m["loss"]) for m in session.chosen] == [("assistant", True), ("user", False),
                                                               ("assistant", True)]
  path = _jsonl(tmp_path, [messages, erniekit, with_is_system])
  cfg = PreferenceDataConfig(paths=path, eval_fraction=0.0, seq_len=400)
  (batch,), _ = preference_pair_batches(cfg, TOK, batch_size=3)
  for k in KEYS:
    assert np.array_equal(batch[k][0], batch[k][1]) and np.array_equal(batch[k][0], batch[k][2])


def test_packing_on_embedded_data_keeps_pairs_whole():
  cfg = PreferenceDataConfig(seq_len=1400, pairs_per_row=3, packing_bins=4, seed=1)  # room for 4 pairs of most
  batches, indices = preference_pair_batches(cfg, TOK, batch_size=64)
  want = {}  # chosen inputs -> (chosen segment, rejected segment) rendered alone
  for b in batches:
    for pairs in _pairs_of(b):
      for c, r in pairs:
        want[tuple(c["inputs"])] = (c, r)
  assert len(want) == num_train_pairs(cfg)  # distinct chosen sequences, every pair fits
  pipe = make_preference_pipeline(cfg, TOK, batch_size=8)
  per_row = []
  for _ in range(6):
    for pairs in _pairs_of(next(pipe)):
      per_row.append(len(pairs))
      for c, r in pairs:
        ref_c, ref_r = want[tuple(c["inputs"])]
        for k in ("inputs", "targets", "loss_mask", "positions"):  # as rendered alone, side by side in the row
          np.testing.assert_array_equal(c[k], ref_c[k])
          np.testing.assert_array_equal(r[k], ref_r[k])
        assert c["loss_mask"].any() and r["loss_mask"].any()
  assert max(per_row) == 3 and min(per_row) >= 1  # packed, never more than pairs_per_row


def test_ref_logps_round_trip(tmp_path):
  rows = [_row(i, turns=1 + i % 3, answer_len=3 + i % 5) for i in range(14)]
  rows[5] = _row(5, answer_len=400)  # dropped (too long): no batch row, its ref value is never used
  cfg = PreferenceDataConfig(paths=_jsonl(tmp_path, rows), eval_fraction=0.0, seq_len=256, packing_bins=3,
                             overlong="drop")
  n = num_train_pairs(cfg)
  assert n == 14
  batches, indices = preference_pair_batches(cfg, TOK, batch_size=4)
  kept = np.concatenate(indices)
  assert kept[kept >= 0].tolist() == [i for i in range(14) if i != 5]  # source order, every usable row
  assert not any(batches[-1][k][(indices[-1] < 0)].any() for k in KEYS)  # all-zero filler rows

  def fake_logp(b, seg):  # a stand-in for the reference model: any function of one sequence
    m = b["segment_ids"] == seg
    return (np.where(m, b["targets"] * b["loss_mask"], 0).sum(1) / 1000.0 + m.sum(1)).astype(np.float32)

  ref = np.full((n, 2), np.nan, np.float32)
  for b, idx in zip(batches, indices):
    ref[idx[idx >= 0]] = np.stack([fake_logp(b, 1), fake_logp(b, 2)], 1)[idx >= 0]
  for p in range(2):
    pipe = make_preference_pipeline(cfg, TOK, batch_size=3, ref_logps=ref, shard_index=p, shard_count=2)
    for _ in range(4):
      b = next(pipe)
      assert b[REF_KEY].dtype == np.float32 and b[REF_KEY].shape == b["inputs"].shape
      for s in range(1, int(b["segment_ids"].max()) + 1):
        m = b["segment_ids"] == s
        first = m & ~np.pad(m, ((0, 0), (1, 0)))[:, :-1]
        assert not b[REF_KEY][m & ~first].any()  # only at the sequence's first token
        rows_with = m.any(1)
        np.testing.assert_allclose(np.where(m, b[REF_KEY], 0).sum(1)[rows_with], fake_logp(b, s)[rows_with],
                                   rtol=1e-6)
  with pytest.raises(DataError, match=r"ref_logps has shape \(13, 2\), expected \(14, 2\)"):
    make_preference_pipeline(cfg, TOK, batch_size=1, ref_logps=ref[1:])
  ref[3, 1] = np.nan
  with pytest.raises(DataError, match=f"{re.escape(cfg.paths)}:4: its reference log-probs .* are not finite"):
    pipe = make_preference_pipeline(PreferenceDataConfig(**{**cfg.__dict__, "shuffle": False}), TOK, batch_size=4,
                                    ref_logps=ref)
    [next(pipe) for _ in range(4)]


BAD = [
  ("{not json", "not valid JSON"),
  ({"messages": PROMPT, "chosen": "x"}, "no field 'rejected'"),
  ({"chosen": "a", "rejected": "b"}, "neither 'messages'"),
  ({"messages": PROMPT[:3], "chosen": "a", "rejected": "b"}, "messages ends with a assistant message"),
  ({"messages": PROMPT, "chosen": " ", "rejected": "b"}, "chosen is empty"),
  ({"messages": PROMPT, "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
  ({"messages": PROMPT, "chosen": 3, "rejected": "b"}, "chosen is a number"),
  ({"messages": PROMPT, "chosen": "a", "rejected": {"role": "user", "content": "b"}}, "rejected is a message with"),
  ({"messages": "hi", "chosen": "a", "rejected": "b"}, "messages is a string"),
  ({"src": ["q"], "tgt": ["a"], "response": ["x", "y"], "sort": [1, 0]}, r"ERNIEKit DPO row has len\(src\)=1, len"),
  ({"src": ["q"], "tgt": [], "response": ["x", "y"], "sort": [1, 1]}, r"field 'sort' is \[1, 1\]: equal scores"),
  ({"src": ["q"], "tgt": [], "response": ["x"], "sort": [1, 0]}, "field 'response' is .*, not a list of two"),
  ({"src": ["q"], "tgt": [], "response": [["x", "y"], "z"], "sort": [1, 0]}, r"response\[0\] holds 2 strings"),
]


@pytest.mark.parametrize("row,reason", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_row_names_file_and_line(tmp_path, row, reason):
  path = _jsonl(tmp_path, [_row(0), row])
  with pytest.raises(DataError, match=f"{re.escape(path)}:2: {reason}"):
    preference_pair_batches(PreferenceDataConfig(paths=path, eval_fraction=0.0), TOK, batch_size=2)


def test_bad_rows_skipped_and_counted(tmp_path):
  path = _jsonl(tmp_path, [_row(0)] + [r for r, _ in BAD] + [_row(1)])
  cfg = PreferenceDataConfig(paths=path, eval_fraction=0.0, bad_rows="skip", shuffle=False)
  pipe = make_preference_pipeline(cfg, TOK, batch_size=1)
  [next(pipe) for _ in range(3)]
  assert pipe.stats == {"rows": len(BAD) + 2, "truncated": 0, "dropped": 0, "skipped": len(BAD)}
  stats = {}
  batches, indices = preference_pair_batches(cfg, TOK, batch_size=4, stats=stats)
  assert indices[0].tolist() == [0, len(BAD) + 1, -1, -1] and stats["skipped"] == len(BAD)


def test_overlong_truncates_earliest_prompt_turns_or_drops(tmp_path):
  long = _row(0, turns=3)  # system + 2 earlier exchanges + last user turn
  cut = [long["messages"][0]] + long["messages"][3:]  # the first exchange dropped
  fits = sum(len(_encode(cut, long[k])[0]) - 1 for k in ("chosen", "rejected"))
  full = sum(len(_encode(long["messages"], long[k])[0]) - 1 for k in ("chosen", "rejected"))
  assert fits < full
  seq_len = fits + 2
  last_only = [long["messages"][0], long["messages"][-1]]
  huge = _row(1, answer_len=seq_len)  # even the answers alone do not fit
  short = _row(2)
  path = _jsonl(tmp_path, [long, huge, short])
  cfg = PreferenceDataConfig(paths=path, eval_fraction=0.0, seq_len=seq_len, packing=False, shuffle=False)
  pipe = make_preference_pipeline(cfg, TOK, batch_size=2)
  b = next(pipe)
  want = _expected_row([(_encode(cut, long["chosen"]), _encode(cut, long["rejected"]))], seq_len)
  assert all(np.array_equal(b[k][0], want[k]) for k in KEYS)
  assert pipe.stats == {"rows": 3, "truncated": 1, "dropped": 1, "skipped": 0}
  tight = PreferenceDataConfig(**{**cfg.__dict__, "seq_len": fits - 1})  # down to system + last user turn
  stats = {}
  b = preference_pair_batches(tight, TOK, batch_size=1, stats=stats)[0][0]
  want = _expected_row([(_encode(last_only, long["chosen"]), _encode(last_only, long["rejected"]))], fits - 1)
  assert all(np.array_equal(b[k][0], want[k]) for k in KEYS) and stats["truncated"] == 1
  drop = make_preference_pipeline(PreferenceDataConfig(**{**cfg.__dict__, "overlong": "drop"}), TOK, batch_size=1)
  assert np.array_equal(next(drop)["inputs"][0], _expected_row(
    [(_encode(short["messages"], short["chosen"]), _encode(short["messages"], short["rejected"]))], seq_len)["inputs"])
  assert drop.stats == {"rows": 3, "truncated": 0, "dropped": 2, "skipped": 0}


def test_resume_gives_the_same_batches():
  cfg = PreferenceDataConfig(seq_len=384, max_examples=60, seed=3, packing_bins=2)
  pipe = make_preference_pipeline(cfg, TOK, batch_size=4)
  for _ in range(12):  # into the second epoch
    next(pipe)
  state = json.loads(json.dumps(pipe.get_state()))
  after = [next(pipe) for _ in range(3)]
  fresh = make_preference_pipeline(cfg, TOK, batch_size=4)
  fresh.set_state(state)
  again = [next(fresh) for _ in range(3)]
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(after, again) for k in KEYS)
  assert pipe.stats["rows"] == 60


def test_embedded_pairs():
  train, held = stdlib_qa.preference_pairs("train"), stdlib_qa.preference_pairs("heldout")
  stdlib_qa._preference_pairs.cache_clear()
  assert stdlib_qa.preference_pairs("train") == train and stdlib_qa.preference_pairs("heldout") == held

  def funcs(rows):
    return {r["messages"][-1]["content"].split("`")[1] for r in rows}

  assert not funcs(train) & funcs(held)
  assert all(stdlib_qa.is_heldout(f) for f in funcs(held)) and not any(stdlib_qa.is_heldout(f) for f in funcs(train))
  # the same prompts and chosen answers as the SFT conversations (but the few whose answer has one word)
  for split, rows in (("train", train), ("heldout", held)):
    sft = [tuple((m["role"], m["content"]) for m in c) for c in stdlib_qa.conversations(split)]
    mine = [tuple((m["role"], m["content"]) for m in r["messages"]) + (("assistant", r["chosen"]),) for r in rows]
    kept = set(mine)
    assert [c for c in sft if c in kept] == mine and len(mine) >= 0.95 * len(sft)
  thinking = 0
  for r in train + held:
    c, j = r["chosen"], r["rejected"]
    assert c != j
    head, answer = c.split(END_THINK)
    assert j.startswith(head + END_THINK)  # the think block stays, only the answer's words move
    assert sorted(j[len(head + END_THINK):].split(" ")) == sorted(answer.split(" "))
    thinking += head != "<think>\n\n"
  assert 300 <= len(train) <= 3000 and 20 <= len(held) <= 300 and thinking >= 100
  cfg = PreferenceDataConfig()
  assert next(make_preference_pipeline(cfg, TOK, batch_size=2))["loss_mask"].sum() > 0
  batches, indices = preference_pair_batches(cfg, TOK, batch_size=32, split="heldout")
  assert sum(int((i >= 0).sum()) for i in indices) == len(held)


def test_config_errors_and_bpe(tmp_path):
  with pytest.raises(DataError, match="data.pairs_per_row"):
    make_preference_pipeline(PreferenceDataConfig(pairs_per_row=0), TOK, batch_size=1)
  with pytest.raises(DataError, match="data.overlong"):
    num_train_pairs(PreferenceDataConfig(overlong="cut"))
  with pytest.raises(DataError, match="split"):
    preference_pair_batches(PreferenceDataConfig(), TOK, batch_size=1, split="test")
  cfg = PreferenceDataConfig(tokenizer="bpe", bpe_vocab_size=300, bpe_train_rows=50)
  tok = load_preference_tokenizer(cfg, str(tmp_path))
  assert (tmp_path / "tokenizer.json").is_file()
  pair = train_rows(cfg)[0]
  ids, mask = render_chat(pair.prompt + pair.chosen, tok)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and mask[-1] == 1
