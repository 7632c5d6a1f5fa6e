"""The page server against real userfaultfds.

Firecracker cannot run on these hosts, so its side of the protocol is played by
tests/host/uffd_driver.py, which follows Firecracker's documented behaviour (anonymous
regions, a userfaultfd with EVENT_REMOVE registered for missing faults, one sendmsg
with the regions JSON and the fd). Each driver is its own process: it blocks in
faults the server (a thread of this test process, or the real CLI) must resolve.
Every driver checks every byte it touched against the memory file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fcvm.snapshot import layout, uffd
from fcvm.snapshot.pageserver import PageServer
from tests.conftest import REPO, fcvm
from tests.host import uffd_driver

pytestmark = pytest.mark.host
DRIVER = Path(__file__).with_name("uffd_driver.py")
MiB = 1 << 20


def _uffd_ok() -> bool:
    try:
        uffd.probe()
    except uffd.UffdUnavailable:
        return False
    return True


if not _uffd_ok():
    pytest.skip("this user cannot create a userfaultfd", allow_module_level=True)


def make_memory(path: Path, size: int = 16 * MiB) -> None:
    """Random bytes with an all-zero stretch (exercises UFFDIO_ZEROPAGE)."""
    data = bytearray(os.urandom(size))
    data[4 * MiB : 5 * MiB] = bytes(MiB)
    path.write_bytes(data)


def start_driver(sock: Path, memory: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(DRIVER), "--socket", str(sock), "--memory", str(memory), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def run_driver(sock: Path, memory: Path, *args: str) -> dict[str, Any]:
    return finish(start_driver(sock, memory, *args))


def assert_all_bytes_right(result: dict[str, Any]) -> None:
    assert result["mismatched_pages"] == 0, result


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


class Served:
    def __init__(self, server: PageServer, memory: Path, sock: Path) -> None:
        self.server, self.memory, self.sock = server, memory, sock
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)
        self.thread.start()

    def drive(self, *args: str) -> dict[str, Any]:
        return run_driver(self.sock, self.memory, *args)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return start_driver(self.sock, self.memory, *args)

    def stats(self) -> dict[str, Any]:
        return self.server.stats()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    servers: list[Served] = []

    def make(
        block_size: int = 4096,
        prefetch: bool = False,
        size: int = 16 * MiB,
        populate: bool = True,
    ) -> Served:
        memory = tmp_path / "memory"
        if not memory.exists():
            make_memory(memory, size)
        sock = tmp_path / f"s{len(servers)}.sock"
        server = PageServer(
            memory,
            sock,
            block_size=block_size,
            prefetch=prefetch,
            workingset_path=tmp_path / "workingset",
            populate=populate,
        )
        server.open()
        served = Served(server, memory, sock)
        servers.append(served)
        return served

    yield make
    for s in servers:
        s.server.stop()
        s.server.stop()
        s.thread.join(30)
        s.server.close()


@pytest.mark.parametrize("method", ["syscall", "dev"])
@pytest.mark.parametrize("pattern", ["seq", "random"])
def test_one_driver_every_byte(serve: Any, method: str, pattern: str) -> None:
    s = serve()
    result = s.drive("--method", method, "--pattern", pattern, "--regions", "2")
    assert_all_bytes_right(result)
    assert result["touched"] == 16 * MiB // 4096
    stats = s.stats()
    assert stats["pages_copied"] + stats["pages_zero"] >= 4096
    assert stats["pages_zero"] >= 256  # the zero MiB went through UFFDIO_ZEROPAGE


@pytest.mark.parametrize("populate", [False, True])
@pytest.mark.parametrize("toucher", ["python", "c"])
def test_blocks_source_population_and_touchers(serve: Any, populate: bool, toucher: str) -> None:
    # With or without the source mapping populated, with either toucher: every byte
    # right, and the all-zero MiB still detected (in 64 KiB blocks).
    if toucher == "c" and uffd_driver.native_toucher() is None:
        pytest.skip("no gcc to build the C toucher")
    s = serve(block_size=64 * 1024, populate=populate)
    result = s.drive("--pattern", "random", "--toucher", toucher)
    assert_all_bytes_right(result)
    assert result["toucher"] == toucher
    assert s.stats()["pages_zero"] >= 256


def test_write_faults(serve: Any) -> None:
    assert_all_bytes_right(serve().drive("--pattern", "random", "--write"))


@pytest.mark.parametrize("kib", [64, 2048])
def test_block_serving(serve: Any, kib: int) -> None:
    s = serve(block_size=kib * 1024)
    for pattern in ("seq", "random"):
        assert_all_bytes_right(s.drive("--pattern", pattern, "--regions", "3"))
    assert s.stats()["pages_copied"] + s.stats()["pages_zero"] == 2 * 4096


@pytest.mark.parametrize("block", [4096, 65536])
def test_remove_then_refault_gives_zeros(serve: Any, block: int) -> None:
    """MADV_DONTNEED (the balloon) -> UFFD_EVENT_REMOVE; the range must come back zero,
    the rest must still be the file's."""
    s = serve(block_size=block)
    result = s.drive("--pattern", "random", "--remove", f"{6 * MiB + 8192}:{40960}")
    assert_all_bytes_right(result)
    assert result["removed_zero_pages"] == result["removed_pages"] == 10
    assert result["outside_removed_ok"]
    assert s.stats()["removes"] == 1


