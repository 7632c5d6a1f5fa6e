"""`--map HOST:GUEST[:ro]` on real VMs (QEMU/TCG): the differential suite and the
attack list on a real guest, visibility both ways, :ro, several maps at once, an
unprivileged run, the lifecycle (kill -9, the image cache, snapshots, clones) and bad
specs.

Most tests share one VM (`fcvm podman run` with seven maps, given comma-separated and
as repeated flags; its stderr is fcvm's log). Its host directories live on a private
tmpfs (so they compare with a guest tmpfs, and device nodes made through a map are
inert on the host too: nodev). In the guest, a helper python3 (VM mode, through `fcvm
exec -i`) runs snippets in the VM's namespaces or, in a forked child, in the
container's mount namespace, where the maps are mounted (the VM's own namespace has no
maps). Guest paths are the container's; `ROOT` (/proc/PID/root) reaches them from the
VM's namespace. Four maps (/v0 ... /v3) are the wire attack's to break.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given

from fcvm.volumes import protocol as p
from tests.conftest import fcvm
from tests.host.volumes_diffops import (
    OFD_GETLK,
    OFD_SETLK,
    REGRESSIONS,
    SEQUENCES,
    USER,
    WORKER,
    GiB,
    Worker,
    compare,
    diff_settings,
    with_examples,
)
from tests.host.volumes_diffworker import prepare, tree
from tests.host.volumes_harness import private_tmpfs
from tests.unit.volumes_wire import request
from tests.vm.conftest import fcvm_vmm_processes, vm_dirs
from tests.vm.runs import records, stop, wait_healthy

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

NAME = "t-maps"
VICTIMS = ("v0", "v1", "v2", "v3")  # maps 3..6: the wire attacks end them
# (directory under the private tmpfs, guest path, read-only); channel = index
MAPS = [("rw", "/rw", False), ("ro", "/ro", True), ("third", "/third", False),
        *[(v, f"/{v}", False) for v in VICTIMS]]  # fmt: skip
SECRET = "host secret outside every map\n"

# ---- the guest helper

GUEST_HELPER = r'''
import ctypes, errno, fcntl, json, os, select, shutil, signal, stat, struct, sys, time, traceback

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
RELAY = "fcvm-fuse-relay"


def relays():
    """{guest path: pid} of the running relays, and the container's pid (--mntns)."""
    out, ct = {}, None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")[:-1]
        except OSError:
            continue
        if argv and argv[0].endswith(RELAY):
            out[argv[-2]] = int(pid)
            ct = int(argv[argv.index("--mntns") + 1].split("/")[2])
    return out, ct


PID = relays()[1]
ROOT = f"/proc/{PID}/root"


def attempt(fn, *a, **kw):
    """'ok', or the errno name fn failed with."""
    try:
        fn(*a, **kw)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


def mount(src, target, fstype, flags, data):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def poll(fn, limit=5.0):
    """Seconds until fn() is true (checked every 10 ms), or None after `limit`."""
    t0 = time.monotonic()
    while True:
        try:
            if fn():
                return time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() - t0 > limit:
            return None
        time.sleep(0.01)


def read(path):
    with open(path, "rb") as f:
        return f.read().decode(errors="replace")


def port_open(channel):
    for d in os.listdir("/sys/class/virtio-ports"):
        if read(f"/sys/class/virtio-ports/{d}/name").strip() == f"fcvm.map.{channel}":
            deadline = time.monotonic() + 10
            while True:  # the dead relay's descriptor may take a moment to go
                try:
                    return os.open(f"/dev/{d}", os.O_RDWR | os.O_NOCTTY)
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
    raise OSError(errno.ENOENT, f"no port fcvm.map.{channel}")


PENDING = {}


def fuse_call(fd, msg_hex, unique, timeout=10.0):
    """Write one raw FUSE request to a map's port; [error, body hex] of the reply with
    that unique (others are skipped), "timeout", or "eof" if the host went away."""
    os.write(fd, bytes.fromhex(msg_hex))
    return fuse_reply(fd, unique, timeout) if unique else None


def fuse_reply(fd, unique, timeout):
    buf = PENDING.setdefault(fd, bytearray())
    deadline = time.monotonic() + timeout
    while True:
        while len(buf) >= 16:
            length, error, uniq = struct.unpack_from("<IiQ", buf)
            if len(buf) < length:
                break
            body = bytes(buf[16:length])
            del buf[:length]
            if uniq == unique:
                return [error, body.hex()]
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return "timeout"
        chunk = os.read(fd, 65536)
        if not chunk:
            return "eof"
        buf += chunk


