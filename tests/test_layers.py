"""The import layers (pyproject's [tool.importlinter]): pipeline <- trainer <- serving <-
deploy, benchmarks and tests on top. `lint-imports` is the judge; these tests run it on the
repository and on a copy with one upward import added, so a contract that stops biting fails
here too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("pipeline", "trainer", "serving", "deploy", "benchmarks", "tests")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]'")
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy's packages before the installed ones
    return subprocess.run([exe, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def copy_sources(dst: Path) -> Path:
    for package in PACKAGES:
        for src in (REPO / package).rglob("*.py"):
            target = dst / src.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
    shutil.copyfile(REPO / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_the_repository_keeps_the_layer_contract():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    "module, imports, message",
    [
        ("pipeline/_upward.py", "from trainer import model", "pipeline is not allowed to import trainer"),
        ("trainer/_upward.py", "def f():\n    import serving.predictor", "trainer is not allowed to import serving"),
        ("serving/_upward.py", "import deploy.steps", "serving is not allowed to import deploy"),
        ("deploy/_upward.py", "from tests import helpers", "deploy is not allowed to import tests"),
    ],
)
def test_an_upward_import_breaks_it(tmp_path, module, imports, message):
    root = copy_sources(tmp_path)
    (root / module).write_text(imports + "\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert message in result.stdout, result.stdout