@pytest.mark.parametrize("n", [2, 10])
def test_concurrent_drivers(serve: Any, n: int) -> None:
    s = serve(block_size=16384)
    start = time.time() + 1.5
    procs = [
        s.start("--pattern", "random" if i % 2 else "seq", "--seed", str(i),
                "--start-at", str(start), "--method", "dev" if i % 3 else "syscall")
        for i in range(n)
    ]  # fmt: skip
    results = [finish(p) for p in procs]
    for r in results:
        assert_all_bytes_right(r)
    assert s.stats()["peers_total"] == n
    wait_for(lambda: s.stats()["peers"] == 0)


def test_sequential_drivers(serve: Any) -> None:
    s = serve()
    for i in range(3):
        assert_all_bytes_right(s.drive("--pattern", "random", "--seed", str(i)))
        wait_for(lambda: s.stats()["peers"] == 0)
    assert s.stats()["peers_total"] == 3


def test_driver_killed_midway(serve: Any) -> None:
    s = serve()
    survivor = s.start("--pattern", "random", "--start-at", str(time.time() + 1.0))
    victim = s.start("--pattern", "random", "--die-after", "500")
    victim.wait(60)
    assert victim.returncode == -signal.SIGKILL
    assert_all_bytes_right(finish(survivor))
    wait_for(lambda: s.stats()["peers"] == 0)  # both gone, the dead one's state dropped
    assert_all_bytes_right(s.drive("--pattern", "seq"))  # and the server still serves


def test_garbage_refused_while_good_one_served(serve: Any) -> None:
    s = serve()
    good = s.start("--pattern", "random", "--start-at", str(time.time() + 2.0))
    from tests.host.uffd_driver import GARBAGE

    for kind in GARBAGE:
        result = s.drive("--garbage", kind)
        assert result["closed_by_server"], kind
    assert_all_bytes_right(finish(good))
    reasons = s.stats()["refusals"]
    assert len(reasons) == len(GARBAGE)
    joined = "\n".join(reasons)
    needles = ["malformed JSON", "got 0 descriptors", "beyond the memory file"]
    needles += ["not a userfaultfd", "without sending", "got 2 descriptors", "page size"]
    for needle in needles:
        assert needle in joined


def test_handshake_timeout(serve: Any, tmp_path: Path) -> None:
    import socket

    s = serve()
    s.server.handshake_timeout = 0.3
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(s.sock))
    c.settimeout(5)
    assert c.recv(1) == b""
    assert "no handshake within" in s.stats()["refusals"][-1]