def port_hup(fd, limit=10.0):
    """Whether the host end of the port closes (POLLHUP) within `limit` seconds."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for _, ev in poller.poll(100):
            if ev & select.POLLHUP:
                return True
            if ev & select.POLLIN:
                os.read(fd, 65536)
    return False


def in_container(code, uid):
    """Run code in a child that entered the container's mount namespace (as uid)."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(r)
            fd = os.open(f"/proc/{PID}/ns/mnt", os.O_RDONLY)
            if libc.setns(fd, CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            os.chdir("/")
            if uid:
                os.setgroups([uid])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            env = dict(globals())
            env["result"] = None
            exec(code, env)
            out = {"ok": True, "result": env["result"]}
        except BaseException:
            out = {"ok": False, "error": traceback.format_exc()}
        data = json.dumps(out).encode()
        while data:
            data = data[os.write(w, data):]
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(child, 0)
    return json.loads(data)


for line in sys.stdin:
    req = json.loads(line)
    try:
        if req["where"] == "container":
            out = in_container(req["code"], req["uid"])
        else:
            g = globals()
            g["result"] = None
            exec(req["code"], g)
            out = {"ok": True, "result": g["result"]}
    except BaseException:
        out = {"ok": False, "error": traceback.format_exc()}
    print(json.dumps(out), flush=True)
'''


def exec_in_guest(name: str, *argv: str) -> list[str]:
    """The argv of `fcvm exec -i --vm` running argv in the guest (stdin streamed)."""
    return [sys.executable, "-m", "fcvm", "exec", "--name", name, "--vm", "-i", "--", *argv]


class Guest:
    """The helper: python snippets in the guest; each sets `result` (JSON) or fails."""

    def __init__(self, name: str) -> None:
        self.worker = Worker(exec_in_guest(name, "python3", "-I", "-u", "-c", GUEST_HELPER))

    def _call(self, code: str, where: str, uid: int, timeout: float) -> Any:
        out = self.worker.request({"code": code, "where": where, "uid": uid}, timeout)
        if not out["ok"]:
            raise AssertionError(f"in the guest ({where}):\n{code}\n{out['error']}")
        return out["result"]

    def vm(self, code: str, timeout: float = 60) -> Any:
        """Run code in the helper itself (the VM's namespaces; state persists)."""
        return self._call(code, "vm", 0, timeout)

    def ct(self, code: str, uid: int = 0, timeout: float = 60) -> Any:
        """Run code in the container's mount namespace (a fresh child, as uid)."""
        return self._call(code, "container", uid, timeout)

    def close(self) -> None:
        self.worker.close()


# ---- the shared VM


def start(*args: str, env: dict[str, str] | None = None, stderr: Any = subprocess.PIPE
          ) -> subprocess.Popen[str]:  # fmt: skip
    full = {k: v for k, v in os.environ.items()
            if k not in ("FCVM_NO_WRITEBACK_CACHE", "FCVM_WRITEBACK_CACHE")}  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "fcvm", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**full, **(env or {})})  # fmt: skip


def vmm_of(name: str) -> list[str]:
    return [c for c in fcvm_vmm_processes() if f"fcvm.hostname={name} " in c + " "]


@dataclass
class MapsVm:
    top: Path  # the private tmpfs: one directory per map, and outside/
    proc: subprocess.Popen[str]  # the fcvm process that owns the VM
    log: Path  # its stderr
    guest: Guest
    pid: int  # the container's process, in the VM's pid namespace

    def host(self, map_dir: str) -> Path:
        return self.top / map_dir

    def fcvm_log(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="module")
def mvm(test_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MapsVm]:
    dirs_before = vm_dirs()
    with private_tmpfs("16g") as top:
        os.chmod(top, 0o755)
        for d, _, _ in MAPS:
            (top / d).mkdir(mode=0o755)
        (top / "outside").mkdir()
        (top / "outside" / "secret").write_text(SECRET)
        log = tmp_path_factory.mktemp("maps") / "fcvm.log"
        specs = [f"{top / d}:{g}{':ro' if ro else ''}" for d, g, ro in MAPS]
        with log.open("w") as err:
            proc = start("podman", "run", "--name", NAME,
                         "--map", ",".join(specs[:2]), "--map", specs[2],
                         "--map", ",".join(specs[3:]),
                         test_image, "--", "sleep", "3600", stderr=err)  # fmt: skip
        try:
            wait_healthy(NAME, proc)
            guest = Guest(NAME)
            try:
                pid = guest.vm("result = PID")
                assert isinstance(pid, int)
                yield MapsVm(top, proc, log, guest, pid)
            finally:
                guest.close()
        finally:
            stop(proc)
        assert proc.returncode is not None
        assert not vmm_of(NAME), "the VMM outlived its fcvm process"
        assert NAME not in records()
        assert not vm_dirs() - dirs_before, "a VM directory was left behind"


# ---- several maps at once


def test_seven_maps_from_comma_separated_and_repeated_flags(mvm: MapsVm) -> None:
    for d, _, _ in MAPS:
        (mvm.host(d) / f"which-{d}").write_text(d)
    # From the container's own process, as a user would: each map its own directory.
    script = "; ".join(f"cat /{d}/which-{d}; echo" for d, _, _ in MAPS)
    out = fcvm("exec", "--name", NAME, "--", "sh", "-c", f"{script}; mount")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[: len(MAPS)] == [d for d, _, _ in MAPS]
    mounts = {ln.split()[2]: ln for ln in lines[len(MAPS) :] if "fuse.fcvm" in ln}
    assert sorted(mounts) == sorted(g for _, g, _ in MAPS)
    for _, g, ro in MAPS:
        opts = mounts[g].split("(")[1].rstrip(")").split(",")
        assert ("ro" if ro else "rw") in opts and "nosuid" in opts and "nodev" in opts
    # Only in the container: the VM's own mount namespace has none of them.
    assert mvm.guest.vm("result = [l for l in read('/proc/self/mountinfo').splitlines() "
                        "if 'fuse.fcvm' in l]") == []  # fmt: skip


# ---- differential: a guest tmpfs against a map, in the same guest

LOCAL = "/difflocal"  # a tmpfs the root worker mounts in the container (nodev,nosuid)
_examples = iter(range(10**9))


@dataclass
class Diff:
    mvm: MapsVm
    workers: dict[int, Worker]


@pytest.fixture(scope="module")
def diff(mvm: MapsVm) -> Iterator[Diff]:
    (mvm.host("rw") / "diff").mkdir(mode=0o755)
    source = WORKER.read_text()
    mntns = f"/proc/{mvm.pid}/ns/mnt"
    workers = {}
    try:
        for uid in (0, USER):
            extra = ["--tmpfs", LOCAL] if uid == 0 else []
            workers[uid] = Worker(exec_in_guest(NAME, "python3", "-I", "-u", "-c", source,
                                                str(uid), "--mntns", mntns, *extra))  # fmt: skip
        yield Diff(mvm, workers)
    finally:
        for w in workers.values():
            w.close()


def run_both(d: Diff, ops: list[Any], uid: int) -> None:
    rel = f"ex{next(_examples)}"
    local, via = f"{LOCAL}/{rel}", f"/rw/diff/{rel}"
    backing = d.mvm.host("rw") / "diff" / rel
    root = d.workers[0]
    prepare(str(backing))  # on the host, as the host tests do
    assert root.request({"prepare": [local]}) == "ok"
    opl = [as_guest_tmpfs_can(list(o)) for o in ops]
    res_local, res_map = d.workers[uid].run(opl, [local, via])
    compare(opl, res_local, res_map, writeback=False)
    t_backing = tree(str(backing))  # (every descriptor closed: written back)
    # Removed through the map, so the guest forgets its inodes and the server its nodes.
    t_local, t_map = root.request({"tree": [local, via], "remove": True})
    assert t_map == t_local
    assert t_backing == t_local
    assert not backing.exists()


def as_guest_tmpfs_can(op: list[Any]) -> list[Any]:
    """The guest's tmpfs (Linux 6.1) has no user.* xattrs (6.6 added them): its ops use
    trusted.* instead (user.* through a map: test_user_xattrs_through_the_map)."""
    if op[0].endswith("xattr") and len(op) > 2 and op[2].startswith("user."):
        op[2] = "trusted." + op[2][len("user.") :]
    return op


OS = os
# The hand-written list, run as explicit examples (prepare()'s tree: a, ro, d/a, mine,
# sticky; see tests/host/volumes_diffworker.py). Descriptors are numbered by open order.
# As uid 1000 most of them meet root's files: permission errors, compared too.
HAND_WRITTEN = [
    # O_APPEND: writes go to the end whatever the offset
    [("open", "a", OS.O_WRONLY | OS.O_APPEND, 0), ("write", 0, 3, 65), ("pwrite", 0, 0, 2, 66),
     ("close", 0), ("open", "a", OS.O_RDONLY, 0), ("pread", 1, 0, 100), ("fstat", 1)],
    # O_TRUNC, and O_EXCL (also on a dangling symlink)
    [("open", "a", OS.O_RDWR | OS.O_TRUNC, 0), ("fstat", 0), ("write", 0, 3, 67),
     ("open", "b", OS.O_RDWR | OS.O_CREAT | OS.O_EXCL, 0o600),
     ("open", "b", OS.O_RDWR | OS.O_CREAT | OS.O_EXCL, 0o600), ("symlink", "/nonexistent", "l"),
     ("open", "l", OS.O_RDWR | OS.O_CREAT | OS.O_EXCL, 0o600), ("stat", "a", True)],
    # sparse, past 4 GiB; SEEK_DATA/SEEK_HOLE
    [("open", "b", OS.O_RDWR | OS.O_CREAT, 0o644), ("pwrite", 0, 5 * GiB, 4096, 7),
     ("fstat", 0), ("pread", 0, 0, 3), ("pread", 0, 5 * GiB, 3), ("lseek", 0, 0, OS.SEEK_DATA),
     ("lseek", 0, 0, OS.SEEK_HOLE), ("ftruncate", 0, 5 * GiB + 4093), ("fsync", 0),
     ("close", 0), ("stat", "b", True), ("truncate", "b", 4095), ("stat", "b", True)],
    # rename: RENAME_NOREPLACE (1) and RENAME_EXCHANGE (2)
    [("rename", "a", "d/a", 1), ("rename", "a", "d", 2), ("stat", "d", False),
     ("listdir", "d"), ("rename", "ro", "b", 1), ("rename", "d", "mine", 2),
     ("listdir", ""), ("rename", "b", "nowhere/x", 2)],
    # a fifo (opened by the guest kernel, never by the host), a socket node
    [("mknod", "f", stat.S_IFIFO | 0o644, 0, 0), ("stat", "f", False),
     ("open", "f", OS.O_RDONLY, 0), ("open", "f", OS.O_WRONLY, 0), ("write", 1, 3, 1),
     ("fstat", 0), ("mknod", "s", stat.S_IFSOCK | 0o600, 0, 0), ("open", "s", OS.O_RDONLY, 0)],
    # hard links
    [("link", "a", "b"), ("stat", "a", True), ("open", "b", OS.O_RDWR, 0),
     ("pwrite", 0, 0, 3, 88), ("close", 0), ("open", "a", OS.O_RDONLY, 0),
     ("pread", 1, 0, 10), ("unlink", "a"), ("stat", "b", True), ("link", "d", "e")],
    # xattrs
    [("setxattr", "a", "user.a", "v", 0), ("setxattr", "a", "user.a", "x", OS.XATTR_CREATE),
     ("getxattr", "a", "user.a"), ("setxattr", "a", "trusted.t", "", 0),
     ("listxattr", "a"), ("removexattr", "a", "user.a"), ("getxattr", "a", "user.a"),
     ("getxattr", "a", "security.x"), ("setxattr", "d", "user.b", "x" * 300, OS.XATTR_REPLACE),
     ("setxattr", "d", "user.b", "x" * 300, 0), ("listxattr", "d")],
    # fallocate: allocate, keep size, punch a hole
    [("open", "b", OS.O_RDWR | OS.O_CREAT, 0o644), ("fallocate", 0, 0, 0, 8192), ("fstat", 0),
     ("fallocate", 0, 1, 65536, 4096), ("fstat", 0), ("pwrite", 0, 0, 8192, 9),
     ("fallocate", 0, 3, 4096, 4096), ("pread", 0, 4090, 10), ("close", 0)],
    # OFD locks and flock between two open files
    [("open", "a", OS.O_RDWR, 0), ("open", "a", OS.O_RDWR, 0),
     ("ofdlock", 0, OFD_SETLK, 1, 0, 50), ("ofdlock", 1, OFD_SETLK, 0, 10, 1),
     ("ofdlock", 1, OFD_GETLK, 1, 0, 0), ("ofdlock", 0, OFD_SETLK, 2, 0, 50),
     ("ofdlock", 1, OFD_SETLK, 1, 10, 1), ("flock", 0, 2), ("flock", 1, 1), ("flock", 0, 8),
     ("flock", 1, 1)],
]  # fmt: skip
DIFF = diff_settings(40, env="FCVM_VM_DIFF_EXAMPLES")


@DIFF
@with_examples(HAND_WRITTEN + REGRESSIONS)
@given(ops=SEQUENCES)
def test_differential_as_root(diff: Diff, ops: list[Any]) -> None:
    run_both(diff, ops, 0)


@DIFF
@with_examples(HAND_WRITTEN + REGRESSIONS)
@given(ops=SEQUENCES)
def test_differential_as_user(diff: Diff, ops: list[Any]) -> None:
    run_both(diff, ops, USER)


def test_user_xattrs_through_the_map(mvm: MapsVm) -> None:
    (mvm.host("rw") / "xa").write_text("x")
    got = mvm.guest.ct("""
P = '/rw/xa'
os.setxattr(P, 'user.k', b'v' * 1000)
result = [os.getxattr(P, 'user.k').decode(), sorted(os.listxattr(P)),
          attempt(os.setxattr, P, 'user.k', b'w', os.XATTR_CREATE),
          attempt(os.setxattr, P, 'security.capability',  # CAP_SYS_ADMIN, v2
                  struct.pack('<5I', 0x02000000, 1 << 21, 0, 0, 0)),
          attempt(os.setxattr, P, 'security.x', b'label'),
          attempt(os.getxattr, P, 'user.none')]
os.setxattr(P, 'user.gone', b'1')
os.removexattr(P, 'user.gone')
""")
    assert got == ["v" * 1000, ["user.k"], "EEXIST", "EPERM", "EPERM", "ENODATA"]
    assert os.getxattr(mvm.host("rw") / "xa", "user.k") == b"v" * 1000
    assert os.listxattr(mvm.host("rw") / "xa") == ["user.k"]


def test_large_directories_both_ways(mvm: MapsVm) -> None:
    rw = mvm.host("rw")
    big = rw / "big"
    big.mkdir()
    names = [f"entry-{i:05d}-{'x' * (i % 50)}" for i in range(5000)]
    for n in names:
        (big / n).touch()
    g = mvm.guest
    got = g.ct("""
D = '/rw/big'
with os.scandir(D) as it:
    entries = [(e.name, e.is_file(follow_symlinks=False)) for e in it]
os.mkdir('/rw/made')
for i in range(300):
    os.close(os.open(f'/rw/made/g{i}', os.O_WRONLY | os.O_CREAT, 0o600))
result = [sorted(n for n, _ in entries), all(f for _, f in entries)]
""")
    assert got == [names, True]
    assert sorted(os.listdir(rw / "made")) == sorted(f"g{i}" for i in range(300))
    # A listing that the host changes while the guest reads it: nothing twice, and
    # every name there throughout is listed (offsets index the server's snapshot).
    g.vm("it = os.scandir(ROOT + '/rw/big'); head = [next(it).name for _ in range(100)]")
    for i in range(200):
        (big / f"late-{i}").touch()
    for n in names[-200:]:
        (big / n).unlink()
    listed = g.vm("result = head + [e.name for e in it]; it.close()")
    assert len(listed) == len(set(listed))
    assert set(names[:-200]) <= set(listed) <= set(names) | {f"late-{i}" for i in range(200)}
    # Removed on the host (the guest would take ~4 ms an entry under TCG); the guest's
    # dentries dropped so that the server's node table forgets them.
    shutil.rmtree(big)
    shutil.rmtree(rw / "made")
    g.vm("open('/proc/sys/vm/drop_caches', 'w').write('2')")
    assert g.ct("result = os.path.exists('/rw/big') or os.path.exists('/rw/made')") is False


def test_posix_locks_between_guest_processes_and_flock_against_the_host(mvm: MapsVm) -> None:
    lockfile = mvm.host("rw") / "locks"
    lockfile.write_text("x" * 100)
    got = mvm.guest.ct("""
import signal
P = '/rw/locks'
FLOCK = 'hhqqi4x'
fd = os.open(P, os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX, 50, 0)  # bytes 0-49, a classic POSIX lock
r, w = os.pipe()
child = os.fork()
if child == 0:
    signal.alarm(20)  # a lock that never comes must not hang the test
    fd2 = os.open(P, os.O_RDWR)
    held = fcntl.fcntl(fd2, fcntl.F_GETLK, struct.pack(FLOCK, fcntl.F_WRLCK, 0, 10, 1, 0))
    out = [list(struct.unpack(FLOCK, held)),
           attempt(fcntl.lockf, fd2, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 10),
           attempt(fcntl.lockf, fd2, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 60)]
    os.write(w, b'?')  # tried: now wait for the parent's lock (F_SETLKW)
    fcntl.lockf(fd2, fcntl.LOCK_EX, 1, 20)
    out.append('waited')
    os.write(w, json.dumps(out).encode())
    os._exit(0)
os.close(w)
assert os.read(r, 1) == b'?'
blocked = not select.select([r], [], [], 0.5)[0]  # the child waits in F_SETLKW ...
fcntl.lockf(fd, fcntl.LOCK_UN, 50, 0)  # ... until this
data = b''
while chunk := os.read(r, 4096):
    data += chunk
os.waitpid(child, 0)
result = [os.getpid(), blocked, json.loads(data)]
""")
    parent, blocked, (held, conflict, elsewhere, waited) = got
    assert held[0] == fcntl.F_WRLCK and held[4] == parent  # the holder, by its guest pid
    assert (conflict, elsewhere, blocked, waited) == ("EAGAIN", "ok", True, "waited")
    # flock is the host's own on the open file: a host process and the guest conflict.
    with lockfile.open("rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try_lock = ("fd = os.open('/rw/locks', os.O_RDONLY); "
                    "result = attempt(fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)")  # fmt: skip
        assert mvm.guest.ct(try_lock) == "EAGAIN"
        fcntl.flock(f, fcntl.LOCK_UN)
    assert mvm.guest.ct(try_lock) == "ok"


# ---- visibility both ways (no writeback cache, fcvm's default: DESIGN.md, Volumes,
# "Writeback cache and coherence": guest data is on the host when write(2) returns;
# host changes are seen by the guest within the 1 s entry/attribute timeout, data too)


def test_guest_writes_reach_the_host_when_each_call_returns(mvm: MapsVm) -> None:
    host = mvm.host("rw") / "vis"
    host.mkdir()
    g = mvm.guest
    # A descriptor held open across calls: the helper itself, through /proc/PID/root.
    g.vm("fd = os.open(ROOT + '/rw/vis/w', os.O_WRONLY | os.O_CREAT, 0o640); "
         "os.write(fd, b'one')")  # fmt: skip
    assert (host / "w").read_bytes() == b"one"  # no fsync, still open in the guest
    g.vm("os.write(fd, b'two'); os.pwrite(fd, b'O', 0); os.close(fd)")
    assert (host / "w").read_bytes() == b"Onetwo"
    st = (host / "w").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, 0)
    g.ct("os.mkdir('/rw/vis/dir', 0o700)")
    assert stat.S_IMODE((host / "dir").stat().st_mode) == 0o700
    g.ct("os.rename('/rw/vis/w', '/rw/vis/dir/w2')")
    assert not (host / "w").exists() and (host / "dir" / "w2").read_bytes() == b"Onetwo"
    g.ct("os.chmod('/rw/vis/dir/w2', 0o604); os.chown('/rw/vis/dir/w2', 1234, 5678)")
    st = (host / "dir" / "w2").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o604, 1234, 5678)
    g.ct("os.symlink('w2', '/rw/vis/dir/ln'); os.link('/rw/vis/dir/w2', '/rw/vis/hard')")
    assert os.readlink(host / "dir" / "ln") == "w2" and (host / "hard").stat().st_nlink == 2
    g.ct("os.truncate('/rw/vis/hard', 2); os.unlink('/rw/vis/dir/ln')")
    assert (host / "dir" / "w2").read_bytes() == b"On" and not (host / "dir" / "ln").exists()


def test_host_changes_reach_the_guest_within_a_second(mvm: MapsVm) -> None:
    d = mvm.host("rw") / "hvis"
    d.mkdir()
    for name, data in (("old", "v1"), ("same", "AAAA"), ("gone", "x"), ("moved", "m"),
                       ("mode", "")):  # fmt: skip
        (d / name).write_text(data)
    g = mvm.guest
    # The guest caches all of them first (entries, attributes, data).
    assert g.ct("result = [read('/rw/hvis/' + n) for n in ('old', 'same', 'gone', 'moved')]"
                ) == ["v1", "AAAA", "x", "m"]  # fmt: skip
    (d / "new").write_text("fresh")
    (d / "old").write_text("version two")
    (d / "same").write_text("BBBB")  # same size, new mtime
    (d / "gone").unlink()
    os.rename(d / "moved", d / "renamed")
    os.chmod(d / "mode", 0o600)
    # One loop in the guest notes when each change is first seen (seconds since the loop
    # began, which is after every change was made).
    seen = g.ct("""
H = '/rw/hvis/'
checks = {
    'new name': lambda: read(H + 'new') == 'fresh',
    'new data and size': lambda: read(H + 'old') == 'version two',
    'new data, same size': lambda: read(H + 'same') == 'BBBB',
    'removed': lambda: not os.path.lexists(H + 'gone'),
    'renamed': lambda: os.path.exists(H + 'renamed') and not os.path.lexists(H + 'moved'),
    'mode': lambda: stat.S_IMODE(os.stat(H + 'mode').st_mode) == 0o600,
}
result = {}
t0 = time.monotonic()
while checks and time.monotonic() - t0 < 5:
    for what, check in list(checks.items()):
        try:
            ok = check()
        except OSError:
            ok = False
        if ok:
            result[what] = time.monotonic() - t0
            del checks[what]
    time.sleep(0.01)
""")
    assert set(seen) == {"new name", "new data and size", "new data, same size", "removed",
                         "renamed", "mode"}, seen  # fmt: skip
    assert all(t <= 2.0 for t in seen.values()), seen


def test_a_shared_log_keeps_every_writer_s_lines(mvm: MapsVm) -> None:
    """A container appending to a log that a host process appends to and truncates
    (logrotate's copytruncate): nothing either side wrote is lost or comes back, and a
    reader in the container following the file (tail -f) sees the host's lines."""
    d = mvm.host("rw") / "log"
    d.mkdir()
    g = mvm.guest
    # Descriptors held open across calls: the helper itself, through /proc/PID/root.
    g.vm("log = ROOT + '/rw/log/app.log'; "
         "fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644); "
         "follow = os.open(log, os.O_RDONLY)")  # fmt: skip
    for i in range(3):
        g.vm(f"os.write(fd, b'guest{i}\\n')")
        with open(d / "app.log", "a") as host:
            host.write(f"host{i}\n")
    expected = "".join(f"guest{i}\nhost{i}\n" for i in range(3))
    assert (d / "app.log").read_text() == expected
    # Read without reopening, like tail -f (within the 1 s attribute timeout).
    assert g.vm(f"""
t0, got = time.monotonic(), b''
while len(got) < {len(expected)} and time.monotonic() - t0 < 3:
    got += os.read(follow, 4096) or b''
    time.sleep(0.05)
result = got.decode()
""") == expected  # fmt: skip
    os.truncate(d / "app.log", 0)
    g.vm("os.write(fd, b'after\\n'); os.close(fd); os.close(follow)")
    assert (d / "app.log").read_text() == "after\n"


# ---- read-only maps


RO_ATTEMPTS = """
R = '/ro/t/'
result = {
    'open for writing': attempt(os.open, R + 'f', os.O_WRONLY),
    'open with O_TRUNC': attempt(os.open, R + 'f', os.O_RDONLY | os.O_TRUNC),
    'create': attempt(os.open, R + 'new', os.O_WRONLY | os.O_CREAT, 0o644),
    'mkdir': attempt(os.mkdir, R + 'newdir'),
    'rmdir': attempt(os.rmdir, R + 'empty'),
    'unlink': attempt(os.unlink, R + 'f'),
    'rename': attempt(os.rename, R + 'f', R + 'g'),
    'link': attempt(os.link, R + 'f', R + 'h'),
    'symlink': attempt(os.symlink, 'f', R + 's'),
    'mkfifo': attempt(os.mkfifo, R + 'fifo'),
    'chmod': attempt(os.chmod, R + 'f', 0o600),
    'chown': attempt(os.chown, R + 'f', 1, 1),
    'utime': attempt(os.utime, R + 'f', (1, 1)),
    'truncate': attempt(os.truncate, R + 'f', 0),
    'setxattr': attempt(os.setxattr, R + 'f', 'user.k', b'w'),
    'removexattr': attempt(os.removexattr, R + 'f', 'user.k'),
}
reads = [read(R + 'f'), sorted(os.listdir(R)), os.getxattr(R + 'f', 'user.k').decode()]
result = [result, reads]
"""


def ro_mount_options(mvm: MapsVm) -> list[str]:
    info = mvm.guest.vm(f"result = read('/proc/{mvm.pid}/mountinfo')")
    (line,) = [ln for ln in info.splitlines() if ln.split()[4] == "/ro"]
    return line.split()[5].split(",")  # type: ignore[no-any-return]


def test_read_only_map_refuses_every_change_even_remounted_rw(mvm: MapsVm) -> None:
    ro = mvm.host("ro") / "t"
    ro.mkdir()
    (ro / "f").write_text("data")
    os.setxattr(ro / "f", "user.k", b"v")
    (ro / "empty").mkdir()
    before = fingerprint(ro)
    changes, reads = mvm.guest.ct(RO_ATTEMPTS)
    assert changes == dict.fromkeys(changes, "EROFS") and len(changes) == 16, changes
    assert reads == ["data", ["empty", "f"], "v"]
    # The guest is root in its VM: it makes its mount read-write. The server still says no.
    remount = "mount(None, '/ro', None, MS_REMOUNT | MS_NOSUID | MS_NODEV | {ro}, None)"
    mvm.guest.ct(remount.format(ro=0))
    try:
        assert "rw" in ro_mount_options(mvm)
        changes, reads = mvm.guest.ct(RO_ATTEMPTS)
        assert changes == dict.fromkeys(changes, "EROFS"), changes
        assert reads == ["data", ["empty", "f"], "v"]
    finally:
        mvm.guest.ct(remount.format(ro="MS_RDONLY"))
    assert "ro" in ro_mount_options(mvm)
    assert fingerprint(ro) == before


def fingerprint(d: Path) -> list[tuple[Any, ...]]:
    """Everything about a tree a change would show in (data, modes, owners, times)."""
    out: list[tuple[Any, ...]] = []
    for path in sorted([d, *d.rglob("*")]):
        st = path.lstat()
        data = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        link = os.readlink(path) if path.is_symlink() else ""
        xattrs = os.listxattr(path, follow_symlinks=False)
        out.append((str(path), st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                    st.st_ctime_ns, data, link, xattrs))  # fmt: skip
    return out


# ---- a hostile guest through the kernel's path


def test_symlinks_resolve_in_the_guest_never_on_the_host(mvm: MapsVm) -> None:
    third, outside = mvm.host("third"), mvm.top / "outside"
    (third / "abs").symlink_to(outside / "secret")
    (third / "rel").symlink_to("../outside/secret")
    (third / "absdir").symlink_to(outside)
    (third / "reldir").symlink_to("../outside")
    (third / "sub").mkdir()
    (third / "sub" / "up").symlink_to("../../outside/secret")
    before = fingerprint(outside)
    # The container has an /outside of its own: links through the map land there, or
    # nowhere, never on the host's.
    got = mvm.guest.ct(f"""
os.makedirs('/outside', exist_ok=True)
with open('/outside/secret', 'w') as f:
    f.write('guest decoy')
T = '/third/'
def get(p):
    try:
        return read(p)
    except OSError as e:
        return errno.errorcode[e.errno]
reads = {{p: get(T + p) for p in ('abs', 'rel', 'absdir/secret', 'reldir/secret', 'sub/up',
                                  '../outside/secret', 'sub/../../outside/secret')}}
writes = {{
    'through reldir': attempt(lambda: open(T + 'reldir/planted', 'w').close()),
    'through abs': attempt(lambda: open(T + 'abs', 'w').close()),
    'through absdir': attempt(lambda: open(T + 'absdir/planted', 'w').close()),
    'mkdir through reldir': attempt(os.mkdir, T + 'reldir/newdir'),
    'link out': attempt(os.link, '/outside/secret', T + 'hard'),
    'rename out': attempt(os.rename, T + 'sub', '/outside/sub'),
}}
os.symlink({str(outside / "secret")!r}, T + 'g-abs')
os.symlink('../outside', T + 'g-rel')
result = [reads, writes, sorted(os.listdir('/outside'))]
""")
    reads, writes, guest_outside = got
    assert SECRET.strip() not in json.dumps(got)
    assert reads == {
        "abs": "ENOENT", "rel": "guest decoy", "absdir/secret": "ENOENT",
        "reldir/secret": "guest decoy", "sub/up": "guest decoy",
        "../outside/secret": "guest decoy", "sub/../../outside/secret": "guest decoy",
    }  # fmt: skip
    assert writes == {"through reldir": "ok", "through abs": "ENOENT",
                      "through absdir": "ENOENT", "mkdir through reldir": "ok",
                      "link out": "EXDEV", "rename out": "EXDEV"}  # fmt: skip
    assert guest_outside == ["newdir", "planted", "secret"]  # the guest's own
    assert os.readlink(third / "g-abs") == str(outside / "secret")  # stored as data
    assert os.readlink(third / "g-rel") == "../outside"
    assert fingerprint(outside) == before
    assert (outside / "secret").read_text() == SECRET


def test_device_nodes_made_through_a_map_are_never_devices(mvm: MapsVm) -> None:
    # As root in the guest (all capabilities in the VM): /dev/zero's numbers and a fifo.
    got = mvm.guest.ct("""
os.mknod('/third/zero', stat.S_IFCHR | 0o666, os.makedev(1, 5))
os.mkfifo('/third/fifo')
result = [attempt(os.open, '/third/zero', os.O_RDONLY),
          attempt(os.open, '/third/fifo', os.O_RDONLY | os.O_NONBLOCK)]
""")
    # The guest's mount is nodev: its kernel refuses the device; the fifo is its own.
    assert got == ["EACCES", "ok"]
    st = (mvm.host("third") / "zero").lstat()  # fcvm runs as root: the node is made ...
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 5)
    # ... and never opened by the server (test_a_hostile_guest_on_the_wire sends OPEN
    # for one directly); on the host it lives on a nodev mount here.


def test_snapshot_create_of_a_vm_with_maps_is_refused(mvm: MapsVm) -> None:
    snap = "t-maps-snap"
    fcvm("snapshots", "rm", snap)
    proc = fcvm("snapshot", "create", NAME, "--tag", snap)
    assert proc.returncode == 125, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--map" in proc.stderr, proc.stderr
    names = [s["name"] for s in json.loads(fcvm("snapshots", "--json", check=True).stdout)]
    assert snap not in names
    (mvm.host("rw") / "after-snapshot").write_text("still here")
    assert mvm.guest.ct("result = read('/rw/after-snapshot')") == "still here"


# ---- other VMs: the image cache, kill -9, no writeback cache, clones, unprivileged


def run_with_marks(tmp: Path, name: str, *args: str) -> tuple[subprocess.CompletedProcess[str],
                                                                dict[str, float]]:  # fmt: skip
    marks = tmp / f"marks-{name}-{time.monotonic_ns()}.json"
    proc = fcvm("podman", "run", "--name", name, *args, env={"FCVM_TIMINGS": str(marks)})
    return proc, (json.loads(marks.read_text()) if marks.exists() else {})


@pytest.mark.usefixtures("no_leftovers")
def test_a_run_restored_from_the_image_cache_maps_again(test_image: str, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "in").write_text("from the host\n")
    outs = []
    for i in range(2):  # the first fills the cache if nothing else did
        proc, marks = run_with_marks(tmp_path, "t-maps-cache", "--map", f"{share}:/m",
                                     test_image, "--", "sh", "-c",
                                     f"cat /m/in; echo run{i} > /m/out{i}")  # fmt: skip
        assert (proc.returncode, proc.stdout) == (0, "from the host\n"), proc.stderr
        outs.append(marks)
    assert "vmm-restored" in outs[1], outs[1]  # the second run was a restore
    assert [(share / f"out{i}").read_text() for i in range(2)] == ["run0\n", "run1\n"]


@pytest.mark.usefixtures("no_leftovers")
def test_without_writeback_cache_then_kill_9_leaves_nothing(test_image: str, tmp_path: Path
                                                            ) -> None:  # fmt: skip
    """FCVM_NO_WRITEBACK_CACHE=1 (which wins over FCVM_WRITEBACK_CACHE=1): a guest write
    is on the host when write(2) returns, descriptor still open. Then fcvm is killed
    -9: its VMM goes, the next command reaps the rest, and the host directory holds
    exactly what the guest wrote."""
    share = tmp_path / "k9"
    share.mkdir()
    name = "t-maps-k9"
    p = start("podman", "run", "--name", name, "--map", f"{share}:/m", test_image, "--",
              "sleep", "600",
              env={"FCVM_NO_WRITEBACK_CACHE": "1", "FCVM_WRITEBACK_CACHE": "1"})  # fmt: skip
    try:
        rec = wait_healthy(name, p)
        w = subprocess.Popen(
            [sys.executable, "-m", "fcvm", "exec", "--name", name, "-i", "--", "sh", "-c",
             "exec 3>/m/nwb; printf one >&3; echo written; read x; "
             "printf two >&3; echo again; read x; exec 3>&-; echo closed"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert w.stdin and w.stdout
        try:
            assert w.stdout.readline() == "written\n"
            assert (share / "nwb").read_bytes() == b"one"  # no fsync, no close
            w.stdin.write("\n")
            w.stdin.flush()
            assert w.stdout.readline() == "again\n"
            assert (share / "nwb").read_bytes() == b"onetwo"
            w.stdin.write("\n")
            w.stdin.flush()
            assert w.stdout.readline() == "closed\n"
            assert w.wait(30) == 0
        finally:
            if w.poll() is None:
                w.kill()
                w.wait()
        p.kill()
        p.wait()
        deadline = time.monotonic() + 15
        while vmm_of(name) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not vmm_of(name), "the VMM outlived fcvm's kill -9"
        assert name not in records()  # (ls reaps it)
        assert rec["vm_id"] not in vm_dirs()
        assert sorted(os.listdir(share)) == ["nwb"] and (share / "nwb").read_bytes() == b"onetwo"
        with open("/proc/mounts") as f:
            assert str(share) not in f.read()  # nothing was ever mounted on the host
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.usefixtures("no_leftovers")
def test_a_clone_of_a_snapshot_without_maps_mounts_its_own(test_image: str, tmp_path: Path
                                                           ) -> None:  # fmt: skip
    snap = "t-maps-clonesnap"
    fcvm("snapshots", "rm", snap)  # (left by an earlier, killed run)
    src = start("podman", "run", "--name", "t-maps-src", test_image, "--", "sh", "-c",
                "echo from-the-source > /tmp/marker; exec sleep 3600")  # fmt: skip
    try:
        wait_healthy("t-maps-src", src)
        fcvm("snapshot", "create", "t-maps-src", "--tag", snap, check=True)
    finally:
        stop(src)
    try:
        share = tmp_path / "clone"
        share.mkdir()
        (share / "in").write_text("for the clone\n")
        proc = fcvm("snapshot", "run", "--snapshot", snap, "--name", "t-maps-clone",
                    "--map", f"{share}:/m,{tmp_path}:/ro:ro", "--exec",
                    "sh -c 'cat /tmp/marker /m/in; echo from-the-clone > /m/out; "
                    "touch /ro/x 2>/dev/null || echo ro-refused'")  # fmt: skip
        assert (proc.returncode, proc.stdout) == (
            0, "from-the-source\nfor the clone\nro-refused\n"
        ), proc.stderr  # fmt: skip
        assert (share / "out").read_text() == "from-the-clone\n"
        assert not (tmp_path / "x").exists()
        # Bad specs for a clone: one line, 125, no VM (see test_bad_map_specs...).
        for case, (maps, needle) in bad_specs(tmp_path / "bad").items():
            args = [a for m in maps for a in ("--map", m)]
            bad = fcvm("snapshot", "run", "--snapshot", snap, *args, "--exec", "true")
            assert bad.returncode == 125, (case, bad.stderr)
            assert len(bad.stderr.strip().splitlines()) == 1 and needle in bad.stderr, case
    finally:
        fcvm("snapshots", "rm", snap)


@pytest.fixture
def tun_open_to_all() -> Iterator[None]:
    """As tests/vm/test_network.py: unprivileged TAP creation needs /dev/net/tun 0666."""
    mode = os.stat("/dev/net/tun").st_mode & 0o777
    os.chmod("/dev/net/tun", 0o666)
    yield
    os.chmod("/dev/net/tun", mode)


UNPRIVILEGED_SCRIPT = """
id -u
stat -c '%n %u %g' /m/own /m/rootfile
touch /m/new && echo created
mkdir /m/newdir && echo mkdir
chown 0:0 /m/new && echo chown-to-0
chown 1234 /m/new 2>/dev/null || echo chown-other-refused
chgrp 1234 /m/new 2>/dev/null || echo chgrp-other-refused
chmod 6755 /m/new && echo chmod
chmod 2775 /m/newdir && echo chmod-dir
stat -c '%n %a %u %g' /m/new /m/newdir
echo x >> /m/rootfile 2>/dev/null || echo root-file-refused
mknod /m/dev c 1 5 2>/dev/null || echo mknod-refused
"""


@pytest.mark.usefixtures("no_leftovers")
def test_unprivileged_fcvm_owns_what_the_guest_makes(
    image_archives: dict[str, Path], tun_open_to_all: None
) -> None:
    """fcvm as uid 1000 (user+net namespace, slirp4netns, QEMU/TCG): ownership as
    src/fcvm/volumes/ownership.py describes (the user is root in the guest, host root
    is nobody; new files are the user's; set-ID bits never appear on files)."""
    from fcvm import paths

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to become an unprivileged user, and setpriv")
    home = Path(tempfile.mkdtemp(prefix="fcvm-u1000-"))  # pytest's tmp_path is root-only
    try:
        os.chmod(home, 0o755)
        os.chown(home, USER, USER)
        archive = home / "image.oci.tar"
        shutil.copy(image_archives["oci-archive"], archive)
        os.chmod(archive, 0o644)
        share = home / "share"
        share.mkdir()
        os.chown(share, USER, USER)
        (share / "own").write_text("mine")
        os.chown(share / "own", USER, USER)
        (share / "rootfile").write_text("root's\n")  # root's, 0644
        src = os.path.dirname(os.path.dirname(os.path.abspath(__import__("fcvm").__file__)))
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "PYTHONPATH": src,
            "FCVM_BASE_DIR": f"{home}/base", "FCVM_ASSETS_DIR": str(paths.assets_dir()),
        }  # fmt: skip
        proc = subprocess.run(
            ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups",
             sys.executable, "-m", "fcvm", "podman", "run", "--name", "t-maps-u1000",
             "--no-snapshot", "--map", f"{share}:/m", f"oci-archive:{archive}", "--",
             "sh", "-c", UNPRIVILEGED_SCRIPT],
            env=env, capture_output=True, text=True, timeout=300, cwd=home,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [
            "0",  # root in the container
            "/m/own 0 0",  # the user's file: the guest's root's
            "/m/rootfile 65534 65534",  # host root: nobody
            "created", "mkdir", "chown-to-0", "chown-other-refused", "chgrp-other-refused",
            "chmod", "chmod-dir",
            "/m/new 755 0 0",  # set-user-ID and set-group-ID stripped
            "/m/newdir 2775 0 0",  # a directory keeps set-group-ID
            "root-file-refused", "mknod-refused",
        ], proc.stdout  # fmt: skip
        for name in ("new", "newdir"):
            st = (share / name).lstat()
            assert (st.st_uid, st.st_gid) == (USER, USER), name
        assert stat.S_IMODE((share / "new").stat().st_mode) == 0o755
        assert stat.S_IMODE((share / "newdir").stat().st_mode) == 0o2775
        assert (share / "rootfile").read_text() == "root's\n"
        assert sorted(os.listdir(share)) == ["new", "newdir", "own", "rootfile"]
        assert os.listdir(home / "base" / "vms") == [".lock"]  # nothing left of the VM
    finally:
        shutil.rmtree(home)


# ---- bad specs


def bad_specs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    tmp.mkdir(exist_ok=True)
    for i in range(9):
        (tmp / f"d{i}").mkdir()
    (tmp / "file").write_text("")
    return {
        "missing host dir": ([f"{tmp}/no-such-dir:/d"], "does not exist"),
        "relative guest path": ([f"{tmp}/d0:data"], "must be absolute"),
        "nine maps": ([f"{tmp}/d{i}:/m{i}" for i in range(9)], "at most 8"),
        "duplicate guest path": ([f"{tmp}/d0:/x", f"{tmp}/d1:/x/"], "already mapped"),
        "a file": ([f"{tmp}/file:/x"], "not a directory"),
        "bad option": ([f"{tmp}/d0:/x:rx"], "'ro' or 'rw'"),
        "over the root": ([f"{tmp}/d0:/"], "root directory"),
    }


@pytest.mark.parametrize(
    "case", ["missing host dir", "relative guest path", "nine maps", "duplicate guest path",
             "a file", "bad option", "over the root"],
)  # fmt: skip
@pytest.mark.usefixtures("no_leftovers")
def test_bad_map_specs_are_one_line_and_125(test_image: str, tmp_path: Path, case: str) -> None:
    maps, needle = bad_specs(tmp_path)[case]
    args = [a for m in maps for a in ("--map", m)]
    proc = fcvm("podman", "run", "--name", "t-maps-bad", *args, test_image, "--", "true")
    assert proc.returncode == 125, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr
    import fcvm as api

    with pytest.raises(api.UsageError, match=needle):
        api.run(test_image, "true", maps=maps, name="t-maps-bad")


# ---- a hostile guest on the wire (last: it ends the maps /v0 ... /v3)


class Wire:
    """Raw FUSE requests on a map's port, from the guest's VM namespace, once its relay
    is killed: what a guest that owns its kernel can send."""

    def __init__(self, mvm: MapsVm, guest_path: str) -> None:
        self.g = mvm.guest
        self.channel = [m[1] for m in MAPS].index(guest_path)
        self.var = f"port{self.channel}"
        self.unique = 1 << 40  # far from the kernel's
        pid = self.g.vm(f"result = relays()[0][{guest_path!r}]")
        self.g.vm(f"""
os.kill({pid}, 9)
assert poll(lambda: not os.path.exists('/proc/{pid}'), 10) is not None
{self.var} = port_open({self.channel})
""")

    def call(self, opcode: int, body: bytes = b"", nodeid: int = 1, **kw: int
             ) -> tuple[int, bytes]:  # fmt: skip
        self.unique += 1
        msg = request(opcode, body, unique=self.unique, nodeid=nodeid, **kw)
        got = self.g.vm(f"result = fuse_call({self.var}, {msg.hex()!r}, {self.unique})")
        assert isinstance(got, list), f"no reply: {got}"
        return -got[0], bytes.fromhex(got[1])

    def send(self, raw: bytes) -> None:
        self.g.vm(f"fuse_call({self.var}, {raw.hex()!r}, 0)")

    def lookup(self, parent: int, name: bytes) -> tuple[int, int, tuple[int, ...]]:
        """(errno, nodeid, attr) of LOOKUP name under parent."""
        err, body = self.call(p.Op.LOOKUP, name + b"\0", nodeid=parent)
        if err:
            return err, 0, ()
        nodeid = p.ENTRY_HEAD.unpack_from(body)[0]
        return 0, nodeid, p.ATTR.unpack_from(body, p.ENTRY_HEAD.size)

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> tuple[int, int]:
        err, body = self.call(p.Op.OPEN, p.OPEN_IN.pack(flags, 0), nodeid=nodeid)
        return err, (p.OPEN_OUT.unpack_from(body)[0] if not err else 0)

    def host_closed(self) -> bool:
        return bool(self.g.vm(f"result = port_hup({self.var})"))


def test_a_hostile_guest_on_the_wire(mvm: MapsVm) -> None:
    """Forged and nonsensical requests get errnos; malformed ones (shorter than a
    header, longer than the limit, a body shorter than its struct, a name without its
    NUL) end that map only, with the reason in fcvm's log; fcvm, the VM and the other
    maps go on."""
    if not mvm.guest.vm("result = os.path.isdir('/sys/class/virtio-ports')"):
        pytest.skip("maps travel on vsock (Firecracker): a dead relay's connection ends its map")
    v0, outside = mvm.host("v0"), mvm.top / "outside"
    (v0 / "abs").symlink_to(outside / "secret")
    (v0 / "reldir").symlink_to("../outside")
    (v0 / "file").write_text("inside")
    mvm.guest.ct("os.mknod('/v0/zero', stat.S_IFCHR | 0o666, os.makedev(1, 5)); "
                 "os.mkfifo('/v0/fifo')")  # fmt: skip
    before = fingerprint(outside)

    w = Wire(mvm, "/v0")
    # Symlinks are leaves: never a directory to look in or a file to open.
    err, link, attr = w.lookup(1, b"reldir")
    assert err == 0 and stat.S_ISLNK(attr[9])
    assert w.lookup(link, b"secret")[0] == errno.ENOTDIR
    assert w.call(p.Op.OPENDIR, p.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=link)[0] == errno.ENOTDIR
    err, absl, _ = w.lookup(1, b"abs")
    assert err == 0 and w.open(absl)[0] == errno.EACCES
    assert w.call(p.Op.READLINK, nodeid=absl) == (0, str(outside / "secret").encode())
    # Names are one component; ".." of the root is the root.
    assert w.lookup(1, b"../outside")[0] == errno.EINVAL
    err, up, attr = w.lookup(1, b"..")
    assert err == 0 and attr[0] == v0.stat().st_ino
    assert w.lookup(up, b"outside")[0] == errno.ENOENT
    # Forged ids: ESTALE, EBADF, never another inode or file.
    assert w.call(p.Op.GETATTR, bytes(16), nodeid=0xDEADBEEF)[0] == errno.ESTALE
    err, f, _ = w.lookup(1, b"file")
    assert err == 0
    read_in = p.READ_IN.pack(123456, 0, 4096, 0, 0, os.O_RDONLY, 0)
    assert w.call(p.Op.READ, read_in, nodeid=f)[0] == errno.EBADF
    # Special files are never opened on the host (a device would be the host's, a fifo
    # would block the server): EACCES, and the server answers the next request.
    for name in (b"zero", b"fifo"):
        err, node, _ = w.lookup(1, name)
        assert err == 0 and w.open(node)[0] == errno.EACCES, name
    err, fh = w.open(f)
    assert err == 0
    reply = w.call(p.Op.READ, p.READ_IN.pack(fh, 0, 4096, 0, 0, os.O_RDONLY, 0), nodeid=f)
    assert reply == (0, b"inside")

    # Malformed: each ends its map.
    w.send(p.IN_HEADER.pack(8, p.Op.GETATTR, 1, 1, 0, 0, 0, 0, 0))  # shorter than a header
    w1 = Wire(mvm, "/v1")
    w1.send(p.IN_HEADER.pack(64 << 20, p.Op.WRITE, 1, 1, 0, 0, 0, 0, 0))  # 64 MiB
    w2 = Wire(mvm, "/v2")
    w2.send(request(p.Op.LOOKUP, b"no-terminating-nul", unique=7))
    w3 = Wire(mvm, "/v3")
    w3.send(request(p.Op.GETATTR, b"\0" * 4, unique=8))  # fuse_getattr_in is 16 bytes
    for wire in (w, w1, w2, w3):
        assert wire.host_closed()
    log = mvm.fcvm_log()
    ended = [ln for ln in log.splitlines() if "serving ended" in ln]
    assert len(ended) == 4, log
    assert f"map {v0}: serving ended: malformed message: message length 8" in log
    assert f"map {mvm.host('v1')}: serving ended: malformed message: message length" in log
    assert f"map {mvm.host('v2')}: serving ended: malformed LOOKUP message" in log
    assert f"map {mvm.host('v3')}: serving ended: malformed GETATTR message" in log

    # fcvm, the VM and the other maps go on.
    assert mvm.proc.poll() is None and records()[NAME]["status"] == "running"
    (mvm.host("third") / "after-attack").write_text("host to guest")
    out = fcvm("exec", "--name", NAME, "--", "sh", "-c",
               "cat /third/after-attack; echo guest to host > /rw/after-attack")  # fmt: skip
    assert (out.returncode, out.stdout) == (0, "host to guest"), out.stderr
    assert (mvm.host("rw") / "after-attack").read_text() == "guest to host\n"
    assert fingerprint(outside) == before
