"""The package's dependency direction (DESIGN.md, "Layout") holds, and a wrong import is caught.

The contracts are ``[tool.importlinter]`` in pyproject.toml; ``make test`` runs
``lint-imports`` too. The second test proves the check has teeth: a copy of the
package with one upward import (the pure registry reaching into storage) fails it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path, config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}  # the package under cwd, not the installed one
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(config)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_package_keeps_every_import_contract() -> None:
    result = lint_imports(ROOT, ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_is_reported(tmp_path: Path) -> None:
    shutil.copytree(
        ROOT / "lora_pipeline", tmp_path / "lora_pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    names = tmp_path / "lora_pipeline" / "registry" / "names.py"
    names.write_text(names.read_text() + "\nfrom lora_pipeline.storage.base import ObjectStore  # noqa: E402\n")

    result = lint_imports(tmp_path, tmp_path / "pyproject.toml")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Each package imports only the layers below it BROKEN" in result.stdout
    assert "lora_pipeline.registry.names -> lora_pipeline.storage.base" in result.stdout
