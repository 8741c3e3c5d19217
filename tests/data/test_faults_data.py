"""Bad input data (issue 14): never trained on silently, refused with one line naming file:line / the file.

Non-string JSONL text, malformed / fieldless / non-UTF-8 JSONL lines, Latin-1 text for a text tokenizer
(refused, or skipped and counted with data.bad_rows=skip); token files: negative ids, a size that is not a
whole number of ids, uint32 ids read as uint16 (the pretokenize sidecar carries the dtype), a sidecar that
disagrees with its file. No model is compiled here.
"""

import json
import os

import numpy as np
import pytest

from ernie_jax.cli.pretokenize import main as pretokenize_main
from ernie_jax.data import ByteTokenizer, DataConfig, DataError, DataPipeline, TextDocuments, TokenWindows
from ernie_jax.data.pipeline import load_tokenizer_for, unigram_entropy
from ernie_jax.data.sources import read_sidecar, sidecar_path
from ernie_jax.data.vl import ImageCaptions


def _lines(tmp_path, name, rows):
  """A file of the given lines (str rows are encoded as UTF-8, bytes rows are written as they are)."""
  p = tmp_path / name
  p.write_bytes(b"".join((r if isinstance(r, bytes) else r.encode()) + b"\n" for r in rows))
  return str(p)


def _one_line(e) -> str:
  msg = str(e.value)
  assert "\n" not in msg
  return msg


# ---------------------------------------------------------------------------------------------- JSONL
NON_STRINGS = [("null", "is null"), ("12345", "is a number (12345)"), ('["a", "b"]', 'is a list (["a", "b"])'),
               ("true", "is a boolean"), ('{"x": 1}', "is an object")]


@pytest.mark.parametrize("value,says", NON_STRINGS)
def test_jsonl_non_string_text_is_refused_with_file_and_line(tmp_path, value, says):
  f = _lines(tmp_path, "d.jsonl", ['{"text": "fine"}', '{"text": ' + value + '}'])
  docs = TextDocuments([f], "jsonl")
  assert docs[0] == "fine"
  with pytest.raises(DataError) as e:
    docs[1]  # was: the string "None" / "12345" / "['a', 'b']"
  assert _one_line(e).startswith(f"{f}:2: field 'text' {says}") and "data.bad_rows=skip" in str(e.value)


def test_jsonl_bad_lines_name_file_and_line(tmp_path):
  f = _lines(tmp_path, "d.jsonl", ['{"text": "ok"}', "", '{"text": "half', '{"body": "x"}', '[1, 2]',
                                   b'{"text": "caf\xe9"}'])  # Latin-1 bytes
  docs = TextDocuments([f], "jsonl")
  assert len(docs) == 5  # the empty line is no document, but it counts for the line numbers
  expected = {1: f"{f}:3: not valid JSON", 2: f"{f}:4: no field 'text'; found ['body']",
              3: f"{f}:5: is a list, not a JSON object", 4: f"{f}:6: not UTF-8 (byte 0xe9"}
  for i, start in expected.items():
    with pytest.raises(DataError) as e:
      docs[i]
    assert _one_line(e).startswith(start), str(e.value)


def test_jsonl_first_line_check_names_file_and_line(tmp_path):
  f = _lines(tmp_path, "d.jsonl", ['{"text": "a"}'])
  with pytest.raises(DataError, match=f"^{f}:1: no field 'body'.*data.jsonl_field='body'"):
    TextDocuments([f], "jsonl", field="body")
  g = _lines(tmp_path, "e.jsonl", ["not json", '{"text": "b"}'])
  with pytest.raises(DataError, match=f"^{g}:1: not valid JSON"):
    TextDocuments([g], "jsonl")
  assert TextDocuments([g], "jsonl", bad_rows="skip")[1] == "b"  # skip: one usable row among the first is enough
  with pytest.raises(DataError, match=f"^{g}:1: not valid JSON.*all bad"):  # e.g. a wrong data.jsonl_field
    TextDocuments([g], "jsonl", field="body", bad_rows="skip")
  with pytest.raises(DataError, match="data.bad_rows must be one of"):
    TextDocuments([f], "jsonl", bad_rows="ignore")


def test_jsonl_bad_rows_skip_counts_and_trains_only_good_rows(tmp_path, caplog):
  rows = ['{"text": "good one"}', '{"text": null}', '{"text": 12345}', "{broken", '{"text": "good two"}']
  f = _lines(tmp_path, "d.jsonl", rows)
  docs = TextDocuments([f], "jsonl", bad_rows="skip")
  with caplog.at_level("WARNING"):
    assert [docs[i] for i in range(len(docs))] == ["good one", None, None, None, "good two"]
    [docs[i] for i in range(len(docs))]  # a second epoch counts nothing twice
  assert sorted(docs.skipped) == [1, 2, 3] and docs.skipped[2].startswith(f"{f}:3: field 'text' is a number")
  assert docs.skip_summary().startswith(f"skipped 3 bad row(s) (data.bad_rows=skip), first: {f}:2:")
  assert sum("skipped so far" in r.getMessage() for r in caplog.records) == 1  # logged at the 1st (then 10th...)

  cfg = DataConfig(source="jsonl", paths=f, seq_len=8, shuffle=False, bad_rows="skip")
  tok = ByteTokenizer()
  pipe = DataPipeline(cfg, tok, batch_size=1, eos_id=2)
  text = tok.decode(np.concatenate([np.concatenate([r["inputs"][0][:1], r["targets"][0]])
                                    for r in (next(pipe) for _ in range(4))]), skip_special_tokens=False)
  assert text.startswith("good one</s>good two</s>good one") and "None" not in text and "12345" not in text
  assert len(pipe.source.skipped) == 3
  assert 0 < unigram_entropy(cfg, tok, 2, 300) < np.log(256)  # skips the bad rows too


