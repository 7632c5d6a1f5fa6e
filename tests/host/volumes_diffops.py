"""What the differential tests share (tests/host/test_volumes_differential.py on a host
mount, tests/vm/test_maps.py on a real guest): the operation strategy, the worker
process that runs sequences (tests/host/volumes_diffworker.py, wherever it runs), and
the comparison of two sides' results.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import stat
import subprocess
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, settings
from hypothesis import strategies as st

WORKER = Path(__file__).with_name("volumes_diffworker.py")
USER = 1000  # the unprivileged uid/gid of the sequences (and of prepare()'s "mine")
GiB = 1 << 30
STUCK_SECONDS = 60.0  # a worker that answers nothing for this long is stuck


class Worker:
    """A worker process (argv runs volumes_diffworker.py): one JSON request per line,
    one JSON reply per line."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)  # fmt: skip

    def request(self, req: dict[str, Any], timeout: float = STUCK_SECONDS) -> Any:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.proc.kill()  # a sequence that blocks fails, it does not hang the run
            self.proc.wait()
            raise AssertionError(f"worker stuck for {timeout:.0f}s on {req}")
        line = self.proc.stdout.readline()
        assert line, f"worker died (exit {self.proc.wait()})"
        return json.loads(line)

    def run(self, ops: list[list[Any]], roots: list[str]) -> list[list[Any]]:
        """Results of `ops` run in each root in turn."""
        return self.request({"ops": ops, "roots": roots})  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait()


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
SEQUENCES = st.lists(OPS, min_size=1, max_size=25)

# Sequences that once differed, run as explicit examples by every differential test.
REGRESSIONS = [
    # A truncating open by a non-root owner clears set-user-ID (ATOMIC_O_TRUNC leaves
    # it to the server); root keeps it.
    [("open", "mine/x", os.O_WRONLY | os.O_CREAT, 0o6755), ("close", 0),
     ("open", "mine/x", os.O_RDWR | os.O_TRUNC, 0), ("stat", "mine/x", True)],
    # A write-only file written in part: under the writeback cache the guest kernel
    # reads the page through that same handle first.
    [("open", "b", os.O_WRONLY | os.O_CREAT, 0o644), ("ftruncate", 0, 1), ("write", 0, 1, 1)],
]  # fmt: skip


def with_examples(sequences: list[list[tuple[Any, ...]]]) -> Any:
    """A decorator adding each sequence as an explicit example (argument `ops`)."""

    def add(fn: Any) -> Any:
        for ops in sequences:
            fn = example(ops=ops)(fn)
        return fn

    return add


def diff_settings(default_examples: int, env: str = "FCVM_DIFF_EXAMPLES") -> settings:
    """Hypothesis settings of a differential test: `env` overrides the example count."""
    return settings(
        max_examples=int(os.environ.get(env, str(default_examples))),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# ---- comparing two sides


def compare(ops: list[list[Any]], local: list[Any], fuse: list[Any], writeback: bool) -> None:
    """Each op's result must be the same on both sides."""
    for i, (a, b) in enumerate(zip(local, fuse, strict=True)):
        if ops[i][0] == "lseek" and writeback:
            a, b = seek_outcome(ops[i], a), seek_outcome(ops[i], b)
            if ops[i][3] == os.SEEK_DATA and a == ["err", "ENXIO"] and b == ["ok", "valid"]:
                continue  # all hole from the offset to EOF here, "data" to the kernel
        assert a == b, f"op {i} {ops[i]}: local {a} != fuse {b}"


def seek_outcome(op: list[Any], res: list[Any]) -> list[Any]:
    """With the writeback cache the guest kernel answers SEEK_DATA/SEEK_HOLE itself
    (no holes but EOF; see files.py): compare only that the answer is a valid one
    (an offset from op's up to the size, and short of EOF for SEEK_DATA)."""
    if res[0] != "ok" or not isinstance(res[1], list):
        return res
    value, size = res[1]
    assert op[2] <= value <= size, (op, res)
    assert op[3] != os.SEEK_DATA or value < size, (op, res)
    return ["ok", "valid"]
