"""The notebooks (notebooks/*.ipynb, what Colab opens) run top to bottom on CPU in tiny mode, and each is
in sync with its jupytext twin notebooks/*.py (what reviewers diff).

Each notebook runs in a fresh kernel of this Python (a kernel spec written for `sys.executable`, so an
installed `python3` spec of another interpreter is never picked) with the notebook environment:
ERNIE_JAX_NOTEBOOK_SIZE=tiny, JAX_PLATFORMS=cpu, HF_HUB_OFFLINE=1 and a temporary run directory. The
test process's XLA_FLAGS (conftest's 8 fake devices) are NOT passed on: a notebook decides its own
device count (the expert-parallel one asks for 4 fake CPU devices in its first cell); the kernel gets only
the suite's compile flags (`tests.XLA_TEST_FLAGS`). A cell error or a
cell running past CELL_TIMEOUT_S fails the test, naming the cell. One test per notebook, so
`pytest -n 2` runs two at a time. Re-sync after editing: `python tools/sync_notebooks.py`.
"""

from __future__ import annotations

import os
import re
import sys
import time

import jupytext
import nbformat
import pytest

from tests import XLA_TEST_FLAGS
from tests.helpers import REPO_ROOT

NOTEBOOK_DIR = os.path.join(REPO_ROOT, "notebooks")
NOTEBOOKS = sorted(f[:-3] for f in os.listdir(NOTEBOOK_DIR) if f[:2].isdigit() and f.endswith(".py"))
CELL_TIMEOUT_S = 300
KERNEL = "ernie-jax-notebook-test"
# the first code cell's repository line (the URL is a placeholder until the project is published)
REPO_LINE = re.compile(r'ERNIE_JAX_REPO = os\.environ\.get\("ERNIE_JAX_REPO", "https://github\.com/([\w.-]+/[\w.-]+)"\)')
BADGE = re.compile(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/notebooks/(\w+)\.ipynb")


def _cells(nb) -> list[tuple[str, str]]:
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_every_notebook_is_paired_in_sync_and_stripped():
  """Each .py has its .ipynb with the same cells and no outputs; every notebook clones the same repository
  that the README's Colab badges point at, and each notebook has a badge."""
  assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"
  repos = set()
  ipynbs = sorted(f[:-6] for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb"))
  assert ipynbs == NOTEBOOKS, f"unpaired notebooks: .py {NOTEBOOKS} vs .ipynb {ipynbs}"
  for name in NOTEBOOKS:
    py = jupytext.read(os.path.join(NOTEBOOK_DIR, name + ".py"))
    ipynb = jupytext.read(os.path.join(NOTEBOOK_DIR, name + ".ipynb"))
    assert _cells(py) == _cells(ipynb), (f"notebooks/{name}.py and .ipynb differ: run "
                                         "`python tools/sync_notebooks.py`")
    for i, cell in enumerate(ipynb.cells):
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{name}.ipynb cell {i} has outputs: strip them"
    assert ipynb.metadata.get("kernelspec", {}).get("name") == "python3", f"{name}.ipynb: kernelspec python3"
    first_code = next(c.source for c in py.cells if c.cell_type == "code")
    m = REPO_LINE.search(first_code)
    assert m, f"{name}: the first code cell must set {REPO_LINE.pattern}"
    repos.add(m.group(1))
  with open(os.path.join(REPO_ROOT, "README.md")) as f:
    badges = BADGE.findall(f.read())
  assert sorted(n for _, n in badges) == NOTEBOOKS, f"README badges {badges} vs notebooks {NOTEBOOKS}"
  repos |= {r for r, _ in badges}
  assert len(repos) == 1, f"notebooks and README badges name different repositories: {sorted(repos)}"


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
  """A kernel spec dir with one spec that runs this interpreter's ipykernel."""
  from ipykernel.kernelspec import write_kernel_spec
  from jupyter_client.kernelspec import KernelSpecManager

  root = tmp_path_factory.mktemp("kernels")
  write_kernel_spec(str(root / KERNEL), overrides={"display_name": "ernie-jax tests"})
  manager = KernelSpecManager(kernel_dirs=[str(root)])
  assert manager.get_kernel_spec(KERNEL).argv[0] == sys.executable  # this venv's Python runs the notebooks
  return manager


def _notebook_env(workroot: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # see the module docstring
  env.update(XLA_FLAGS=XLA_TEST_FLAGS, ERNIE_JAX_NOTEBOOK_SIZE="tiny", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             ERNIE_JAX_NOTEBOOK_WORKDIR=workroot, MPLBACKEND="module://matplotlib_inline.backend_inline",
             TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(
               [REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  return env


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom_in_tiny_mode(name, tmp_path, kernel_spec_manager):
  from jupyter_client.manager import KernelManager
  from nbclient import NotebookClient
  from nbclient.exceptions import CellExecutionError, CellTimeoutError

  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name + ".ipynb"), as_version=4)
  km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_spec_manager)
  client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, startup_timeout=120,
                          resources={"metadata": {"path": NOTEBOOK_DIR}})
  t0 = time.perf_counter()
  try:
    client.execute(env=_notebook_env(str(tmp_path / "runs")))
  except (CellExecutionError, CellTimeoutError) as e:
    pytest.fail(f"notebooks/{name}.ipynb: {str(e)[-4000:]}", pytrace=False)
  elapsed = time.perf_counter() - t0
  print(f"{name}: {elapsed:.1f} s", file=sys.stderr)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code), "a code cell did not run"
  errors = [o for c in code for o in c.outputs if o.output_type == "error"]
  assert not errors, errors
  images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
  assert images >= 1, f"{name} drew no plot"
