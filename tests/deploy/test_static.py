"""Strict from day one: ruff and mypy --strict are part of the test suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.tools import tool

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing() -> None:
    out = subprocess.run([tool("ruff"), "check", "."], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict_finds_nothing() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
