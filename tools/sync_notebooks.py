"""Re-sync the notebook pairs notebooks/NN_*.py (jupytext percent format: the file to review) and
notebooks/NN_*.ipynb (what Colab opens): `jupytext --sync` on each pair (the newer file of a pair wins, so
edit either), then the .ipynb's outputs are stripped.

  python tools/sync_notebooks.py                    # after editing a .py, or an .ipynb in Jupyter
  python tools/sync_notebooks.py --check            # exit 1 if a pair is out of sync (what the test checks)
  python tools/sync_notebooks.py --repo https://github.com/ORG/NAME   # set the project's git URL

`jupytext --sync notebooks/[0-9]*.py` alone also syncs, but keeps the outputs of a notebook run in Jupyter.
`--repo` replaces the placeholder repository URL in the notebooks' first cell (ERNIE_JAX_REPO) and in the
README's "Open in Colab" badges (then syncs).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys

import jupytext
import nbformat
from jupytext.cli import jupytext as jupytext_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
REPO_LINE = re.compile(r'(ERNIE_JAX_REPO", ")(https://github\.com/[\w.-]+/[\w.-]+)(")')
BADGE = re.compile(r"(colab\.research\.google\.com/github/)([\w.-]+/[\w.-]+)(/blob/)")


def pairs() -> list[tuple[str, str]]:
  return [(py, py[:-3] + ".ipynb") for py in sorted(glob.glob(os.path.join(NOTEBOOKS, "[0-9][0-9]_*.py")))]


def stripped(nb):
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
    cell.metadata.pop("execution", None)
  return nb


def cells(nb) -> list[tuple[str, str]]:
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


def set_repo(url: str) -> None:
  m = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+?)(\.git)?/?", url)
  if not m:
    sys.exit(f"error: --repo must be https://github.com/OWNER/NAME, got {url!r}")
  for py, _ in pairs():
    text = open(py).read()
    new = REPO_LINE.sub(lambda g: g.group(1) + f"https://github.com/{m.group(1)}" + g.group(3), text)
    open(py, "w").write(new)
  readme = os.path.join(ROOT, "README.md")
  text = open(readme).read()
  open(readme, "w").write(BADGE.sub(lambda g: g.group(1) + m.group(1) + g.group(3), text))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--check", action="store_true", help="only check; exit 1 when a pair differs")
  p.add_argument("--repo", help="the project's GitHub URL, replacing the placeholder")
  args = p.parse_args(argv)
  if args.repo:
    set_repo(args.repo)
  bad = 0
  for py, ipynb in pairs():
    if args.check:
      if not os.path.exists(ipynb) or cells(jupytext.read(ipynb)) != cells(jupytext.read(py)):
        print(f"out of sync: {os.path.relpath(py, ROOT)}")
        bad += 1
      continue
    jupytext_cli(["--sync", "--quiet", py])
    nb = nbformat.read(ipynb, as_version=4)
    if any(c.cell_type == "code" and (c.outputs or c.execution_count) for c in nb.cells):
      nbformat.write(stripped(nb), ipynb)
    print(f"synced {os.path.relpath(py, ROOT)} <-> {os.path.basename(ipynb)}")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
