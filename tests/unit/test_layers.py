"""The layers of docs/ARCHITECTURE.md hold: the pure packages import no Flower, and the
import-linter contracts in pyproject.toml refuse an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bastion", "server", "client", "strategies", "attacks", "task", "common")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@pytest.mark.parametrize(
    "module", ["strategies.rules", "strategies", "attacks", "common.config", "task.training"]
)
def test_pure_packages_load_without_flower(module: str) -> None:
    # a fresh interpreter: what this test process imported does not count
    code = (
        f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", f"importing {module} loaded Flower: {out.stdout}"


def test_robust_strategy_is_still_one_attribute_away() -> None:
    code = "import strategies, sys; s = strategies.RobustStrategy; print('flwr' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "True"


def _copy_of_the_project(tmp_path: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(root)}  # the copy, not the installed checkout
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        check=False,
    )


@pytest.mark.parametrize(
    ("module", "line", "complaint"),
    [
        ("common/protocol.py", "import bastion.cli", "common is not allowed to import bastion"),
        (
            "server/omniscient.py",
            "import client.malicious",
            "server is not allowed to import client",
        ),
        (
            "strategies/rules/diagnostics.py",
            "import flwr.app",
            "strategies.rules is not allowed to import flwr",
        ),
        (
            "attacks/byzantine.py",
            "import strategies.strategy",
            "attacks is not allowed to import strategies",
        ),
        (
            "bastion/warm_exec.py",
            "import task.cache",
            "bastion.warm_exec is not allowed to import task",
        ),
    ],
)
def test_lint_imports_refuses_an_upward_import(tmp_path, module, line, complaint) -> None:
    root = _copy_of_the_project(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n{line}  # an arrow the wrong way\n")
    result = _lint_imports(root)
    assert result.returncode != 0
    assert complaint in " ".join(result.stdout.split()), result.stdout


def test_the_project_keeps_its_contracts(tmp_path) -> None:
    # the same copy, unchanged: what the refusals above are measured against
    result = _lint_imports(_copy_of_the_project(tmp_path))
    assert result.returncode == 0, result.stdout
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_every_package_is_installed_linted_and_in_the_images() -> None:
    # a new top-level package must reach pip, the layer contracts and both images
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    installed = {
        p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert installed == set(PACKAGES)
    assert set(project["tool"]["importlinter"]["root_packages"]) == set(PACKAGES)
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for dockerfile in ("docker/Dockerfile", "docker/Dockerfile.cuda"):
        text = (ROOT / dockerfile).read_text()
        for name in PACKAGES:
            assert f"COPY {name} /app/{name}" in text, f"{dockerfile} does not copy {name}/"
    for name in PACKAGES:
        assert f"!{name}/" in ignore, f".dockerignore keeps {name}/ out of the build context"
