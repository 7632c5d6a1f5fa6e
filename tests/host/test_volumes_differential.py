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
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given

from tests.host.volumes_diffops import (
    REGRESSIONS,
    SEQUENCES,
    USER,
    WORKER,
    Worker,
    compare,
    diff_settings,
    with_examples,
)
from tests.host.volumes_diffworker import prepare, tree
from tests.host.volumes_harness import Mount, env_fixture, fresh_dirs, serve_mount

pytestmark = pytest.mark.host


@pytest.fixture(scope="module", params=[True, False], ids=["writeback", "no-writeback"])
def setup(request: pytest.FixtureRequest) -> Iterator[tuple[Path, Mount, dict[int, Worker]]]:
    for env in env_fixture():
        top, relay = env
        local, backing, mnt = fresh_dirs(top, "local", "back", "mnt")
        with serve_mount(relay, backing, mnt, writeback=request.param) as m:
            workers = {uid: Worker([sys.executable, str(WORKER), str(uid)]) for uid in (0, USER)}
            try:
                yield local, m, workers
            finally:
                for w in workers.values():
                    w.close()


COUNTER = iter(range(10**9))
DIFF = diff_settings(200)


def run_both(setup: tuple[Path, Mount, dict[int, Worker]], ops: list[Any], uid: int) -> None:
    local_top, m, workers = setup
    n = next(COUNTER)
    local, via, backing = local_top / f"ex{n}", m.mnt / f"ex{n}", m.backing / f"ex{n}"
    prepare(str(local))
    prepare(str(backing))
    opl = [list(o) for o in ops]
    res_local, res_fuse = workers[uid].run(opl, [str(local), str(via)])
    compare(opl, res_local, res_fuse, m.server.writeback)
    t_local = tree(str(local))
    assert tree(str(via)) == t_local
    assert tree(str(backing)) == t_local
    # Removed through the mount, so the kernel forgets its inodes and the server's node
    # table (one fd per inode) does not grow with the number of examples.
    shutil.rmtree(via)
    shutil.rmtree(local)


@DIFF
@with_examples(REGRESSIONS)
@given(ops=SEQUENCES)
def test_differential_as_root(setup: tuple[Path, Mount, dict[int, Worker]], ops: list[Any]) -> None:
    run_both(setup, ops, 0)


@DIFF
@with_examples(REGRESSIONS)
@given(ops=SEQUENCES)
def test_differential_as_user(setup: tuple[Path, Mount, dict[int, Worker]], ops: list[Any]) -> None:
    run_both(setup, ops, USER)


def test_errno_names_are_stable() -> None:
    assert errno.errorcode[errno.EACCES] == "EACCES"
