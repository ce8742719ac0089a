"""Packaging: what pyproject.toml makes setuptools put into the wheel, checked without building.

The full check (build the wheel, install it into a throw-away venv, import every module, run
the ops and the runtime) is scripts/check_wheel.sh (`make test-wheel`, part of `make test`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

read_configuration = pytest.importorskip("setuptools.config.pyprojecttoml").read_configuration

ROOT = Path(__file__).resolve().parents[1]
# where each top-level package lives in the tree
PACKAGE_ROOTS = {"eenet_kernels": ROOT, "eenet": ROOT / "python"}


@pytest.fixture(scope="module")
def config() -> dict:
    return read_configuration(ROOT / "pyproject.toml", expand=True)


def _tree_packages() -> set[str]:
    """Every directory holding a module (a folder of modules without __init__.py would not
    be found by setuptools, and so would be missing from the wheel)."""
    found = set()
    for top, base in PACKAGE_ROOTS.items():
        for module in (base / top).rglob("*.py"):
            found.add(".".join(module.parent.relative_to(base).parts))
    return found


def test_every_package_of_the_tree_is_packaged(config: dict) -> None:
    packages = set(config["tool"]["setuptools"]["packages"])
    assert {"eenet.nn", "eenet.policies", "eenet.runtime", "eenet_kernels.triton"} <= packages
    assert packages == _tree_packages()


def test_eenet_maps_to_python_dir(config: dict) -> None:
    assert config["tool"]["setuptools"]["package-dir"]["eenet"] == "python/eenet"


def test_packages_hold_only_python_files() -> None:
    """Files other than modules would not ship (no package data is declared): a package that
    comes to load one at run time must declare it in pyproject.toml."""
    for top, base in PACKAGE_ROOTS.items():
        for path in (base / top).rglob("*"):
            if path.is_dir() or "__pycache__" in path.parts or path.suffix in {".so", ".pyd"}:
                continue
            assert path.suffix == ".py", f"{path.relative_to(ROOT)} would not be in the wheel"


def test_triton_is_an_optional_extra(config: dict) -> None:
    project = config["project"]
    core = " ".join(project["dependencies"])
    assert "triton" not in core and "torch" not in core
    extras = project["optional-dependencies"]
    assert any(r.startswith("triton==") for r in extras["triton"])
    assert any("triton" in r for r in extras["dev"] if r.startswith("eenet-kernels["))
