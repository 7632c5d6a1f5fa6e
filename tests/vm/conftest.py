"""VM tier: boots real guests (QEMU/TCG on hosts without a usable KVM)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.vm.tty import Tmux

TEST_IMAGE = "localhost/fcvm-busybox:latest"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def guest_assets() -> None:
    """The guest kernel/initrd/rootfs (fcvm setup is a no-op when they are current)."""
    from fcvm.assets import resolve_assets
    from fcvm.errors import NotSetUp

    try:
        resolve_assets()
    except NotSetUp:
        subprocess.run([sys.executable, "-m", "fcvm", "setup"], check=True, timeout=3000)


@pytest.fixture(scope="session", autouse=True)
def vm_test_base(guest_assets: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The VM tier runs in a base directory of its own (state records, image store,
    snapshot cache, VM disks), sharing only the guest assets: its VMs' prestart and
    startup snapshots (~150 MB each, one per test image and configuration) are not left
    in the user's cache, and the user's entries never decide what a test restores.
    Removed at the end. A FCVM_BASE_DIR the caller set is used as it is."""
    from fcvm import paths

    if "FCVM_BASE_DIR" in os.environ:
        yield paths.base_dir()
        return
    base = tmp_path_factory.mktemp("fcvm-base")
    assets_given = os.environ.get("FCVM_ASSETS_DIR")
    os.environ["FCVM_ASSETS_DIR"] = str(paths.assets_dir())
    os.environ["FCVM_BASE_DIR"] = str(base)
    try:
        yield base
    finally:
        subprocess.run([sys.executable, "-m", "fcvm", "gc"], capture_output=True, timeout=120)
        del os.environ["FCVM_BASE_DIR"]
        if assets_given is None:
            del os.environ["FCVM_ASSETS_DIR"]
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def test_image(guest_assets: None) -> str:
    """A tiny busybox image in the host's podman storage, built locally (no registry)."""
    subprocess.run([str(REPO / "scripts" / "make-test-image")], check=True, timeout=300)
    return TEST_IMAGE


@pytest.fixture(scope="session")
def image_archives(test_image: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("archives")
    paths = {"oci-archive": out / "busybox.oci.tar", "docker-archive": out / "busybox.docker.tar"}
    for fmt, path in paths.items():
        subprocess.run(["podman", "save", "--format", fmt, "-o", str(path), test_image],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
    return paths


def fcvm_vmm_processes() -> list[str]:
    """Command lines of VMM processes of test VMs: under this base directory and named
    "t-..." (the guest gets fcvm.hostname=NAME), so VMs of a benchmark or another fcvm
    base directory running alongside don't count."""
    from fcvm import paths

    vms = str(paths.vms_dir()).encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        is_vmm = cmdline[0].endswith((b"qemu-system-x86_64", b"firecracker"))
        ours = any(b"fcvm.hostname=t-" in a for a in cmdline) and any(vms in a for a in cmdline)
        if is_vmm and ours:
            found.append(b" ".join(cmdline).decode(errors="replace"))
    return found


def vm_dirs() -> set[str]:
    from fcvm import paths, state

    d = paths.vms_dir()
    if not d.is_dir():
        return set()
    names = {p.name for p in d.iterdir() if p.is_dir()}
    # VM directories of test VMs only (see fcvm_vmm_processes).
    return {n for n in names if (r := state.read_record(n)) is None or r.name.startswith("t-")}


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    """Fails the test if it leaves a VMM process or a VM directory behind."""
    before_dirs = vm_dirs()
    before_procs = set(fcvm_vmm_processes())
    yield
    leaked_procs = set(fcvm_vmm_processes()) - before_procs
    leaked_dirs = vm_dirs() - before_dirs
    assert not leaked_procs, f"VMM processes left behind: {leaked_procs}"
    assert not leaked_dirs, f"VM directories left behind: {leaked_dirs}"


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    t = Tmux(f"fcvm-test-{os.getpid()}")
    yield t
    t.close()
