"""Property tests: random bytes and random frame sequences never crash the reader,
and random write/read patterns never corrupt a channel's byte stream."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcvm.errors import ProtocolError
from fcvm.session import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Channel,
    Frame,
    FrameType,
    Session,
    SessionClosed,
    encode,
    read_frame,
)
from tests.unit.aio import arun, session_pair

pytestmark = pytest.mark.unit

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


LOOP_ERRORS: list[dict[str, Any]] = []


@pytest.fixture(autouse=True)
def no_unhandled_loop_errors() -> Iterator[None]:
    """Anything a loop reported as unhandled during the test (e.g. "Task exception
    was never retrieved", which shows up when tasks are collected) fails it. One gc
    per test, not per example: a full collection costs tens of ms."""
    LOOP_ERRORS.clear()
    yield
    gc.collect()
    errors = list(LOOP_ERRORS)
    LOOP_ERRORS.clear()
    assert not errors, errors


def agent_hello(session_id: str) -> bytes:
    body = json.dumps({"version": 1, "role": "agent", "session": session_id}).encode()
    return encode(Frame(FrameType.HELLO, 0, body))


@pytest.mark.timeout(120)
@FUZZ
@given(st.binary(max_size=4096), st.lists(st.integers(1, 64), max_size=20))
def test_read_frame_on_random_bytes(data: bytes, splits: list[int]) -> None:
    async def go() -> None:
        reader = asyncio.StreamReader()
        pos = 0
        for n in splits:  # arrive in pieces, like a real stream
            reader.feed_data(data[pos : pos + n])
            pos += n
        reader.feed_data(data[pos:])
        reader.feed_eof()
        consumed = 0
        while True:
            try:
                frame = await read_frame(reader)
            except ProtocolError:
                return
            if frame is None:
                assert consumed == len(data)
                return
            assert isinstance(frame.type, FrameType)
            assert len(frame.payload) <= MAX_PAYLOAD
            # Re-encoding gives back the bytes read (reserved bits aside).
            raw = data[consumed : consumed + HEADER_SIZE + len(frame.payload)]
            assert encode(frame)[:2] + encode(frame)[4:] == raw[:2] + raw[4:]
            consumed += len(raw)

    arun(go())


async def fuzz_session(stream: bytes) -> Session:
    """A host Session reading `stream` (then EOF), with an application that accepts
    and drains every channel; returns the ended session."""
    a, b = socket.socketpair()
    b.setblocking(False)
    _unused, writer = await asyncio.open_connection(sock=a)
    reader = asyncio.StreamReader()
    host = Session(reader, writer, role="host", window=2 * MAX_PAYLOAD)
    reader.feed_data(agent_hello(host.session_id))
    await host.start(5)
    mine = await host.open_channel({"mine": True})  # id 1: the peer may talk on it

    async def drain(ch: Channel) -> None:
        while True:
            try:
                if not await ch.read(1000):
                    break
            except ProtocolError:  # a bad JSON message is the application's problem
                continue
            if ch.at_eof:
                break

    async def app() -> None:
        # (channel 0 is the session's own: its control port reads it)
        tasks = [asyncio.create_task(drain(mine))]
        try:
            while True:
                tasks.append(asyncio.create_task(drain(await host.accept())))
        except SessionClosed:
            pass
        await asyncio.gather(*tasks)

    app_task = asyncio.create_task(app())
    reader.feed_data(stream)
    reader.feed_eof()
    await asyncio.wait_for(host.wait_closed(), 5)
    await asyncio.wait_for(app_task, 5)
    assert host._reader_task is not None
    assert host._reader_task.exception() is None
    await host.close()
    b.close()
    return host


@pytest.mark.timeout(120)
@FUZZ
@given(st.binary(max_size=2048))
def test_session_survives_random_bytes(stream: bytes) -> None:
    host = arun(fuzz_session(stream))
    assert host.closed
    assert host.close_reason is not None
    assert host.close_reason.startswith(("protocol error: ", "peer closed the connection"))


@st.composite
def a_frame(draw: st.DrawFn) -> bytes:
    """Mostly plausible frames (so sequences get past the first one), sometimes not."""
    ftype = draw(
        st.sampled_from(
            [FrameType.DATA] * 5
            + [FrameType.OPEN] * 3
            + [FrameType.EOF, FrameType.CLOSE, FrameType.CREDIT] * 2
            + [FrameType.HELLO]
        )
    )
    channel = draw(st.sampled_from([0, 0, 1, 2, 2, 4, 4, 6, 3, 5, 8]))
    payload: bytes
    if ftype is FrameType.OPEN:
        payload = draw(st.sampled_from([b"{}", b'{"kind":"exec"}', b"[]", b"{", b""]))
    elif ftype is FrameType.CREDIT:
        payload = draw(
            st.one_of(
                st.integers(0, 200_000).map(lambda n: struct.pack("!I", n)),
                st.integers(0, 2**32 - 1).map(lambda n: struct.pack("!I", n)),
                st.binary(max_size=6),
            )
        )
    elif ftype is FrameType.DATA:
        payload = draw(
            st.one_of(
                st.sampled_from([b"{}", b'"text"', b"[1,2]", b"null", b"\xff", b""]),
                st.binary(max_size=64),
                st.integers(1, MAX_PAYLOAD).map(lambda n: b"x" * n),
            )
        )
    else:
        payload = draw(st.sampled_from([b"", b"", b"junk"]))
    flags = draw(st.sampled_from([0, 0, 0, 1, 255]))
    return encode(Frame(ftype, channel, payload, flags))


def frames() -> st.SearchStrategy[bytes]:
    return st.lists(a_frame(), max_size=40).map(b"".join)


@pytest.mark.timeout(180)
@FUZZ
@given(frames(), st.booleans())
def test_session_survives_random_frame_sequences(stream: bytes, truncate: bool) -> None:
    if truncate and stream:
        stream = stream[: len(stream) // 2 + 1]
    host = arun(fuzz_session(stream))
    assert host.closed and host.close_reason is not None
    if host.close_reason.startswith("protocol error: "):
        return
    # No error: then the stream was a valid sequence that simply ended.
    assert host.close_reason == "peer closed the connection"


@pytest.mark.timeout(180)
@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 100_000), min_size=1, max_size=8),
    st.lists(st.one_of(st.just(-1), st.integers(512, 150_000)), min_size=1, max_size=8),
)
def test_channel_stream_integrity(writes: list[int], reads: list[int]) -> None:
    """Whatever the write sizes and read sizes, the bytes arrive unchanged and in order,
    and a JSON message sent after them (read once the bytes are in) arrives intact."""

    async def go() -> None:
        host, agent = await session_pair()
        ch = await host.open_channel({})
        rx = await agent.accept()
        blob = bytes(i % 251 for i in range(sum(writes)))

        async def send() -> None:
            pos = 0
            for n in writes:
                await ch.write(blob[pos : pos + n])
                pos += n
            await ch.write_eof()

        sender = asyncio.create_task(send())
        got = bytearray()
        i = 0
        while True:
            n = reads[i % len(reads)]
            i += 1
            chunk = await rx.read(n)
            if not chunk:
                break
            assert n < 0 or len(chunk) <= n
            got += chunk
        await sender
        assert len(got) == len(blob)
        assert bytes(got) == blob
        assert rx.at_eof
        await rx.write(b"reply")
        await rx.close()
        assert await ch.read() == b"reply"
        assert await ch.read() == b""
        await host.close()
        await agent.close()

    arun(go())


def test_json_helpers_roundtrip_unicode() -> None:
    async def go() -> None:
        host, agent = await session_pair()
        msg = {"ünï": "cødé ✓", "n": [1, 2.5, None, True]}
        ch = await host.open_channel({"k": "ü"})
        await ch.send_json(msg)
        peer = await agent.accept()
        assert peer.meta == {"k": "ü"} and await peer.recv_json() == msg
        await host.close()
        await agent.close()

    arun(go())
