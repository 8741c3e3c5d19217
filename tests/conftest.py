"""Test setup: 8 fake CPU devices (set before jax is imported) and shared fixtures. The tests mirror
the packages (`tests/<package>/test_*.py`); shared builders are `hf_reference`, `vl_reference`,
`vl_paddle_writer` and `helpers`."""

import os

from tests import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory):
  """A persistent XLA compilation cache directory shared by the tests that start training runs."""
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def mesh():
  """A one-device mesh (the train step's single-device reference)."""
  from ernie_jax.parallel import MeshConfig, make_mesh

  return make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])

