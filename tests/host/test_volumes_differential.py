"""Differential test: random operation sequences run on a local tmpfs directory and
through the FUSE mount (relay + server, backing directory on tmpfs too) must give the
same results and errnos, and leave the same trees (seen locally, through the mount,
and in the backing directory on the host).

Sequences run in worker processes (tests/host/volumes_diffworker.py) as root and as
uid/gid 1000, so permission errors are compared too. Normalised away: inode numbers,
st_dev, times (except those set explicitly by utimens), st_blocks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.host.volumes_diffworker import tree
from tests.host.volumes_harness import Mount, env_fixture, fresh_dirs, serve_mount

pytestmark = pytest.mark.host
WORKER = Path(__file__).with_name("volumes_diffworker.py")
USER = 1000
GiB = 1 << 30


class Worker:
    def __init__(self, uid: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(uid)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def run(self, ops: list[list[Any]], roots: list[str]) -> list[list[Any]]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"ops": ops, "roots": roots}) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], 60)[0]:
            self.proc.kill()  # a sequence that blocks (a test bug) fails, not hangs
            raise AssertionError(f"worker stuck on {ops}")
        line = self.proc.stdout.readline()
        assert line, "worker died"
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture(scope="module", params=[True, False], ids=["writeback", "no-writeback"])
def setup(request: pytest.FixtureRequest) -> Iterator[tuple[Path, Mount, dict[int, Worker]]]:
    for env in env_fixture():
        top, relay = env
        local, backing, mnt = fresh_dirs(top, "local", "back", "mnt")
        with serve_mount(relay, backing, mnt, writeback=request.param) as m:
            workers = {0: Worker(0), USER: Worker(USER)}
            try:
                yield local, m, workers
            finally:
                for w in workers.values():
                    w.close()


# ---- the operation strategy

NAMES = ["a", "b", "d", "d/a", "d/e", "l", "ro", "mine", "mine/x", "sticky"]
PATHS = st.sampled_from(NAMES)
FLAGS = st.sampled_from([
    os.O_RDONLY, os.O_WRONLY | os.O_CREAT, os.O_RDWR | os.O_CREAT | os.O_EXCL,
    os.O_RDWR | os.O_TRUNC, os.O_WRONLY | os.O_APPEND | os.O_CREAT, os.O_RDONLY | os.O_DIRECTORY,
    os.O_RDWR | os.O_CREAT | os.O_TRUNC, os.O_RDWR, os.O_RDWR | os.O_NOFOLLOW,
])  # fmt: skip
MODES = st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2755, 0o1777, 0o000, 0o666])
OFFSETS = st.sampled_from([0, 1, 100, 4095, 4096, 65536, 5 * GiB, 5 * GiB + 4093])
SIZES = st.sampled_from([0, 1, 3, 4096, 10000])
FD = st.integers(0, 5)
IDS = st.sampled_from([0, USER, 1001, -1])
# security.* is never writable through a map (by design: security.capability would
# grant host capabilities), so writes use the other namespaces; reads use all.
WKEYS = st.sampled_from(["user.a", "user.b", "trusted.t", "user." + "k" * 250])
XKEYS = st.one_of(WKEYS, st.just("security.x"))
TIMES = st.one_of(
    st.none(), st.tuples(st.integers(-(10**10), 2 * 10**18), st.integers(0, 2 * 10**18))
)
OFD_GETLK, OFD_SETLK = 36, 37

OPS = st.one_of(
    st.tuples(st.just("open"), PATHS, FLAGS, MODES),
    st.tuples(st.just("close"), FD),
    st.tuples(st.just("pwrite"), FD, OFFSETS, SIZES, st.integers(1, 255)),
    st.tuples(st.just("write"), FD, SIZES, st.integers(1, 255)),
    st.tuples(st.just("pread"), FD, OFFSETS, SIZES),
    st.tuples(st.just("ftruncate"), FD, OFFSETS),
    st.tuples(st.just("truncate"), PATHS, OFFSETS),
    st.tuples(st.just("fstat"), FD),
    st.tuples(st.just("stat"), PATHS, st.booleans()),
    st.tuples(st.just("chmod"), PATHS, MODES),
    st.tuples(st.just("chown"), PATHS, IDS, IDS, st.booleans()),
    st.tuples(st.just("utime"), PATHS, TIMES, st.booleans()),
    st.tuples(st.just("mkdir"), PATHS, MODES),
    st.tuples(st.just("rmdir"), PATHS),
    st.tuples(st.just("unlink"), PATHS),
    st.tuples(st.just("symlink"), st.sampled_from(["a", "d", "../x", "/nonexistent", "l"]), PATHS),
    st.tuples(st.just("readlink"), PATHS),
    st.tuples(st.just("link"), PATHS, PATHS),
    st.tuples(st.just("rename"), PATHS, PATHS, st.sampled_from([0, 0, 1, 2])),
    st.tuples(
        st.just("mknod"),
        PATHS,
        st.sampled_from(
            [
                stat.S_IFIFO | 0o644,
                stat.S_IFSOCK | 0o600,
                stat.S_IFCHR | 0o600,
                stat.S_IFREG | 0o640,
            ]
        ),
        st.just(1),
        st.just(7),
    ),
    st.tuples(
        st.just("setxattr"),
        PATHS,
        WKEYS,
        st.sampled_from(["", "v", "x" * 300]),
        st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]),
    ),
    st.tuples(st.just("getxattr"), PATHS, XKEYS),
    st.tuples(st.just("listxattr"), PATHS),
    st.tuples(st.just("removexattr"), PATHS, WKEYS),
    st.tuples(
        st.just("fallocate"),
        FD,
        st.sampled_from([0, 1, 3]),
        OFFSETS,
        st.sampled_from([1, 4096, 8192]),
    ),
    st.tuples(st.just("lseek"), FD, OFFSETS, st.sampled_from([os.SEEK_DATA, os.SEEK_HOLE])),
    st.tuples(st.just("fsync"), FD),
    st.tuples(st.just("listdir"), st.sampled_from(["", "d", "mine", "sticky"])),
    st.tuples(st.just("access"), PATHS, st.sampled_from([os.R_OK, os.W_OK, os.X_OK])),
    st.tuples(
        st.just("ofdlock"),
        FD,
        st.sampled_from([OFD_GETLK, OFD_SETLK]),
        st.sampled_from([fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK]),
        st.sampled_from([0, 10, 100]),
        st.sampled_from([0, 1, 50]),
    ),
    st.tuples(st.just("flock"), FD, st.sampled_from([fcntl.LOCK_SH, fcntl.LOCK_EX, fcntl.LOCK_UN])),
)


def prepare(d: Path) -> None:
    """The same starting tree on both sides: root-owned files and dirs, one owned by
    the unprivileged user, a sticky world-writable directory, a read-only file."""
    d.mkdir()
    os.chmod(d, 0o777)
    (d / "d").mkdir()
    (d / "d" / "a").write_bytes(b"inner")
    (d / "ro").write_bytes(b"read only")
    os.chmod(d / "ro", 0o444)
    (d / "mine").mkdir()
    os.chown(d / "mine", USER, USER)
    (d / "sticky").mkdir()
    os.chmod(d / "sticky", 0o1777)
    (d / "a").write_bytes(b"hello")
    os.chmod(d / "a", 0o664)


COUNTER = iter(range(10**9))
DIFF = settings(
    max_examples=int(os.environ.get("FCVM_DIFF_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def run_both(setup: tuple[Path, Mount, dict[int, Worker]], ops: list[Any], uid: int) -> None:
    local_top, m, workers = setup
    n = next(COUNTER)
    local, via, backing = local_top / f"ex{n}", m.mnt / f"ex{n}", m.backing / f"ex{n}"
    prepare(local)
    prepare(backing)
    opl = [list(o) for o in ops]
    res_local, res_fuse = workers[uid].run(opl, [str(local), str(via)])
    for i, (a, b) in enumerate(zip(res_local, res_fuse, strict=True)):
        if opl[i][0] == "lseek" and m.server.writeback:
            a, b = _seek_outcome(opl[i], a), _seek_outcome(opl[i], b)
        assert a == b, f"op {i} {opl[i]}: local {a} != fuse {b}"
    t_local = tree(str(local))
    assert tree(str(via)) == t_local
    assert tree(str(backing)) == t_local
    # Removed through the mount, so the kernel forgets its inodes and the server's node
    # table (one fd per inode) does not grow with the number of examples.
    shutil.rmtree(via)
    shutil.rmtree(local)


def _seek_outcome(op: list[Any], res: list[Any]) -> list[Any]:
    """With the writeback cache the guest kernel answers SEEK_DATA/SEEK_HOLE itself
    (no holes but EOF; see files.py): compare only that the answer is a valid one."""
    if res[0] != "ok" or not isinstance(res[1], list):
        return res
    value, size = res[1]
    assert op[2] <= value <= size, (op, res)
    return ["ok", "valid"]


@DIFF
@given(st.lists(OPS, min_size=1, max_size=25))
def test_differential_as_root(setup: tuple[Path, Mount, dict[int, Worker]], ops: list[Any]) -> None:
    run_both(setup, ops, 0)


@DIFF
@given(st.lists(OPS, min_size=1, max_size=25))
def test_differential_as_user(setup: tuple[Path, Mount, dict[int, Worker]], ops: list[Any]) -> None:
    run_both(setup, ops, USER)


def test_errno_names_are_stable() -> None:
    assert errno.errorcode[errno.EACCES] == "EACCES"
