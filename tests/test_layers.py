"""The import-linter contract of the layers holds, and would catch an import that runs back up a layer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint(package: Path) -> subprocess.CompletedProcess:
    """lint-imports on a copy of the package."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=package.parent,
        env={"PYTHONPATH": str(package.parent), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def package(tmp_path) -> Path:
    copy = tmp_path / "cnnlab"
    # the package as lint-imports reads it: callbacks/ through its link
    shutil.copytree(ROOT / "platform" / "cnnlab", copy, ignore=shutil.ignore_patterns("__pycache__", "presets"))
    return copy


def test_the_layers_hold(package):
    result = lint(package)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cnnlab layers KEPT" in result.stdout


@pytest.mark.parametrize(
    "module, back_import",
    [
        ("store.py", "from cnnlab.module import ClassifierModule"),  # the cycle this layout broke
        ("models.py", "    from cnnlab.tracking import LOGGER"),  # an import inside a function counts too
    ],
)
def test_an_import_up_a_layer_breaks_the_contract(package, module, back_import):
    path = package / module
    body = f"def late():\n{back_import}\n" if back_import.startswith(" ") else back_import + "\n"
    path.write_text(path.read_text() + "\n\n" + body)
    result = lint(package)
    assert result.returncode != 0
    assert "cnnlab layers BROKEN" in result.stdout and f"cnnlab.{module[:-3]} ->" in result.stdout, result.stdout
