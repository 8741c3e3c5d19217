"""Data shards (`ernie_jax.data.shards`): the global batch and its order do not depend on the process count, and
a saved position resumes on another process count."""

import json

import numpy as np
import pytest

from ernie_jax.data import ByteTokenizer, DataConfig, DataError, DataPipeline
from ernie_jax.data.shards import ShardedBatches, merge_states

TOK = ByteTokenizer()
SHARDS, BATCH, ACCUM = 4, 8, 2


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  path = tmp_path_factory.mktemp("shards") / "docs.txt"
  rng = np.random.default_rng(0)
  path.write_text("".join(f"document {i} " + "x" * int(rng.integers(1, 30)) + "\n" for i in range(60)))
  return DataConfig(source="text", paths=str(path), text_mode="line", seq_len=16, shuffle_window=4)


def _batches(cfg, process_index, process_count, state=None):
  make = lambda i, n, rows: DataPipeline(cfg, TOK, batch_size=rows, eos_id=2, shard_index=i, shard_count=n)  # noqa: E731
  data = ShardedBatches(make, shards=SHARDS, global_batch=BATCH, grad_accum=ACCUM, process_index=process_index,
                        process_count=process_count)
  if state is not None:
    data.set_state(state)
  return data


def _global(parts: list[dict]) -> dict:
  """What `put_batch` builds from every process's local rows: micro-batch a = the processes' a-th slices in order."""
  out = {}
  for k in parts[0]:
    split = [p[k].reshape((ACCUM, -1) + p[k].shape[1:]) for p in parts]
    out[k] = np.concatenate(split, axis=1).reshape((-1,) + parts[0][k].shape[1:])
  return out


def _steps(cfg, process_count, n, states=None):
  procs = [_batches(cfg, p, process_count, None if states is None else states) for p in range(process_count)]
  batches = [_global([next(d) for d in procs]) for _ in range(n)]
  return batches, merge_states([json.loads(json.dumps(d.get_state())) for d in procs])


def test_same_global_batches_for_1_2_and_4_processes(cfg):
  one, _ = _steps(cfg, 1, 5)
  for count in (2, 4):
    other, _ = _steps(cfg, count, 5)
    for a, b in zip(one, other):
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
  # the shards hold different documents: the batch is not one shard repeated
  rows = one[0]["inputs"].reshape(ACCUM, SHARDS, -1, 16)
  assert not np.array_equal(rows[:, 0], rows[:, 1])


def test_micro_batches_take_every_shard(cfg):
  """Micro-batch a holds, for every shard in order, that shard's a-th rows (so grad accumulation sees the same
  rows whatever the process count)."""
  data = _batches(cfg, 0, 1)
  shards = [DataPipeline(cfg, TOK, batch_size=BATCH // SHARDS, eos_id=2, shard_index=i, shard_count=SHARDS)
            for i in range(SHARDS)]
  got = next(data)["inputs"].reshape(ACCUM, SHARDS, BATCH // SHARDS // ACCUM, -1)
  for i, s in enumerate(shards):
    own = next(s)["inputs"].reshape(ACCUM, BATCH // SHARDS // ACCUM, -1)
    np.testing.assert_array_equal(got[:, i], own)


def test_position_resumes_on_another_process_count(cfg):
  straight, _ = _steps(cfg, 1, 6)
  _, saved = _steps(cfg, 2, 3)  # three steps on two processes, position of all shards
  assert sorted(saved["shards"], key=int) == [str(i) for i in range(SHARDS)]
  for count in (1, 4):
    resumed, _ = _steps(cfg, count, 3, saved)
    for a, b in zip(straight[3:], resumed):
      np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_legacy_single_pipeline_position(cfg):
  """A position saved before data shards (one pipeline's state) resumes as shard 0 of 1."""
  old = DataPipeline(cfg, TOK, batch_size=BATCH, eos_id=2)
  for _ in range(2):
    next(old)
  state = old.get_state()
  make = lambda i, n, rows: DataPipeline(cfg, TOK, batch_size=rows, eos_id=2, shard_index=i, shard_count=n)  # noqa: E731
  new = ShardedBatches(make, shards=1, global_batch=BATCH, grad_accum=1)
  new.set_state(state)
  np.testing.assert_array_equal(next(new)["inputs"], next(old)["inputs"])


def test_errors(cfg):
  make = lambda i, n, rows: DataPipeline(cfg, TOK, batch_size=rows, eos_id=2, shard_index=i, shard_count=n)  # noqa: E731
  with pytest.raises(DataError, match="data_shards=3 is not a multiple of the 2 processes"):
    ShardedBatches(make, shards=3, global_batch=6, grad_accum=1, process_count=2)
  with pytest.raises(DataError, match="not divisible by run.data_shards=4 x run.grad_accum_steps=2"):
    ShardedBatches(make, shards=4, global_batch=4, grad_accum=2)
  data = _batches(cfg, 1, 2)
  with pytest.raises(DataError, match="not shard 2 of this run's run.data_shards=4"):
    data.set_state({"shards": {"0": {}, "1": {}}})