def test_prefetch_of_recorded_working_set(serve: Any, tmp_path: Path) -> None:
    s = serve(block_size=65536, prefetch=True)
    # (no full verify here: reading every page would make every page the working set)
    first = s.drive("--pattern", "seq", "--fraction", "0.25", "--no-verify")
    assert first["touched"] == 1024
    wait_for(lambda: s.stats()["workingset_pages"] > 0)
    recorded = s.stats()["workingset_pages"]
    assert recorded == 1024  # the first quarter of the pages
    assert (tmp_path / "workingset").exists()
    # A later VM gets the set copied in at connect: resident before it touches anything.
    second = s.drive("--pattern", "random", "--seed", "4", "--resident-after", "1.0")
    assert_all_bytes_right(second)
    assert second["resident_before_touch"] >= recorded
    assert s.stats()["pages_prefetched"] >= recorded
    # A new server for the same snapshot finds the recorded set on disk.
    s2 = serve(block_size=65536, prefetch=True)
    third = s2.drive("--pattern", "none", "--resident-after", "1.0")
    assert_all_bytes_right(third)
    assert third["resident_before_touch"] >= recorded


@pytest.fixture
def hugepages() -> Iterator[None]:
    """Reserve 2 MiB hugetlb pages for the test, then give them back."""
    knob = Path("/proc/sys/vm/nr_hugepages")
    if os.geteuid() != 0:
        pytest.skip("reserving hugetlb pages needs root")
    before = int(knob.read_text())
    want = before + 48  # two 16 MiB drivers at once, and slack
    knob.write_text(f"{want}\n")
    try:
        if int(knob.read_text()) < want:
            pytest.skip(f"the kernel could not reserve {want} hugetlb pages")
        yield
    finally:
        knob.write_text(f"{before}\n")


@pytest.mark.parametrize("block", [4096, 65536])
def test_hugepage_guest_memory(serve: Any, hugepages: None, block: int) -> None:
    """Firecracker's `huge_pages: "2M"`: regions of 2 MiB hugetlb pages. Each fault is
    answered with one whole huge page (the block size does not apply); a removed huge
    page comes back as zeros (copied: hugetlbfs has no UFFDIO_ZEROPAGE)."""
    s = serve(block_size=block)
    seq = s.drive("--huge", "--pattern", "seq", "--regions", "2")
    assert_all_bytes_right(seq)
    assert s.stats()["faults"] == 8  # one per huge page
    rand = s.drive("--huge", "--pattern", "random", "--seed", "3",
                   "--remove", f"{6 * MiB}:{2 * MiB}")  # fmt: skip
    assert_all_bytes_right(rand)
    assert rand["removed_zero_pages"] == rand["removed_pages"] == 512
    assert rand["outside_removed_ok"]
    assert s.stats()["pages_copied"] == 2 * 4096


def test_hugepage_prefetch(serve: Any, hugepages: None) -> None:
    s = serve(block_size=65536, prefetch=True)
    first = s.drive("--huge", "--pattern", "seq", "--fraction", "0.25", "--no-verify")
    assert first["touched"] == 1024
    wait_for(lambda: s.stats()["workingset_pages"] > 0)
    assert s.stats()["workingset_pages"] == 1024  # two huge pages' worth
    second = s.drive("--huge", "--pattern", "random", "--resident-after", "1.0")
    assert_all_bytes_right(second)
    assert second["resident_before_touch"] >= 1024


def test_stop_drains_attached_vms(serve: Any) -> None:
    """A VM attached at stop() gets all its memory first, so it survives the server."""
    s = serve()
    proc = s.start("--pattern", "random", "--fraction", "0.05", "--sleep-before-verify", "3",
                   "--remove", f"{MiB}:{8192}")  # fmt: skip
    wait_for(lambda: s.stats()["peers"] == 1)
    time.sleep(0.5)
    s.server.stop()
    s.thread.join(30)
    assert not s.thread.is_alive()
    result = finish(proc)  # verify touched every page after the server was gone
    assert_all_bytes_right(result)
    assert result["removed_zero_pages"] == 2