def test_pipeline_error_from_a_read_thread_is_one_data_error(tmp_path):
  f = _lines(tmp_path, "d.jsonl", ['{"text": "a"}', '{"text": "b"}', '{"text": ["x"]}'])
  pipe = DataPipeline(DataConfig(source="jsonl", paths=f, seq_len=4, shuffle=False), ByteTokenizer(),
                      batch_size=1, eos_id=2)
  with pytest.raises(DataError) as e:
    for _ in range(10):
      next(pipe)
  assert _one_line(e).startswith(f"{f}:3: field 'text' is a list")


def test_image_jsonl_bad_rows_name_file_and_line(tmp_path):
  (tmp_path / "0.png").write_bytes(b"")  # only its existence is checked here
  f = _lines(tmp_path, "c.jsonl", ['{"image": "0.png", "text": "a cat"}', '{"image": "0.png", "text": null}',
                                   '{"image": "0.png"'])
  src = ImageCaptions([f])
  assert src.caption(0) == "a cat"
  with pytest.raises(DataError, match=f"^{f}:2: field 'text' is null"):
    src.caption(1)
  with pytest.raises(DataError, match=f"^{f}:3: not valid JSON"):
    src.caption(2)


# ------------------------------------------------------------------------------------ non-UTF-8 text
def test_latin1_text_is_refused_or_counted_for_text_tokenizers(tmp_path):
  f = _lines(tmp_path, "t.txt", ["plain line", "caf\xe9 au lait".encode("latin-1"), "last"])
  # a byte-level tokenizer takes the bytes as they are (nothing is replaced): unchanged
  assert TextDocuments([f], "line")[1] == b"caf\xe9 au lait"
  # a text tokenizer decodes: strict, not U+FFFD
  docs = TextDocuments([f], "line", decode=True)
  assert docs[0] == "plain line"
  with pytest.raises(DataError) as e:
    docs[1]
  assert _one_line(e).startswith(f"{f}:2: not UTF-8 (byte 0xe9 at column 4)") and "iconv" in str(e.value)
  skip = TextDocuments([f], "line", bad_rows="skip", decode=True)
  assert [skip[i] for i in range(3)] == ["plain line", None, "last"] and list(skip.skipped) == [1]
  # whole-file documents name the line of the first bad byte
  with pytest.raises(DataError, match=f"^{f}:2: not UTF-8"):
    TextDocuments([f], "file", decode=True)[0]


def test_bpe_training_on_latin1_text_is_refused(tmp_path):
  pytest.importorskip("tokenizers")
  f = _lines(tmp_path, "t.txt", ["caf\xe9".encode("latin-1")] + [f"line {i}" for i in range(20)])
  cfg = DataConfig(source="text", paths=f, text_mode="line", tokenizer="bpe", bpe_vocab_size=300)
  with pytest.raises(DataError, match=f"^{f}:1: not UTF-8"):
    load_tokenizer_for(cfg, str(tmp_path / "w"))  # was: trained on "caf\ufffd"
  tok = load_tokenizer_for(DataConfig(**{**cfg.__dict__, "bad_rows": "skip"}), str(tmp_path / "w"))
  assert tok.decode(tok.encode("line 7")) == "line 7"


# ----------------------------------------------------------------------------------------- token files
def test_negative_token_ids_are_refused(tmp_path):
  tokens = np.array([5, 6, 2, 7, -3, 9, 2, 10, 11], np.int32)
  np.save(tmp_path / "t.npy", tokens)
  tokens.astype(np.int16).tofile(tmp_path / "t.bin")
  for path, dtype in ((tmp_path / "t.npy", "uint16"), (tmp_path / "t.bin", "int16")):
    with pytest.raises(DataError) as e:
      TokenWindows([str(path)], seq_len=4, eos_id=2, dtype=dtype)  # was: max id 11 < vocab, accepted
    assert _one_line(e).startswith(f"{path}: token id -3 at position 4 is negative") and "pretokenize" in str(e.value)
  np.save(tmp_path / "ok.npy", np.abs(tokens))
  src = TokenWindows([str(tmp_path / "ok.npy")], seq_len=4, eos_id=2)
  assert src.min_token_id() == 2 and src.max_token_id() == 11
  src.check_vocab(12)
  with pytest.raises(DataError, match="holds token id 11 >= model.vocab_size 11"):
    src.check_vocab(11)


