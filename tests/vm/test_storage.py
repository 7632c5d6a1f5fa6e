"""Container storage on the VM's own disk (issue: capacity), on real VMs.

A container writes into its own filesystem as much as its disk holds - more than the
VM's memory - and then gets ENOSPC, cleanly; `--disk-size ram` keeps the old in-memory
layer. The disk is the VM's own (a fresh one each run, gone after it); what the
container deletes is given back to the host's disk while the VM runs (discard)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import fcvm
from tests.vm.runs import records, start_run, stop

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600), pytest.mark.usefixtures("no_leftovers")]


def test_more_than_the_vms_memory_then_enospc(test_image: str) -> None:
    script = (
        "dd if=/dev/zero of=/fill bs=1M count=400 2>/dev/null; echo first=$?; "  # > 256 MiB
        "dd if=/dev/zero of=/more bs=1M count=400 2>&1 | grep -o 'No space left on device'; "
        "rm /more; echo after > /after && cat /after; "
        "df -m / | tail -1 | awk '{print $2}'"
    )
    proc = fcvm("podman", "run", "--name", "t-store", "--mem", "256", "--disk-size", "640M",
                test_image, "--", "sh", "-c", script)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert lines[:4] == ["first=0", "No", "space", "left"], proc.stdout
    assert "after" in lines
    assert 550 <= int(lines[-1]) <= 640  # the filesystem is the disk's size


def test_each_run_starts_with_an_empty_disk(test_image: str) -> None:
    script = "test ! -e /left-by-the-last-run && touch /left-by-the-last-run && echo ok"
    for _ in range(2):
        proc = fcvm("podman", "run", "--name", "t-store2", test_image, "--", "sh", "-c", script)
        assert proc.stdout == "ok\n", proc.stderr


def test_ram_backed_layer_on_request(test_image: str) -> None:
    proc = fcvm("podman", "run", "--name", "t-store-ram", "--disk-size", "ram", test_image,
                "--", "sh", "-c", "echo x > /y && cat /y")  # fmt: skip
    assert proc.stdout == "x\n", proc.stderr
    guest = fcvm("podman", "run", "--name", "t-store-ram2", "--disk-size", "ram", "--mem", "512",
                 test_image, "--", "true")  # fmt: skip
    assert guest.returncode == 0
    bad = fcvm("podman", "run", "--name", "t-store-bad", "--disk-size", "lots", test_image)
    assert bad.returncode == 125 and "malformed --disk-size" in bad.stderr


def test_deleted_files_give_their_space_back_to_the_host(test_image: str) -> None:
    """96 MiB written and synced occupy the VM's disk file on the host; deleted in the
    container and synced, the file's blocks are freed again (holes punched)."""
    script = "dd if=/dev/zero of=/fill bs=1M count=96 2>/dev/null && sync && echo written"
    script += " && sleep 600"
    proc = start_run("t-store-trim", test_image, "--disk-size", "1G", cmd=("sh", "-c", script))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "written\n", proc.stderr.read() if proc.stderr else ""
        vm_id = records()["t-store-trim"]["vm_id"]
        disk = Path(os.environ["FCVM_BASE_DIR"]) / "vms" / vm_id / "disk-storage"
        written = disk.stat().st_blocks * 512
        assert written >= 96 << 20, written
        rm = fcvm("exec", "--name", "t-store-trim", "--", "sh", "-c", "rm /fill && sync")
        assert rm.returncode == 0, rm.stderr
        deadline = time.monotonic() + 30
        while disk.stat().st_blocks * 512 > written - (80 << 20) and time.monotonic() < deadline:
            time.sleep(0.2)
        freed = written - disk.stat().st_blocks * 512
        assert freed >= 80 << 20, f"{freed >> 20} MiB freed of {written >> 20} MiB"
    finally:
        stop(proc)


def test_a_full_host_disk_is_an_io_error_in_the_guest_and_a_warning(test_image: str) -> None:
    """The disk under the base directory runs full while the container writes: the
    guest gets I/O errors and the run ends, with a warning that names the cause. (QEMU
    paused the VM for good instead - the run hung, fcvm ls said it was running.)"""
    vms = Path(os.environ["FCVM_BASE_DIR"]) / "vms"
    vms.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "fcvm-test-full", str(vms)],
                   check=True)  # fmt: skip
    try:
        proc = fcvm("podman", "run", "--name", "t-store-full", "--no-snapshot", test_image,
                    "--", "sh", "-c", "dd if=/dev/zero of=/f bs=1M count=100 2>/dev/null; "
                    "sync; echo done", timeout=180)  # fmt: skip
    finally:
        subprocess.run(["umount", str(vms)], check=True)
    assert (proc.returncode, proc.stdout) == (0, "done\n"), proc.stderr
    assert proc.stderr.splitlines() == [
        "fcvm: warning: the VM's disk could not be written (I/O errors in the guest): is the "
        f"disk under {os.environ['FCVM_BASE_DIR']} full?"
    ], proc.stderr
