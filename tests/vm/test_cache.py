"""The image cache on real VMs: the first run of a key boots and snapshots, later runs
restore - with the same results, each a fresh VM of its own, never a wrong restore.

The module uses a base directory of its own (the guest assets are shared), so its
first runs are cold whatever other tests left in the cache. Whether a run restored is
read from its phase marks ($FCVM_TIMINGS: "vmm-restored" only when it did).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fcvm
from tests.vm.runs import stop, wait_healthy
from tests.vm.tty import Tmux

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]


@pytest.fixture(scope="module", autouse=True)
def own_base(tmp_path_factory: pytest.TempPathFactory, test_image: str) -> Iterator[Path]:
    from fcvm import paths

    base = tmp_path_factory.mktemp("cache-base")
    saved = {k: os.environ.get(k) for k in ("FCVM_BASE_DIR", "FCVM_ASSETS_DIR")}
    os.environ["FCVM_ASSETS_DIR"] = str(paths.assets_dir())
    os.environ["FCVM_BASE_DIR"] = str(base)
    yield base
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run(name: str, *args: str, env: dict[str, str] | None = None, tmp: Path | None = None,
        ) -> tuple[subprocess.CompletedProcess[str], dict[str, float]]:  # fmt: skip
    """`fcvm podman run --name NAME ARGS`, and its phase marks."""
    marks = Path(tmp or "/tmp") / f"marks-{name}-{time.monotonic_ns()}.json"
    proc = fcvm("podman", "run", "--name", name, *args,
                env={**(env or {}), "FCVM_TIMINGS": str(marks)})  # fmt: skip
    got = json.loads(marks.read_text()) if marks.exists() else {}
    marks.unlink(missing_ok=True)
    return proc, got


def snapshots() -> list[dict[str, Any]]:
    return json.loads(fcvm("snapshots", "--json", check=True).stdout)  # type: ignore[no-any-return]


def cache_entry(kind: str = "prestart") -> dict[str, Any]:
    (entry,) = [s for s in snapshots() if s["kind"] == kind]
    return entry


def restored(marks: dict[str, float]) -> bool:
    return "vmm-restored" in marks


def clear(kind: str = "prestart") -> None:
    for s in snapshots():
        if s["kind"] == kind:
            fcvm("snapshots", "rm", s["name"], check=True)


SCRIPT = "echo out $GREETING $HOSTNAME $(hostname); echo err >&2; exit 7"


@pytest.mark.usefixtures("no_leftovers")
def test_cold_then_cached_same_results(test_image: str) -> None:
    first, m1 = run("t-c-first", "-e", "GREETING=hi", test_image, "--", "sh", "-c", SCRIPT)
    assert (first.returncode, first.stdout, first.stderr) == (
        7, "out hi t-c-first t-c-first\n", "err\n"
    )
    assert not restored(m1) and "snapshot-saved" in m1
    entry = cache_entry()
    assert not entry["in_use"] and entry["size_bytes"] > 0
    second, m2 = run("t-c-first", "-e", "GREETING=hi", test_image, "--", "sh", "-c", SCRIPT)
    assert restored(m2)
    assert (second.returncode, second.stdout, second.stderr) == (
        first.returncode, first.stdout, first.stderr
    )
    # Another command, env and name: applied after the restore.
    third, m3 = run("t-c-other", "-e", "GREETING=bye", "-e", "X=1", test_image, "--",
                    "sh", "-c", 'echo "$GREETING $X $(hostname)"; exit 3')  # fmt: skip
    assert restored(m3)
    assert (third.returncode, third.stdout) == (3, "bye 1 t-c-other\n")
    # The image's own command (CMD /bin/sh here: reads stdin) and stdin from the host.
    fourth = subprocess.run(
        [sys.executable, "-m", "fcvm", "podman", "run", "--name", "t-c-stdin", "-i", test_image],
        input="echo from stdin; exit 4\n", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (fourth.returncode, fourth.stdout) == (4, "from stdin\n")


def _start(name: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fcvm", "podman", "run", "--name", name,
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.usefixtures("no_leftovers")
def test_two_restored_vms_share_nothing_they_write(test_image: str, own_base: Path) -> None:
    clear()
    run("t-c-warm", test_image, "--", "true")  # the cache entry, made here
    entry = cache_entry()
    memory = own_base / "snapshots" / entry["name"] / "memory"
    before = (_sha256(memory), memory.stat().st_mtime_ns)
    a = _start("t-c-a", test_image, "--", "sleep", "600")
    b = _start("t-c-b", test_image, "--", "sleep", "600")
    try:
        wait_healthy("t-c-a")
        wait_healthy("t-c-b")
        assert cache_entry()["in_use"]
        write = "echo secret-a > /tmp/a-was-here; dd if=/dev/urandom of=/tmp/big bs=1M count=8"
        assert fcvm("exec", "--name", "t-c-a", "--", "sh", "-c", write).returncode == 0
        assert fcvm("exec", "--name", "t-c-a", "--vm", "--", "sh", "-c",
                    "echo guest-a > /root/guest-a").returncode == 0  # fmt: skip
        check = "cat /tmp/a-was-here 2>&1; ls /tmp"
        seen_b = fcvm("exec", "--name", "t-c-b", "--", "sh", "-c", check).stdout
        assert "secret-a" not in seen_b and "big" not in seen_b
        seen_b_guest = fcvm("exec", "--name", "t-c-b", "--vm", "--", "ls", "/root").stdout
        assert "guest-a" not in seen_b_guest
        # Random numbers are the VMs' own (reseeded after the restore).
        rand = "head -c16 /dev/urandom | od -An -tx1"
        ra = fcvm("exec", "--name", "t-c-a", "--", "sh", "-c", rand).stdout
        rb = fcvm("exec", "--name", "t-c-b", "--", "sh", "-c", rand).stdout
        assert len(ra) > 16 and ra != rb
    finally:
        stop(a, b)
    # The cache was never written to (private mappings).
    assert (_sha256(memory), memory.stat().st_mtime_ns) == before
    assert not cache_entry()["in_use"]


def _http_server(host: str) -> tuple[socket.socket, list[bytes]]:
    got: list[bytes] = []
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, 0))
    srv.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                got.append(conn.recv(1024))
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    threading.Thread(target=serve, daemon=True).start()
    return srv, got


@pytest.mark.parametrize("mode", ["rootless", "bridged"])
@pytest.mark.usefixtures("no_leftovers")
def test_networking_after_a_restore(test_image: str, mode: str) -> None:
    """Published ports answer and the container reaches out, as the new VM."""
    run(f"t-c-net-{mode}", "--network", mode, test_image, "--", "true")  # cold: makes the entry
    name = f"t-c-web-{mode}"
    p = _start(name, "--network", mode, "--publish", "18181:80", "--health-check",
               "http://127.0.0.1:80/", test_image, "--", "httpd", "-f", "-p", "80",
               "-h", "/www")  # fmt: skip
    try:
        rec = wait_healthy(name)
        assert rec["extra"].get("snapshot", "").startswith("cache-")  # restored
        host_ip = rec["network"]["host_ip"] if mode == "rootless" else "127.0.0.1"
        import urllib.request

        with urllib.request.urlopen(f"http://{host_ip}:18181/", timeout=10) as resp:
            assert b"hello from fcvm-busybox" in resp.read()
        # Outbound: the container talks to a server on the host.
        gateway = "10.0.2.2" if mode == "rootless" else rec["network"]["gateway"]
        bind = "127.0.0.1" if mode == "rootless" else gateway
        srv, got = _http_server(bind)
        try:
            port = srv.getsockname()[1]
            out = fcvm("exec", "--name", name, "--", "wget", "-qO-",
                       f"http://{gateway}:{port}/from-guest")  # fmt: skip
            assert out.stdout == "hello", out.stderr
            assert got and b"/from-guest" in got[0]
        finally:
            srv.close()
        addr = fcvm("exec", "--name", name, "--vm", "--", "ip", "-4", "addr", "show", "eth0")
        assert f"inet {rec['network']['guest_ip']}/" in addr.stdout
    finally:
        stop(p)


@pytest.mark.usefixtures("no_leftovers")
def test_exec_it_into_a_restored_vm(test_image: str, tmux: Tmux) -> None:
    run("t-c-tty0", test_image, "--", "true")  # (the entry exists, or is made here)
    p = _start("t-c-tty", test_image, "--", "sleep", "600")
    try:
        rec = wait_healthy("t-c-tty")
        assert rec["extra"].get("snapshot", "").startswith("cache-")
        tmux.send(f"{sys.executable} -m fcvm exec --name t-c-tty -it -- sh", "Enter")
        tmux.wait_for("/ #")
        tmux.send("stty size; hostname", "Enter")
        tmux.wait_for("30 100")
        tmux.wait_for("t-c-tty")
        tmux.send("exit", "Enter")
        tmux.wait_for("$ ")
    finally:
        stop(p)


HEALTHY_SERVICE = ("sh", "-c", "echo started >> /tmp/starts; echo pid $$; "
                   "exec httpd -f -p 8080 -h /www")  # fmt: skip


@pytest.mark.usefixtures("no_leftovers")
def test_health_check_second_run_restores_a_started_service(test_image: str) -> None:
    url = "http://127.0.0.1:8080/"
    clear("startup")
    first = _start("t-c-svc", "--health-check", url, test_image, "--", *HEALTHY_SERVICE)
    try:
        wait_healthy("t-c-svc")
        deadline = time.monotonic() + 120
        while not [s for s in snapshots() if s["kind"] == "startup"]:
            assert time.monotonic() < deadline, "no startup snapshot was written"
            time.sleep(0.3)
        pid1 = fcvm("exec", "--name", "t-c-svc", "--vm", "--", "sh", "-c",
                    "pgrep -x httpd").stdout.split()  # fmt: skip
    finally:
        stop(first)
    t0 = time.monotonic()
    second = _start("t-c-svc2", "--health-check", url, test_image, "--", *HEALTHY_SERVICE)
    try:
        rec = wait_healthy("t-c-svc2")
        healthy_after = time.monotonic() - t0
        assert rec["extra"].get("snapshot") == cache_entry("startup")["name"]
        # Not restarted: one start in the log, the very same process.
        starts = fcvm("exec", "--name", "t-c-svc2", "--", "cat", "/tmp/starts").stdout
        assert starts == "started\n"
        pid2 = fcvm("exec", "--name", "t-c-svc2", "--vm", "--", "sh", "-c",
                    "pgrep -x httpd").stdout.split()  # fmt: skip
        assert pid2 == pid1
        assert fcvm("exec", "--name", "t-c-svc2", "--", "hostname").stdout == "t-c-svc2\n"
        assert healthy_after < 60  # (timing is bench/'s; this only says it did not hang)
    finally:
        stop(second)


def _fresh_entry(test_image: str) -> Path:
    """A prestart entry of its own key (--mem 896), written anew; its directory."""
    from fcvm import paths

    clear()
    proc, marks = run("t-c-mk", "--mem", "896", test_image, "--", "true")
    assert proc.returncode == 0 and "snapshot-saved" in marks
    return paths.snapshots_dir() / cache_entry()["name"]


@pytest.mark.parametrize("damage", ["corrupt-state", "truncated-memory", "foreign-vmm",
                                    "bad-memory"])  # fmt: skip
@pytest.mark.usefixtures("no_leftovers")
def test_a_damaged_snapshot_falls_back_to_a_cold_boot(test_image: str, damage: str) -> None:
    entry = _fresh_entry(test_image)
    if damage == "corrupt-state":
        with open(entry / "vmstate", "r+b") as f:
            f.seek(200)
            f.write(b"\xff" * 64)
    elif damage == "truncated-memory":
        os.truncate(entry / "memory", 4096)
    elif damage == "foreign-vmm":
        meta = json.loads((entry / "meta.json").read_text())
        meta["vmm_version"] = "QEMU emulator version 1.0 (elsewhere)"
        (entry / "meta.json").write_text(json.dumps(meta))
    else:  # passes every check, but what it holds is garbage: the restore itself fails
        st = (entry / "memory").stat()
        with open(entry / "memory", "r+b") as f:
            f.write(os.urandom(64 << 20))  # the kernel's text and data: surely dead
        os.utime(entry / "memory", ns=(st.st_atime_ns, st.st_mtime_ns))
    proc, marks = run("t-c-dmg", "--mem", "896", test_image, "--", "echo", "ok",
                      env={"FCVM_LOG": "info", "FCVM_RESTORE_TIMEOUT": "10"})  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, "ok\n"), proc.stderr
    assert not restored(marks) or "restore-failed" in marks  # it booted cold
    assert "snapshot-saved" in marks  # ... and wrote a good entry again
    lines = [x for x in proc.stderr.splitlines() if "unusable" in x or "did not restore" in x]
    assert len(lines) == 1, proc.stderr  # one line says why, at FCVM_LOG=info
    again, marks = run("t-c-dmg2", "--mem", "896", test_image, "--", "echo", "ok")
    assert restored(marks) and again.stdout == "ok\n"


@pytest.mark.usefixtures("no_leftovers")
def test_killed_while_snapshotting_leaves_nothing_restorable(test_image: str) -> None:
    from fcvm import paths

    clear()
    p = _start("t-c-kill", "--mem", "896", test_image, "--", "true")
    root = paths.snapshots_dir()
    deadline = time.monotonic() + 120
    while not any(d.name.startswith(".tmp-cache-") for d in root.glob(".tmp-*")):
        assert time.monotonic() < deadline and p.poll() is None, "no snapshot was begun"
        time.sleep(0.005)
    p.kill()
    p.wait()
    assert not [s for s in snapshots() if s["kind"] == "prestart"]
    gc = fcvm("gc", check=True)
    assert "removed the unfinished snapshot .tmp-cache-" in gc.stdout
    assert not list(root.glob(".tmp-*"))
    proc, marks = run("t-c-after", "--mem", "896", test_image, "--", "echo", "fine")
    assert proc.stdout == "fine\n" and not restored(marks) and "snapshot-saved" in marks


@pytest.mark.usefixtures("no_leftovers")
def test_a_full_disk_costs_the_snapshot_not_the_run(test_image: str) -> None:
    """The snapshot directory on a 32 MiB filesystem: no room for the prestart snapshot
    (up to the guest's 832 MiB), so none is attempted, and the run goes on (its output
    and exit code as ever) with one warning line; nothing half-written or locked is
    left. (A write that fails all the same, ENOSPC, is `snapshot create`'s test in
    test_clones.py: the same one line, the VM going on.)"""
    from fcvm import paths

    root = paths.snapshots_dir()
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "fcvm-test-full", str(root)],
                   check=True)  # fmt: skip
    try:
        proc, marks = run("t-c-full", "--mem", "832", test_image, "--", "sh", "-c",
                          "echo ran; exit 3")  # fmt: skip
        assert (proc.returncode, proc.stdout) == (3, "ran\n"), proc.stderr
        (line,) = proc.stderr.splitlines()
        assert re.fullmatch(
            r"fcvm: warning: no prestart snapshot for the image cache: "
            r"(31|32) MiB free where snapshots go, up to 8[5-9]\d MiB needed \(the run goes on\)",
            line,
        ), line
        assert "snapshot-saved" not in marks
        assert os.listdir(root) == []
    finally:
        subprocess.run(["umount", str(root)], check=True)


@pytest.mark.usefixtures("no_leftovers")
def test_a_bound_smaller_than_one_snapshot_is_said(test_image: str) -> None:
    """FCVM_SNAPSHOT_CACHE_MAX below one snapshot: what is written cannot stay, and the
    run says why nothing is cached (silently, every run wrote a snapshot and removed it).
    (That an entry larger than the bound goes before older ones that fit is
    test_snapshot_store.py's.)"""
    proc, marks = run("t-c-bound", "--mem", "320", test_image, "--", "true",
                      env={"FCVM_SNAPSHOT_CACHE_MAX": "1M"})  # fmt: skip
    assert proc.returncode == 0 and "snapshot-saved" in marks, proc.stderr
    assert proc.stderr.splitlines() == [
        "fcvm: warning: the image cache's bound (1 MiB) is smaller than one snapshot: "
        "nothing is cached (raise FCVM_SNAPSHOT_CACHE_MAX)"
    ]
    assert snapshots() == []


@pytest.mark.usefixtures("no_leftovers")
def test_least_recently_used_entries_make_room_on_a_filesystem_of_its_own(test_image: str
                                                                          ) -> None:  # fmt: skip
    """The snapshot directory a tmpfs of its own (disks are then copied across two
    filesystems, both ways), nearly full: a new key's snapshot takes the place of the
    older entry, and restores."""
    from fcvm import paths

    clear()
    root = paths.snapshots_dir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1300m", "fcvm-test-room", str(root)],
                   check=True)  # fmt: skip
    try:
        first, _ = run("t-c-room1", "--mem", "256", test_image, "--", "true")
        assert first.returncode == 0, first.stderr
        (old,) = [s["name"] for s in snapshots()]
        with open(root / "filler", "wb") as f:  # leave 200 MiB: less than 256 MiB + disks
            os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(root).free - (200 << 20))
        proc, marks = run("t-c-room2", "--mem", "256", "--disk-size", "4G", test_image, "--",
                          "echo", "second")  # fmt: skip
        assert proc.stdout == "second\n" and "snapshot-saved" in marks, proc.stderr
        (new,) = [s["name"] for s in snapshots()]
        assert new != old
        again, marks = run("t-c-room3", "--mem", "256", "--disk-size", "4G", test_image, "--",
                           "echo", "third")  # fmt: skip
        assert again.stdout == "third\n" and restored(marks), again.stderr
        fcvm("snapshots", "rm", new, check=True)
    finally:
        subprocess.run(["umount", str(root)], check=True)


