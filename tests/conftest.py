"""Shared fixtures: where the shared datasets live, and small deterministic tasks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "datasets").resolve()

# One thread keeps float reductions in a fixed order, so seeded runs repeat bit for bit.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The workplace's real datasets; tests that need them skip cleanly when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never depend on the caller's $GRADAUDIT_DATA_DIR."""
    monkeypatch.delenv("GRADAUDIT_DATA_DIR", raising=False)
