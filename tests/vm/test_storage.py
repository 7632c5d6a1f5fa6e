"""Container storage on the VM's own disk (issue: capacity), on real VMs.

A container writes into its own filesystem as much as its disk holds - more than the
VM's memory - and then gets ENOSPC, cleanly; `--disk-size ram` keeps the old in-memory
layer. The disk is the VM's own (a fresh one each run, gone after it)."""

from __future__ import annotations

import pytest

from tests.conftest import fcvm

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