def _setpriv_nobody() -> list[str]:
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_non_root_gets_guidance(request: pytest.FixtureRequest) -> None:
    try:
        unpriv = int(Path(uffd.SYSCTL_UNPRIVILEGED).read_text())
    except OSError:
        unpriv = 0
    if unpriv:
        pytest.skip("vm.unprivileged_userfaultfd=1 here: unprivileged users can serve")
    # pytest's tmp_path sits under a root-only directory: use one nobody can reach.
    base = Path(tempfile.mkdtemp(prefix="fcvm-nonroot-"))
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    snap = layout.SnapshotLayout("s", base / "snapshots" / "s")
    snap.dir.mkdir(parents=True)
    make_memory(snap.memory, MiB)
    layout.save_meta(snap, layout.SnapshotMeta(name="s"))
    for p in (base, base / "snapshots", snap.dir):
        p.chmod(0o777)
    env = {**os.environ, "FCVM_BASE_DIR": str(base), "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [*_setpriv_nobody(), sys.executable, "-m", "fcvm", "snapshot", "serve", "s"],
        capture_output=True, text=True, env=env, timeout=60, cwd="/",
    )  # fmt: skip
    assert proc.returncode == 125, proc.stderr
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "cannot create a userfaultfd as nobody" in line
    assert "vm.unprivileged_userfaultfd" in line and "/dev/userfaultfd" in line
    assert "setfacl" in line


def test_cli_serve_and_sigterm(tmp_path: Path) -> None:
    base = tmp_path / "base"
    env = {"FCVM_BASE_DIR": str(base)}
    snap = base / "snapshots" / "cli"
    snap.mkdir(parents=True)
    make_memory(snap / "memory", 8 * MiB)
    (snap / "meta.json").write_text(json.dumps({"name": "cli"}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fcvm", "snapshot", "serve", "cli", "--json", "--block-size", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["pid"] == proc.pid
        sock = Path(info["socket"])
        assert sock == base / "serve" / "cli.sock" and sock.exists()
        listed = fcvm("snapshot", "ls", "--json", env=env, check=True).stdout
        assert json.loads(listed)[0]["served_by_pid"] == proc.pid
        assert "serve-cli" in fcvm("ls", env=env, check=True).stdout
        dup = fcvm("snapshot", "serve", "cli", env=env)
        assert dup.returncode == 125 and "already being served" in dup.stderr
        # Served is in use: clones of this server map its memory file.
        rm = fcvm("snapshots", "rm", "cli", env=env)
        assert rm.returncode == 125, rm.stderr
        assert rm.stderr == f"fcvm: snapshot 'cli' is being served by pid {proc.pid} (fcvm " \
                            "snapshot serve)\n"
        assert (snap / "memory").exists()
        assert_all_bytes_right(run_driver(sock, snap / "memory", "--pattern", "random"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not sock.exists()
    assert not any((base / "vms").glob("*/vm.json"))
    assert (snap / "workingset").exists()


def test_cli_serve_refuses_the_image_cache_s_snapshots(tmp_path: Path) -> None:
    base = tmp_path / "base"
    env = {"FCVM_BASE_DIR": str(base)}
    snap = base / "snapshots" / "cache-0123456789ab"
    snap.mkdir(parents=True)
    make_memory(snap / "memory", MiB)
    (snap / "meta.json").write_text(json.dumps({"name": snap.name, "kind": "prestart"}))
    proc = fcvm("snapshot", "serve", snap.name, env=env)
    assert proc.returncode == 125, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"fcvm: snapshot {snap.name!r} is a prestart snapshot of the image cache, not one of "
        "a VM (fcvm snapshot create makes those)"
    ]