@pytest.mark.usefixtures("no_leftovers")
def test_rm_and_prune_never_remove_a_snapshot_in_use(test_image: str) -> None:
    clear()
    run("t-c-use0", test_image, "--", "true")
    name = cache_entry()["name"]
    p = _start("t-c-use", test_image, "--", "sleep", "600")
    try:
        wait_healthy("t-c-use")
        rm = fcvm("snapshots", "rm", name)
        assert rm.returncode == 125 and "in use" in rm.stderr
        assert len(rm.stderr.strip().splitlines()) == 1
        pruned = fcvm("snapshots", "prune", "--max-size", "0", "--json", check=True)
        assert name not in json.loads(pruned.stdout)
        assert name in [s["name"] for s in snapshots()]
    finally:
        stop(p)
    assert fcvm("snapshots", "rm", name).returncode == 0
    assert name not in [s["name"] for s in snapshots()]
    bad = fcvm("snapshots", "rm", "no-such-snapshot")
    assert bad.returncode == 125 and "no snapshot named" in bad.stderr


@pytest.mark.usefixtures("no_leftovers")
def test_no_snapshot_runs_cold_and_writes_nothing(test_image: str) -> None:
    clear()
    clear("startup")
    proc, marks = run("t-c-nosnap", "--no-snapshot", test_image, "--", "echo", "x")
    assert proc.stdout == "x\n" and "snapshot-saved" not in marks
    proc, marks = run("t-c-nosnap", test_image, "--", "echo", "x", env={"FCVM_NO_SNAPSHOT": "1"})
    assert proc.stdout == "x\n" and "snapshot-saved" not in marks
    assert snapshots() == []