def _pretokenize(tmp_path, *extra):
  f = _lines(tmp_path, "c.jsonl", [json.dumps({"text": f"document number {i}"}) for i in range(50)])
  out = str(tmp_path / "c.bin")
  assert pretokenize_main(["--input", f, "--mode", "jsonl", "--tokenizer", "bytes", "--output", out, *extra]) == 0
  return out


def test_pretokenize_default_uint32_is_read_right_by_the_default_config(tmp_path):
  out = _pretokenize(tmp_path)  # --dtype uint32 (the default); data.token_dtype is uint16 by default
  meta = read_sidecar(out)
  tokens = np.fromfile(out, np.uint32)
  assert (meta["dtype"], meta["count"], meta["documents"], meta["eos_id"], meta["vocab_size"]) == \
    ("uint32", len(tokens), 50, 2, 259)
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
  cfg = DataConfig(source="tokens", paths=out, seq_len=32, shuffle=False)
  assert cfg.token_dtype == "uint16"
  b = next(DataPipeline(cfg, None, batch_size=2, eos_id=2))
  np.testing.assert_array_equal(b["inputs"][0], tokens[:32])  # was: every other id 0
  assert ByteTokenizer().decode(b["inputs"][0][:17]) == "document number 0"


def test_token_file_sidecar_mismatches_are_refused(tmp_path):
  out = _pretokenize(tmp_path, "--dtype", "uint16")
  TokenWindows([out], seq_len=8, eos_id=2)
  with pytest.raises(DataError, match=r"separated by id 2 .* uses EOS id 1: set data.eos_id=2"):
    TokenWindows([out], seq_len=8, eos_id=1)
  with open(out, "ab") as f:  # changed after it was written
    f.write(np.array([7, 8], np.uint16).tobytes())
  with pytest.raises(DataError) as e:
    TokenWindows([out], seq_len=8, eos_id=2)
  assert _one_line(e).startswith(f"{out}: holds {read_sidecar(out)['count'] + 2} uint16 ids but {out}.json says")
  with open(sidecar_path(out), "w") as f:
    f.write("{not json")
  with pytest.raises(DataError, match=f"^{out}.json: not a usable token-file sidecar"):
    TokenWindows([out], seq_len=8, eos_id=2)
  with open(sidecar_path(out), "w") as f:
    json.dump({"dtype": "uint16", "count": 1}, f)
  with pytest.raises(DataError, match="not a token-file sidecar"):
    TokenWindows([out], seq_len=8, eos_id=2)


def test_raw_token_files_without_sidecar(tmp_path):
  ids = np.random.default_rng(0).integers(3, 259, 1000)
  odd = tmp_path / "odd.bin"
  odd.write_bytes(ids.astype(np.uint16).tobytes() + b"\x01")
  with pytest.raises(DataError) as e:
    TokenWindows([str(odd)], seq_len=8, eos_id=2)  # was: numpy's "Size of available data is not a multiple"
  assert _one_line(e).startswith(f"{odd}: its 2001 bytes are not a whole number of uint16 ids")
  wide = tmp_path / "wide.bin"
  ids.astype(np.uint32).tofile(wide)
  with pytest.raises(DataError, match=f"^{wide}: every other id is 0 or 1.*data.token_dtype=uint32"):
    TokenWindows([str(wide)], seq_len=8, eos_id=2, dtype="uint16")  # was: trained on every-other-id-zero rows
  src = TokenWindows([str(wide)], seq_len=8, eos_id=2, dtype="uint32")
  np.testing.assert_array_equal(src.tokens(0), ids[:9])
  narrow = tmp_path / "narrow.bin"
  ids.astype(np.uint16).tofile(narrow)
  np.testing.assert_array_equal(TokenWindows([str(narrow)], seq_len=8, eos_id=2).tokens(1), ids[8:17])


def test_pretokenize_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
  f = _lines(tmp_path, "d.jsonl", ['{"text": "a"}', '{"text": null}'])
  out = tmp_path / "d.bin"
  assert pretokenize_main(["--input", str(f), "--mode", "jsonl", "--tokenizer", "bytes", "--output", str(out)]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"error: {f}:2: field 'text' is null") and err.count("\n") == 1
  assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]  # no output, no sidecar, no .tmp
  assert pretokenize_main(["--input", str(f), "--mode", "jsonl", "--tokenizer", "bytes", "--output", str(out),
                           "--bad-rows", "skip"]) == 0
  printed = capsys.readouterr().out
  assert printed.startswith("1 documents -> 2 tokens") and f"skipped 1 bad row(s) (data.bad_rows=skip), first: {f}:2" in printed
  assert read_sidecar(str(out))["documents"] == 1 and np.fromfile(out, np.uint32).tolist() == [ord("a") + 3, 2]
  assert pretokenize_main(["--input", str(f), "--mode", "jsonl", "--tokenizer", "bytes", "--bad-rows", "skip",
                           "--output", str(tmp_path / "x.npy")]) == 1
  assert ".npy" in capsys.readouterr().err
