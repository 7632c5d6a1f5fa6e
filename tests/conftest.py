"""Shared test helpers: running the real fcvm CLI, and checking nothing is left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def fcvm(
    *args: str,
    timeout: float = 180,
    env: dict[str, str] | None = None,
    check: bool = False,
    **kw: object,
) -> subprocess.CompletedProcess[str]:
    """Run `fcvm ARGS` as a user would (a separate process), capturing output."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "fcvm", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, **kw,  # type: ignore[call-overload]
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"fcvm {args} exited {proc.returncode}: {proc.stderr}")
    return proc  # type: ignore[no-any-return]


def dead_pid() -> int:
    """The pid of a process that has just ended (a killed owner, for reaping tests)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def pytest_report_header(config: pytest.Config) -> list[str]:
    given = os.environ.get("FCVM_BASE_DIR")
    return [f"fcvm base dir: {given or '(default; the VM tier makes its own)'}"]


@pytest.fixture(autouse=True)
def _no_callers_assets_dir(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit and host tests point FCVM_BASE_DIR at a directory of their own and expect
    the guest assets under it: a caller's FCVM_ASSETS_DIR (exported to share built
    assets) would have them read, and overwrite, the caller's real assets instead.
    (The VM tier sets its own, to share the built assets on purpose.)"""
    if request.node.get_closest_marker("vm") is None:
        monkeypatch.delenv("FCVM_ASSETS_DIR", raising=False)
