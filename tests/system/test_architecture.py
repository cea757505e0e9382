"""The layering in pyproject.toml's import-linter contracts holds (CONVENTIONS: layout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_kept() -> None:
    exe = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_ruff_clean() -> None:
    exe = Path(sys.executable).with_name("ruff")
    r = subprocess.run([str(exe), "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:]


@pytest.mark.slow
def test_mypy_strict_clean(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:]


@pytest.mark.parametrize("package", ["edge_agent", "hub"])
def test_folders_show_the_architecture(package: str) -> None:
    """Subsystems are packages: few modules at the top, none over 500 lines (CONVENTIONS)."""
    top = sorted(p.name for p in (ROOT / package).glob("*.py"))
    assert len(top) <= 8, f"{package}/ has {len(top)} top-level modules: {top}"
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / package).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"modules over 500 lines: {long}"
    for d in (ROOT / package).iterdir():
        if d.is_dir() and d.name != "__pycache__":
            init = d / "__init__.py"
            assert init.exists(), f"{d} is not a package"
            assert len(init.read_text().strip()) > 40, f"{init} does not map its package"


def test_lint_rules_that_keep_the_shape_are_on() -> None:
    """The checks above are only as strong as their configuration."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert {"SLF", "C90"} <= set(cfg["tool"]["ruff"]["lint"]["select"])
    assert not {"SLF001", "C901"} & set(cfg["tool"]["ruff"]["lint"].get("ignore", []))
    assert cfg["tool"]["importlinter"]["exclude_type_checking_imports"] is False
