"""Bad input to `fcvm podman run` gets one clear line and exit 125, before any VM."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import fcvm

pytestmark = pytest.mark.unit


@pytest.fixture
def empty_base(tmp_path: Path) -> dict[str, str]:
    return {"FCVM_BASE_DIR": str(tmp_path / "base")}


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--env", "NOEQUALS-"], "malformed --env"),
        (["--env", "A=1,,B=2"], "malformed --env"),
        (["--env", "1A=x"], "malformed --env"),
        (["--cpu", "two"], "malformed --cpu"),
        (["--cpu", "0"], "--cpu 0"),
        (["--mem", "lots"], "malformed --mem"),
        (["--mem", "1"], "--mem 1"),
        (["--cmd", "sh -c 'unterminated"], "malformed --cmd"),
    ],
)
def test_malformed_flags(flags: list[str], needle: str, empty_base: dict[str, str]) -> None:
    proc = fcvm("podman", "run", "--name", "bad", *flags, "busybox", env=empty_base)
    assert proc.returncode == 125
    assert needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_invalid_name(empty_base: dict[str, str]) -> None:
    proc = fcvm("podman", "run", "--name", "-x/y", "busybox", env=empty_base)
    assert proc.returncode in (2, 125)  # argparse rejects a leading dash itself
    assert "Traceback" not in proc.stderr


def test_assets_not_set_up_says_to_run_setup(empty_base: dict[str, str]) -> None:
    proc = fcvm("podman", "run", "--name", "x", "busybox", env=empty_base)
    assert proc.returncode == 125
    assert "fcvm setup" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_ls_on_empty_base(empty_base: dict[str, str]) -> None:
    proc = fcvm("ls", "--json", env=empty_base)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]"


def test_help_is_instant_and_complete() -> None:
    proc = fcvm("--help")
    assert proc.returncode == 0
    for command in ("setup", "podman", "ls", "gc"):
        assert command in proc.stdout
