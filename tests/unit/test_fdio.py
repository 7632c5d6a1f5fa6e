"""fdio's pumps from descriptors of every kind a user's stdin may be: a pipe, a regular
file, /dev/null (which epoll refuses: EPERM) and one that cannot be read at all. Each
ends with EOF on the channel, so the process on the other side is never left waiting."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from fcvm.session import fdio
from tests.unit.aio import arun, session_pair

pytestmark = pytest.mark.unit


async def pumped(fd: int) -> bytes:
    """Everything pump_fd_to_channel sends from fd, read up to the channel's EOF."""
    host, agent = await session_pair()
    ch = await host.open_channel({"kind": "stdio"})
    peer = await agent.accept()
    pump = asyncio.create_task(fdio.pump_fd_to_channel(fd, ch))
    got = b""
    while data := await asyncio.wait_for(peer.read(), 10):
        got += data
    await asyncio.wait_for(pump, 10)
    assert peer.at_eof
    await host.close()
    await agent.close()
    return got


def test_dev_null_ends_at_once() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        assert arun(pumped(fd)) == b""
    finally:
        os.close(fd)


def test_regular_file_and_pipe(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert arun(pumped(fd)) == data
    finally:
        os.close(fd)
    r, w = os.pipe()
    os.write(w, b"through a pipe")
    os.close(w)
    try:
        assert arun(pumped(r)) == b"through a pipe"
    finally:
        os.close(r)


def test_unreadable_descriptor_ends_as_eof(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: read() fails with EISDIR
    try:
        assert arun(pumped(fd)) == b""
    finally:
        os.close(fd)
