"""Clones on real VMs: `fcvm snapshot create` of a running VM, `fcvm snapshot run` of it.

One source VM (an httpd that wrote a marker file before the snapshot) serves the
module; its snapshot is taken once. Each clone must be a VM of its own.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import fcvm
from tests.vm.runs import records, start, stop, wait_healthy
from tests.vm.tty import Tmux

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

SOURCE = "t-clone-src"
SNAP = "t-clone-snap"


@pytest.fixture(scope="module")
def snapshot(test_image: str) -> Iterator[str]:
    fcvm("snapshots", "rm", SNAP)  # (left by an earlier, killed run)
    src = start("podman", "run", "--name", SOURCE, "--health-check", "http://127.0.0.1:80/",
                test_image, "--", "sh", "-c",
                "echo before-snapshot > /tmp/marker; exec httpd -f -p 80 -h /www")  # fmt: skip
    try:
        wait_healthy(SOURCE)
        made = fcvm("snapshot", "create", SOURCE, "--tag", SNAP, "--json", check=True)
        info = json.loads(made.stdout)
        assert info["name"] == SNAP and info["bytes"] > 0
        # The source keeps running and working.
        assert fcvm("exec", "--name", SOURCE, "--", "cat", "/tmp/marker").stdout == (
            "before-snapshot\n"
        )
        listed = {s["name"]: s for s in json.loads(fcvm("snapshots", "--json", check=True).stdout)}
        assert listed[SNAP]["kind"] == "named"
        yield SNAP
    finally:
        stop(src)
        fcvm("snapshots", "rm", SNAP)


@pytest.mark.usefixtures("no_leftovers")
def test_exec_in_a_clone_sees_the_source_and_is_its_own(snapshot: str) -> None:
    proc = fcvm("snapshot", "run", "--snapshot", snapshot, "--name", "t-clone-x", "--exec",
                "sh -c 'cat /tmp/marker; hostname; echo oops >&2; exit 5'")  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        5, "before-snapshot\nt-clone-x\n", "oops\n"
    )
    assert "t-clone-x" not in records()  # torn down


@pytest.mark.usefixtures("no_leftovers")
def test_clones_write_privately_and_publish_on_their_own_addresses(snapshot: str) -> None:
    a = start("snapshot", "run", "--snapshot", snapshot, "--name", "t-clone-a", "-p", "18380:80")
    b = start("snapshot", "run", "--snapshot", snapshot, "--name", "t-clone-b", "-p", "18380:80")
    try:
        ra, rb = wait_healthy("t-clone-a"), wait_healthy("t-clone-b")
        assert ra["network"]["host_ip"] != rb["network"]["host_ip"]
        for rec in (ra, rb):
            url = f"http://{rec['network']['host_ip']}:18380/"
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert b"hello from fcvm-busybox" in resp.read()
        assert fcvm("exec", "--name", "t-clone-a", "--", "sh", "-c",
                    "echo a > /tmp/only-a; echo a > /www/only-a").returncode == 0  # fmt: skip
        for other in ("t-clone-b", SOURCE):
            seen = fcvm("exec", "--name", other, "--", "sh", "-c",
                        "ls /tmp /www").stdout  # fmt: skip
            assert "only-a" not in seen, other
        # Each its own guest: hostname, MAC, random numbers.
        ids = [fcvm("exec", "--name", n, "--vm", "--", "sh", "-c",
                    "hostname; cat /sys/class/net/eth0/address; "
                    "head -c8 /dev/urandom | od -An -tx1").stdout
               for n in ("t-clone-a", "t-clone-b", SOURCE)]  # fmt: skip
        assert len(set(ids)) == 3
        assert ids[0].split()[0] == "t-clone-a"
        # The clock was set from the host's.
        guest_time = int(fcvm("exec", "--name", "t-clone-b", "--", "date", "+%s").stdout)
        assert abs(guest_time - time.time()) < 5
    finally:
        stop(a, b)


@pytest.mark.usefixtures("no_leftovers")
def test_a_clone_of_a_clone(snapshot: str) -> None:
    a = start("snapshot", "run", "--snapshot", snapshot, "--name", "t-clone-gen1")
    try:
        wait_healthy("t-clone-gen1")
        fcvm("exec", "--name", "t-clone-gen1", "--", "sh", "-c", "echo gen1 > /tmp/gen",
             check=True)  # fmt: skip
        fcvm("snapshots", "rm", "t-clone-snap2")
        fcvm("snapshot", "create", "t-clone-gen1", "--tag", "t-clone-snap2", check=True)
        proc = fcvm("snapshot", "run", "--snapshot", "t-clone-snap2", "--exec",
                    "sh -c 'cat /tmp/gen /tmp/marker'")  # fmt: skip
        assert proc.stdout == "gen1\nbefore-snapshot\n", proc.stderr
    finally:
        stop(a)
        fcvm("snapshots", "rm", "t-clone-snap2")


@pytest.mark.usefixtures("no_leftovers")
def test_five_clones_at_once(snapshot: str) -> None:
    clones = [
        start("snapshot", "run", "--snapshot", snapshot, "--name", f"t-clone-{i}",
              "--exec", f"sh -c 'cat /tmp/marker; echo {i}'")
        for i in range(5)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in clones]
    for i, (p, (out, err)) in enumerate(zip(clones, outs, strict=True)):
        assert (p.returncode, out) == (0, f"before-snapshot\n{i}\n"), err


@pytest.mark.usefixtures("no_leftovers")
def test_a_clone_killed_9_leaves_nothing_after_the_next_command(snapshot: str) -> None:
    p = start("snapshot", "run", "--snapshot", snapshot, "--name", "t-clone-k9")
    rec = wait_healthy("t-clone-k9")
    p.kill()
    p.wait()
    assert "t-clone-k9" not in records()  # (ls reaps it)
    from tests.vm.conftest import vm_dirs

    assert str(rec["vm_id"]) not in vm_dirs()
    # ... and the snapshot is not "in use" any more.
    listed = {s["name"]: s for s in json.loads(fcvm("snapshots", "--json", check=True).stdout)}
    assert listed[snapshot]["in_use"] is False or SOURCE in records()


@pytest.mark.usefixtures("no_leftovers")
def test_rm_of_a_snapshot_with_live_clones_is_refused(snapshot: str) -> None:
    p = start("snapshot", "run", "--snapshot", snapshot, "--name", "t-clone-live")
    try:
        wait_healthy("t-clone-live")
        rm = fcvm("snapshots", "rm", snapshot)
        assert rm.returncode == 125 and "in use" in rm.stderr
    finally:
        stop(p)


@pytest.mark.usefixtures("no_leftovers")
def test_clone_from_a_page_server(snapshot: str) -> None:
    """--pid: the memory of the page server's snapshot. On QEMU the clone maps the same
    file (lazy, shared by the page cache) and does not depend on the server: it keeps
    running when the server is stopped, and when it is killed -9."""
    server = subprocess.Popen([sys.executable, "-m", "fcvm", "snapshot", "serve", snapshot,
                               "--json"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout is not None
        pid = json.loads(server.stdout.readline())["pid"]
        proc = fcvm("snapshot", "run", "--pid", str(pid), "--exec", "cat /tmp/marker")
        assert (proc.returncode, proc.stdout) == (0, "before-snapshot\n"), proc.stderr
        live = start("snapshot", "run", "--pid", str(pid), "--name", "t-clone-served")
        try:
            wait_healthy("t-clone-served")
            server.kill()
            server.wait()
            time.sleep(1)
            assert fcvm("exec", "--name", "t-clone-served", "--", "true").returncode == 0
        finally:
            stop(live)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        fcvm("gc")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--snapshot", "no-such-snapshot", "--exec", "true"], "no snapshot named"),
        (["--exec", "true"], "give --snapshot NAME or --pid"),
        (["--snapshot", "x", "--pid", "1", "--exec", "true"], "give --snapshot NAME or --pid"),
        (["--pid", str(os.getpid()), "--exec", "true"], "no page server with pid"),
        (["--snapshot", SNAP, "--name", SOURCE, "--exec", "true"], "already running"),
        (["--snapshot", SNAP, "--exec", "'unterminated"], "malformed --exec"),
    ],
)  # fmt: skip
@pytest.mark.usefixtures("no_leftovers")
def test_bad_input_is_one_line(snapshot: str, args: list[str], needle: str) -> None:
    proc = fcvm("snapshot", "run", *args)
    assert proc.returncode == 125, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr


def test_snapshot_create_bad_input(snapshot: str) -> None:
    for args, needle in (
        (["no-such-vm", "--tag", "x"], "no running VM named"),
        ([SOURCE, "--tag", "bad/name"], "invalid snapshot name"),
        ([SOURCE, "--tag", "cache-mine"], "belong to the image cache"),
        ([SOURCE, "--tag", snapshot], "exists already"),
    ):
        proc = fcvm("snapshot", "create", *args)
        assert proc.returncode == 125 and needle in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("how", ["kill-9", "sigint"])
def test_an_interrupted_snapshot_create_leaves_the_vm_running(snapshot: str, how: str) -> None:
    """`fcvm snapshot create` killed, or interrupted, while its VM is being saved: the
    save finishes in the VM's owner, the VM resumes and keeps working, and nothing of
    the snapshot is kept. (The VM used to stay paused for good.)"""
    from fcvm import paths

    tag = f"t-clone-int-{how}"
    root = paths.snapshots_dir()
    proc = subprocess.Popen([sys.executable, "-m", "fcvm", "snapshot", "create", SOURCE,
                             "--tag", tag], stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any(root.glob(f".tmp-{tag}*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any(root.glob(f".tmp-{tag}*")), "the save never began"
        proc.send_signal(signal.SIGKILL if how == "kill-9" else signal.SIGINT)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = fcvm("exec", "--name", SOURCE, "--", "cat", "/tmp/marker", timeout=60)
    assert (done.returncode, done.stdout) == (0, "before-snapshot\n"), done.stderr
    deadline = time.monotonic() + 30
    while any(root.glob(f"*{tag}*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(root.glob(f"*{tag}*"))


@pytest.mark.usefixtures("no_leftovers")
def test_snapshot_create_on_a_full_disk_is_one_line_and_the_vm_goes_on(snapshot: str) -> None:
    from fcvm import paths

    root = paths.snapshots_dir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "fcvm-test-full", str(root)],
                   check=True)  # fmt: skip
    try:
        proc = fcvm("snapshot", "create", SOURCE, "--tag", "t-clone-full")
        assert proc.returncode == 125, proc.stderr
        assert proc.stderr.splitlines() == [
            "fcvm: cannot write the snapshot: No space left on device"
        ], proc.stderr
        assert os.listdir(root) == []
    finally:
        subprocess.run(["umount", str(root)], check=True)
    assert fcvm("exec", "--name", SOURCE, "--", "cat", "/tmp/marker").stdout == "before-snapshot\n"


@pytest.mark.usefixtures("no_leftovers")
def test_a_clone_of_a_terminal_session_takes_the_new_terminal(test_image: str, tmux: Tmux
                                                              ) -> None:  # fmt: skip
    """A VM running `sh` at a 100x30 terminal, cloned from another terminal of 90x20:
    the clone's shell is at the new terminal, with its size (the source keeps its own),
    the source's files, and its exit code becomes the clone's."""
    run = [sys.executable, "-m", "fcvm"]
    tmux.send(shlex.join([*run, "podman", "run", "--name", "t-tty-src", "-it", test_image,
                          "--", "sh"]), "Enter")  # fmt: skip
    tmux.wait_for("/ #")
    tmux.send("clear; echo from-source > /tmp/mark; echo MARKED", "Enter")
    tmux.wait_for("MARKED\n")
    clone_term = Tmux(f"fcvm-test-clone-{os.getpid()}")
    try:
        fcvm("snapshot", "create", "t-tty-src", "--tag", "t-tty-snap", check=True)
        clone_term.resize(90, 20)
        clone = shlex.join([*run, "snapshot", "run", "--snapshot", "t-tty-snap", "--name",
                            "t-tty-clone"])  # fmt: skip
        clone_term.send(f"{clone}; echo CLONE-$?", "Enter")
        clone_term.send("", "Enter")  # (a fresh prompt: the restored one was drawn before)
        clone_term.wait_for("/ #")
        clone_term.send("clear; cat /tmp/mark; stty size", "Enter")
        clone_term.wait_for("from-source\n20 90")
        tmux.send("clear; stty size", "Enter")
        tmux.wait_for("30 100")
        clone_term.send("exit 4", "Enter")
        clone_term.wait_for("CLONE-4")
    finally:
        clone_term.close()
        tmux.send("exit", "Enter")
        fcvm("snapshots", "rm", "t-tty-snap")
    deadline = time.monotonic() + 30
    while "t-tty-src" in records() and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.mark.usefixtures("no_leftovers")
def test_snapshot_create_makes_room_by_evicting_cache_entries(snapshot: str,
                                                              test_image: str) -> None:  # fmt: skip
    """On a nearly full snapshot filesystem, the image cache's least recently used
    entry makes way for a named snapshot (up to the source's 1 GiB of memory)."""
    from fcvm import paths

    root = paths.snapshots_dir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400m", "fcvm-test-room", str(root)],
                   check=True)  # fmt: skip
    try:
        fcvm("podman", "run", "--name", "t-room-cache", "--mem", "256", test_image, "--",
             "true", check=True)  # fmt: skip
        listed = json.loads(fcvm("snapshots", "--json", check=True).stdout)
        (entry,) = [s["name"] for s in listed if s["kind"] == "prestart"]
        with open(root / "filler", "wb") as f:  # 1000 MiB left: less than 1 GiB + disks
            os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(root).free - (1000 << 20))
        fcvm("snapshot", "create", SOURCE, "--tag", "t-room-named", check=True)
        listed = json.loads(fcvm("snapshots", "--json", check=True).stdout)
        assert [s["name"] for s in listed] == ["t-room-named"], entry
        fcvm("snapshots", "rm", "t-room-named", check=True)
    finally:
        subprocess.run(["umount", str(root)], check=True)
