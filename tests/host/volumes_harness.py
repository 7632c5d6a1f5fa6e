"""A real FUSE mount served by VolumeServer through fcvm-fuse-relay, with no VM: the
relay runs on the host (as it will in the guest) with one end of a socketpair as its
stream, the server is a thread of the test process on the other end. This is exactly
the guest's code path, with the host kernel playing the guest kernel.

Everything lives under one private tmpfs per test session (backing directories,
mount points, local reference directories), unmounted at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fcvm.volumes.relay import READY_BYTE, build_relay
from fcvm.volumes.server import VolumeServer

FSTYPE = "fuse.fcvm"


def fcvm_mounts() -> list[str]:
    with open("/proc/mounts") as f:
        return [line for line in f if line.split()[2] == FSTYPE]


def mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


@contextlib.contextmanager
def private_tmpfs(size: str = "16g") -> Iterator[Path]:
    """A tmpfs of our own (tmpfs answers like the backing store: sparse files, user
    xattrs, SEEK_DATA), removed with everything in it at the end. nodev like the FUSE
    mount, so device nodes made locally do not open either."""
    top = Path(tempfile.mkdtemp(prefix="fcvm-vol-"))
    opts = f"size={size},mode=755,nodev"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(top)],
                   check=True)  # fmt: skip
    try:
        yield top
    finally:
        subprocess.run(["umount", "-l", str(top)], check=False)
        os.rmdir(top)


def build(tmp: Path) -> Path:
    exe = tmp / "fcvm-fuse-relay"
    if not exe.exists():
        build_relay(exe)
    return exe


@dataclass
class Mount:
    """One mapping: `backing` served at `mnt` through the relay."""

    backing: Path
    mnt: Path
    server: VolumeServer
    relay: subprocess.Popen[bytes]
    thread: threading.Thread
    sock: socket.socket
    extra: dict[str, object] = field(default_factory=dict)

    def stop(self) -> None:
        if self.relay.poll() is None:
            self.relay.send_signal(signal.SIGTERM)
        try:
            self.relay.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.relay.kill()
            self.relay.wait()
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            self.server.stop()
            self.thread.join(timeout=10)
        self.sock.close()
        assert not self.thread.is_alive(), "server thread did not end"
        assert not mounted(self.mnt), f"{self.mnt} still mounted"


def start_relay(relay: Path, mnt: Path, stream: socket.socket, ro: bool) -> subprocess.Popen[bytes]:
    argv = [str(relay), *(["--ro"] if ro else []), str(mnt), str(stream.fileno())]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, pass_fds=(stream.fileno(),))
    assert proc.stdout is not None
    ready = proc.stdout.read(1)
    proc.stdout.close()
    if ready != READY_BYTE:
        proc.wait(timeout=10)
        raise AssertionError(f"relay did not become ready (exit {proc.returncode})")
    return proc


@contextlib.contextmanager
def serve_mount(
    relay: Path,
    backing: Path,
    mnt: Path,
    *,
    read_only: bool = False,
    writeback: bool = False,  # (fcvm's default; see volumes.server.writeback_from_env)
    **server_kw: object,
) -> Iterator[Mount]:
    backing.mkdir(parents=True, exist_ok=True)
    mnt.mkdir(parents=True, exist_ok=True)
    server = VolumeServer(backing, read_only=read_only, writeback=writeback, **server_kw)  # type: ignore[arg-type]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    thread = threading.Thread(target=server.serve, args=(ours,), daemon=True)
    thread.start()
    try:
        proc = start_relay(relay, mnt, theirs, read_only)
    except BaseException:
        server.stop()
        thread.join(5)
        ours.close()
        theirs.close()
        raise
    theirs.close()
    m = Mount(backing, mnt, server, proc, thread, ours)
    try:
        os.stat(mnt)  # INIT done
        yield m
    finally:
        m.stop()


def wait_for(pred: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


# ---- fixture bodies (each test module wraps them in its own fixtures)

_counter = itertools.count()


def env_fixture() -> Iterator[tuple[Path, Path]]:
    """(private tmpfs, built relay) for one test module; checks nothing is left."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    with private_tmpfs() as top:
        (top / "bin").mkdir()
        relay = build(top / "bin")
        yield top, relay
        assert not fcvm_mounts(), fcvm_mounts()


def fresh_dirs(top: Path, *names: str) -> list[Path]:
    n = next(_counter)
    out = []
    for name in names:
        d = top / f"{name}{n}"
        d.mkdir()
        out.append(d)
    return out


def mount_fixture(env: tuple[Path, Path], **kw: object) -> Iterator[Mount]:
    top, relay = env
    backing, mnt = fresh_dirs(top, "back", "mnt")
    with serve_mount(relay, backing, mnt, **kw) as m:  # type: ignore[arg-type]
        yield m
