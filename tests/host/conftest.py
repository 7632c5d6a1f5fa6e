"""Host tier fixtures shared by more than one module."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """FCVM_BASE_DIR under the test's tmp_path (leases, records, sockets of its own)."""
    b = tmp_path / "base"
    monkeypatch.setenv("FCVM_BASE_DIR", str(b))
    return b
