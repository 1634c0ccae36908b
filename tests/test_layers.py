"""The layer contract (pyproject.toml's [tool.importlinter]): kept by the package, and broken by an upward import,
so that `lint-imports` in `make test` is a check that can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

LINT = Path(sys.executable).with_name("lint-imports")
pytestmark = pytest.mark.skipif(
    not LINT.exists(), reason="import-linter is not installed (pip install -e '.[test]')"
)


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(
        REPO / "src" / "mhsft", root / "src" / "mhsft", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_package_keeps_its_layers(tmp_path):
    p = _lint(_copy(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "3 kept, 0 broken" in p.stdout


@pytest.mark.parametrize(
    ("module", "upward", "contract"),
    [
        ("data/schema.py", "from mhsft.pipeline import plan", "stages are layered"),  # data above pipeline
        (
            "serve/engine.py",
            "from mhsft.train import loss",
            "stages are layered",
        ),  # serve and train independent
        ("utils.py", "import mhsft.model", "stages are layered"),  # the root modules are layered too
        ("eval/qa.py", "from mhsft.export import merge_weights", "eval generates through serve only"),
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward, contract):
    root = _copy(tmp_path)
    path = root / "src" / "mhsft" / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n\ndef _late():\n    {upward}\n", encoding="utf-8")
    p = _lint(root)
    assert p.returncode != 0
    assert f"{contract}" in p.stdout and "BROKEN" in p.stdout, p.stdout
