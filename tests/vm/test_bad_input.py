"""Bad input that needs the guest assets in place to be reached (still no VM boots)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import fcvm

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("guest_assets", "no_leftovers")]


def _one_line_125(proc: object) -> str:
    assert proc.returncode == 125, proc.stderr  # type: ignore[attr-defined]
    err: str = proc.stderr  # type: ignore[attr-defined]
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_unknown_image() -> None:
    err = _one_line_125(fcvm("podman", "run", "--name", "t-noimg", "no-such-image-here"))
    assert "not found" in err


def test_missing_archive(tmp_path: Path) -> None:
    err = _one_line_125(
        fcvm("podman", "run", "--name", "t-noarch", f"oci-archive:{tmp_path}/missing.tar")
    )
    assert "not found" in err


def test_archive_that_is_not_an_image(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    err = _one_line_125(fcvm("podman", "run", "--name", "t-junk", f"docker-archive:{junk}"))
    assert "not a readable tar" in err


@pytest.mark.parametrize(("kind", "members", "needle"), [
    ("oci-archive", {"index.json": b"garbage", "oci-layout": b"{}"}, "index.json is not JSON"),
    ("oci-archive", {"manifest.json": b"[]"}, "is not an oci-archive (no index.json"),
    ("docker-archive", {"manifest.json": b"{}"}, "manifest.json is not an image index"),
])  # fmt: skip
def test_archive_with_a_broken_index(
    tmp_path: Path, kind: str, members: dict[str, bytes], needle: str
) -> None:
    """One line before any VM (it was the guest's podman load's five, after a boot)."""
    import io
    import tarfile

    archive = tmp_path / "broken.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    err = _one_line_125(fcvm("podman", "run", "--name", "t-broken", f"{kind}:{archive}"))
    assert needle in err


def test_firecracker_requested_but_unusable(test_image: str) -> None:
    import shutil

    if shutil.which("firecracker"):
        pytest.skip("firecracker is installed here; this checks hosts without it")
    err = _one_line_125(
        fcvm("podman", "run", "--name", "t-fc", "--vmm", "firecracker", test_image, "--", "true")
    )
    assert "firecracker" in err.lower()


def test_no_vmm_at_all(test_image: str, tmp_path: Path) -> None:
    """With no QEMU on PATH (and no Firecracker), fcvm says so instead of failing obscurely."""
    import os
    import sys

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "podman").symlink_to("/usr/bin/podman")
    env = {"PATH": f"{bindir}:{os.path.dirname(sys.executable)}", "FCVM_VMM": "auto"}
    err = _one_line_125(fcvm("podman", "run", "--name", "t-novmm", test_image, "--", "true",
                             env=env))  # fmt: skip
    assert "qemu" in err.lower() or "vmm" in err.lower()
