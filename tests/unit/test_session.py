"""The session protocol over a socketpair: handshake, channels, flow control, bad peers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import struct
from typing import Any

import pytest

from fcvm.errors import ProtocolError
from fcvm.session import (
    DEFAULT_WINDOW,
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
from fcvm.session.control import RequestFailed
from tests.unit.aio import arun, session_pair, stream_pair

pytestmark = pytest.mark.unit

INVERT = bytes(255 - i for i in range(256))


def hello(role: str = "agent", **extra: Any) -> bytes:
    body = {"version": 1, "role": role, **extra}
    return encode(Frame(FrameType.HELLO, 0, json.dumps(body).encode()))


async def raw_peer(
    window: int = DEFAULT_WINDOW,
) -> tuple[Session, asyncio.StreamReader, asyncio.StreamWriter]:
    """A host Session whose peer is a raw stream the test writes bytes onto."""
    (hr, hw), (pr, pw) = await stream_pair()
    host = Session(hr, hw, role="host", window=window)
    started = asyncio.create_task(host.start(5))
    frame = await read_frame(pr)  # the host's HELLO comes first
    assert frame is not None and frame.type is FrameType.HELLO
    sent = json.loads(frame.payload)
    assert sent == {"version": 1, "role": "host", "window": window, "session": host.session_id}
    pw.write(hello("agent", session=host.session_id))  # the agent echoes the session id
    assert await started == {"version": 1, "role": "agent", "session": host.session_id}
    return host, pr, pw


async def both_closed(*sessions: Session) -> None:
    for s in sessions:
        await s.close()
    for s in sessions:
        assert s.closed


# -- frames ----------------------------------------------------------------------------


def test_frame_roundtrip_and_header_layout() -> None:
    frame = Frame(FrameType.DATA, 0x01020304, b"xyz", flags=7)
    raw = encode(frame)
    assert raw[:HEADER_SIZE] == bytes([3, 7, 0, 0, 1, 2, 3, 4, 0, 0, 0, 3])
    assert raw[HEADER_SIZE:] == b"xyz"

    async def go() -> list[Frame | None]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw + encode(Frame(FrameType.EOF, 5)))
        reader.feed_eof()
        return [await read_frame(reader), await read_frame(reader), await read_frame(reader)]

    assert arun(go()) == [frame, Frame(FrameType.EOF, 5), None]


def test_encode_rejects_what_cannot_be_sent() -> None:
    encode(Frame(FrameType.DATA, 1, b"a" * MAX_PAYLOAD))
    with pytest.raises(ValueError):
        encode(Frame(FrameType.DATA, 1, b"a" * (MAX_PAYLOAD + 1)))
    with pytest.raises(ValueError):
        encode(Frame(FrameType.DATA, 1 << 32))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (struct.pack("!BBHII", 3, 0, 0, 1, MAX_PAYLOAD + 1), "too large"),
        (struct.pack("!BBHII", 99, 0, 0, 1, 0), "unknown frame type 99"),
        (b"\x03\x00\x00", "truncated frame header"),
        (struct.pack("!BBHII", 3, 0, 0, 1, 10) + b"12345", "truncated frame payload"),
    ],
)
def test_read_frame_errors(raw: bytes, message: str) -> None:
    async def go() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        with pytest.raises(ProtocolError, match=message):
            await read_frame(reader)

    arun(go())


# -- handshake and control ---------------------------------------------------------------


@pytest.mark.timeout(10)
def test_handshake_returns_peer_hello() -> None:
    async def go() -> None:
        host, agent = await session_pair(agent_window=512 * 1024)
        sid = host.session_id
        assert len(sid) == 16 and agent.session_id == sid
        assert host.peer_hello == {"version": 1, "role": "agent", "window": 512 * 1024,
                                   "session": sid}  # fmt: skip
        assert agent.peer_hello == {"version": 1, "role": "host", "window": DEFAULT_WINDOW,
                                    "session": sid}  # fmt: skip
        assert not host.closed and host.close_reason is None
        assert host.control.id == 0
        await both_closed(host, agent)

    arun(go())


@pytest.mark.timeout(10)
def test_control_requests_both_ways() -> None:
    async def go() -> None:
        host, agent = await session_pair()
        seen: list[tuple[str, Any]] = []

        async def agent_side(op: str, msg: dict[str, Any]) -> dict[str, Any]:
            seen.append((op, msg.get("n")))
            if op == "fail":
                raise RequestFailed("no such thing")
            if op == "slow":
                await asyncio.sleep(0.1)
            return {"doubled": 2 * msg.get("n", 0)}

        async def host_side(op: str, msg: dict[str, Any]) -> dict[str, Any]:
            return {"ok": op}

        agent.requests.serve(agent_side)
        host.requests.serve(host_side)
        slow = asyncio.create_task(host.requests.call("slow", n=1))
        assert (await host.requests.call("double", n=21))["doubled"] == 42
        assert (await slow)["doubled"] == 2  # replies need not come in order
        with pytest.raises(RequestFailed, match="no such thing"):
            await host.requests.call("fail")
        assert (await agent.requests.call("ping"))["ok"] == "ping"  # the agent asks too
        with pytest.raises(ValueError):
            await host.requests.call("big", blob="x" * MAX_PAYLOAD)
        await both_closed(host, agent)
        with pytest.raises(SessionClosed):
            await host.requests.call("after-close")

    arun(go())


@pytest.mark.timeout(10)
def test_a_request_without_a_handler_is_refused_not_dropped() -> None:
    async def go() -> None:
        host, agent = await session_pair()
        with pytest.raises(RequestFailed, match="unknown control op 'what'"):
            await host.requests.call("what", timeout=5)
        await both_closed(host, agent)

    arun(go())


@pytest.mark.timeout(10)
def test_start_timeout_when_peer_is_silent() -> None:
    async def go() -> None:
        (hr, hw), (_pr, pw) = await stream_pair()
        host = Session(hr, hw, role="host")
        with pytest.raises(TimeoutError):
            await host.start(0.2)
        assert host.closed
        assert host.close_reason is not None and "HELLO" in host.close_reason
        pw.close()

    arun(go())


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("first", "message"),
    [
        (hello("host"), "peer role 'host'"),
        (hello("agent", version=2), "unsupported version 2"),
        (hello("agent", window=1000), "window 1000"),
        (encode(Frame(FrameType.DATA, 0, b"{}")), "first frame is DATA"),
        (encode(Frame(FrameType.HELLO, 0, b"not json")), "invalid JSON"),
        (encode(Frame(FrameType.HELLO, 0, b"[1]")), "not a JSON object"),
        (b"GET / HTTP/1.1\r\n\r\n", "unknown frame type"),
        (b"", "peer closed the connection"),
    ],
)
def test_bad_hello_fails_start(first: bytes, message: str) -> None:
    async def go() -> None:
        (hr, hw), (_pr, pw) = await stream_pair()
        host = Session(hr, hw, role="host")
        pw.write(first)
        pw.write_eof()
        with pytest.raises(ProtocolError, match=message):
            await host.start(5)
        assert host.closed and host.close_reason is not None
        assert message in host.close_reason
        pw.close()

    arun(go())


# -- channels ----------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("opener", ["host", "agent"])
def test_channel_open_accept_data_eof_close(opener: str) -> None:
    async def go() -> None:
        host, agent = await session_pair()
        a, b = (host, agent) if opener == "host" else (agent, host)
        ch = await a.open_channel({"kind": "exec", "argv": ["sh"]})
        assert ch.id % 2 == (1 if opener == "host" else 0) and ch.id > 0
        peer = await b.accept()
        assert peer.id == ch.id
        assert peer.meta == {"kind": "exec", "argv": ["sh"]}

        await ch.write(b"hello ")
        await ch.write(b"world")
        assert await peer.readexactly(11) == b"hello world"
        await peer.write(b"back")
        assert await ch.read(100) == b"back"

        await ch.write_eof()
        assert await peer.read() == b""
        assert peer.at_eof
        with pytest.raises(BrokenPipeError):
            await ch.write(b"more")
        # The other direction still works after a half close.
        await peer.write(b"still here")
        assert await ch.readexactly(10) == b"still here"

        await peer.write(b"last words")
        await asyncio.sleep(0.05)
        await peer.close()
        await peer.close()  # idempotent
        # Data sent before CLOSE stays readable, then EOF; writes fail.
        assert await ch.readexactly(10) == b"last words"
        assert await ch.read() == b""
        assert ch.at_eof and ch.closed
        with pytest.raises(BrokenPipeError):
            await ch.write(b"x")
        await ch.close()  # no CLOSE is sent back, nothing breaks
        # The session itself is unharmed.
        other = await a.open_channel({"after": "close"})
        await other.send_json("ping")
        assert await (await b.accept()).recv_json() == "ping"
        assert not host.closed and not agent.closed
        await both_closed(host, agent)

    arun(go())


@pytest.mark.timeout(30)
def test_many_channels_concurrently() -> None:
    async def go() -> None:
        host, agent = await session_pair()
        n_channels = 40

        async def echo_server() -> None:
            async def serve(ch: Channel) -> None:
                while data := await ch.read(7000):
                    await ch.write(data.translate(INVERT))
                await ch.write_eof()

            tasks = [asyncio.create_task(serve(await agent.accept())) for _ in range(n_channels)]
            await asyncio.gather(*tasks)

        async def client(i: int) -> bool:
            ch = await host.open_channel({"i": i})
            rnd = random.Random(i)
            payload = rnd.randbytes(rnd.randrange(1, 300_000))

            async def send() -> None:
                for off in range(0, len(payload), 10_000):
                    await ch.write(payload[off : off + 10_000])
                await ch.write_eof()

            sender = asyncio.create_task(send())
            got = bytearray()
            while data := await ch.read():
                got += data
            await sender
            await ch.close()
            assert len(got) == len(payload)
            return (
                hashlib.sha256(got).hexdigest()
                == hashlib.sha256(payload.translate(INVERT)).hexdigest()
            )

        server = asyncio.create_task(echo_server())
        results = await asyncio.gather(*(client(i) for i in range(n_channels)))
        await server
        assert results == [True] * n_channels
        assert host._channels.keys() == {0}  # closed channels are forgotten
        await both_closed(host, agent)

    arun(go())


@pytest.mark.timeout(120)
def test_50mb_transfer_slow_receiver_is_flow_controlled() -> None:
    """The sender is held back by credit, not by the socket: while the receiver
    reads nothing, exactly one window goes out; afterwards the bytes written but
    not yet consumed never exceed the window (measured, not assumed)."""
    total = 50 * 1024 * 1024
    chunk = 16 * 1024

    async def go() -> None:
        host, agent = await session_pair()
        window = host.peer_hello["window"] if host.peer_hello else None
        assert window == DEFAULT_WINDOW
        ch = await host.open_channel({"kind": "bulk"})
        rx = await agent.accept()
        sent = 0
        consumed = 0
        max_in_flight = 0
        src_hash = hashlib.sha256()
        rnd = random.Random(1234)

        async def sender() -> None:
            nonlocal sent, max_in_flight
            while sent < total:
                block = rnd.randbytes(chunk)
                src_hash.update(block)
                await ch.write(block)
                sent += len(block)
                max_in_flight = max(max_in_flight, sent - consumed)
            await ch.write_eof()

        task = asyncio.create_task(sender())
        await asyncio.sleep(0.5)  # the receiver is asleep
        stalled_at = sent
        assert not task.done()
        assert ch.credit_waits >= 1

        dst_hash = hashlib.sha256()
        reads = 0
        while data := await rx.read(48 * 1024):
            consumed += len(data)
            dst_hash.update(data)
            reads += 1
            if reads % 64 == 0:
                await asyncio.sleep(0.002)  # slow consumer
            max_in_flight = max(max_in_flight, sent - consumed)
        await task

        assert stalled_at == window
        assert consumed == sent == total
        assert dst_hash.hexdigest() == src_hash.hexdigest()
        assert max_in_flight <= window + MAX_PAYLOAD
        assert max_in_flight >= window // 2  # the window was actually used
        assert rx.max_buffered <= window
        assert ch.credit_waits > 10
        await both_closed(host, agent)

    arun(go())


# -- ending ------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_session_close_wakes_everybody() -> None:
    async def go() -> None:
        host, agent = await session_pair()
        ch = await host.open_channel({})
        peer = await agent.accept()
        await peer.write(b"pending")
        await asyncio.sleep(0.05)
        await host.open_channel({})
        idle_peer = await agent.accept()
        blocked_read = asyncio.create_task(idle_peer.recv_json())
        blocked_accept = asyncio.create_task(agent.accept())
        await asyncio.sleep(0.01)

        await host.close()
        await host.close()
        assert host.closed and host.close_reason == "closed locally"
        await asyncio.wait_for(agent.wait_closed(), 5)
        assert agent.close_reason == "peer closed the connection"
        assert await blocked_read is None
        with pytest.raises(SessionClosed):
            await blocked_accept
        with pytest.raises(SessionClosed):
            await agent.open_channel({})
        with pytest.raises(SessionClosed):
            await peer.write(b"x")
        # What arrived before the end is still readable, then EOF.
        assert await ch.read() == b"pending"
        assert await ch.read() == b""
        assert await peer.read() == b""
        await peer.close()
        await agent.close()

    arun(go())


@pytest.mark.timeout(10)
def test_writer_blocked_on_credit_sees_session_end() -> None:
    async def go() -> None:
        host, agent = await session_pair()
        ch = await host.open_channel({})
        await agent.accept()
        writer = asyncio.create_task(ch.write(b"x" * (2 * DEFAULT_WINDOW)))
        await asyncio.sleep(0.2)
        assert not writer.done() and ch.credit_waits == 1
        await agent.close()
        with pytest.raises(SessionClosed):
            await asyncio.wait_for(writer, 5)
        await host.close()

    arun(go())


# -- bad peers ---------------------------------------------------------------------------


def _data(channel: int, payload: bytes) -> bytes:
    return encode(Frame(FrameType.DATA, channel, payload))


MALFORMED: list[tuple[str, bytes, str]] = [
    ("oversized", struct.pack("!BBHII", 3, 0, 0, 0, MAX_PAYLOAD + 1), "frame too large"),
    ("unknown-type", struct.pack("!BBHII", 42, 0, 0, 0, 0), "unknown frame type 42"),
    (
        "beyond-credit",
        encode(Frame(FrameType.OPEN, 2, b"{}")) + _data(2, b"a" * MAX_PAYLOAD) * 2 + _data(2, b"!"),
        "DATA beyond credit on channel 2: 1 bytes, 0 allowed",
    ),
    ("data-unknown-channel", _data(4, b"hi"), "DATA on unknown channel 4"),
    ("data-unopened-own-parity", _data(7, b"hi"), "DATA on unknown channel 7"),
    ("eof-unknown-channel", encode(Frame(FrameType.EOF, 9)), "EOF on unknown channel 9"),
    ("open-wrong-parity", encode(Frame(FrameType.OPEN, 3, b"{}")), "wrong parity"),
    (
        "open-duplicate",
        encode(Frame(FrameType.OPEN, 2, b"{}")) + encode(Frame(FrameType.OPEN, 2, b"{}")),
        "duplicate or reused id 2",
    ),
    ("open-bad-meta", encode(Frame(FrameType.OPEN, 2, b"[]")), "not a JSON object"),
    ("second-hello", hello("agent"), "second HELLO"),
    ("bad-credit", encode(Frame(FrameType.CREDIT, 0, b"\x00\x01")), "CREDIT payload"),
    ("close-control", encode(Frame(FrameType.CLOSE, 0)), "CLOSE on the control channel"),
    (
        "data-after-eof",
        encode(Frame(FrameType.EOF, 0)) + _data(0, b"{}"),
        "DATA after EOF on channel 0",
    ),
    ("truncated-header", b"\x03\x00\x00\x00\x00", "truncated frame header"),
    ("truncated-payload", struct.pack("!BBHII", 3, 0, 0, 0, 100) + b"x" * 10, "truncated frame"),
    ("garbage", bytes(range(256)) * 4, "unknown frame type 0"),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("raw", "reason"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_input_ends_session_with_reason(
    raw: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        host, pr, pw = await raw_peer(window=2 * MAX_PAYLOAD)
        ch = await host.open_channel({"x": 1})
        pending_accept = asyncio.create_task(host.accept())
        pending_read = asyncio.create_task(ch.read())
        await asyncio.sleep(0.01)
        pw.write(raw)
        pw.write_eof()  # ends the stream, so truncations are truncations
        await asyncio.wait_for(host.wait_closed(), 5)
        assert host.closed
        assert host.close_reason is not None
        assert host.close_reason.startswith("protocol error: ")
        assert reason in host.close_reason
        assert await pending_read == b""
        assert ch.at_eof
        got = await asyncio.wait_for(asyncio.gather(pending_accept, return_exceptions=True), 5)
        # An OPEN before the error is still delivered; otherwise accept() reports the end.
        assert isinstance(got[0], Channel | SessionClosed)
        assert host._reader_task is not None and host._reader_task.done()
        assert host._reader_task.exception() is None
        # The host closed its side: the raw peer sees the end of the stream.
        rest = await asyncio.wait_for(pr.read(), 5)
        assert encode(Frame(FrameType.OPEN, 1, b'{"x":1}')) in rest
        pw.close()
        await host.close()

    with caplog.at_level(logging.INFO, logger="fcvm.session"):
        arun(go())
    warnings = [r for r in caplog.records if r.name == "fcvm.session" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and reason in warnings[0].getMessage()


@pytest.mark.timeout(10)
def test_exactly_the_window_is_not_a_protocol_error() -> None:
    async def go() -> None:
        host, _pr, pw = await raw_peer(window=2 * MAX_PAYLOAD)
        pw.write(encode(Frame(FrameType.OPEN, 2, b'{"k":"v"}')) + _data(2, b"a" * MAX_PAYLOAD) * 2)
        ch = await host.accept()
        assert ch.meta == {"k": "v"}
        assert await ch.readexactly(2 * MAX_PAYLOAD) == b"a" * 2 * MAX_PAYLOAD
        frame = await read_frame(_pr)  # consuming returned the credit
        assert frame == Frame(FrameType.CREDIT, 2, struct.pack("!I", 2 * MAX_PAYLOAD))
        pw.write(_data(2, b"b" * MAX_PAYLOAD))
        assert await ch.readexactly(MAX_PAYLOAD) == b"b" * MAX_PAYLOAD
        assert not host.closed
        await host.close()
        pw.close()

    arun(go())


@pytest.mark.timeout(10)
def test_in_flight_frames_for_closed_channels_are_ignored() -> None:
    async def go() -> None:
        host, pr, pw = await raw_peer()
        mine = await host.open_channel({})
        await mine.close()
        pw.write(encode(Frame(FrameType.OPEN, 2, b"{}")))
        theirs = await host.accept()
        await theirs.close()
        # The peer had these in flight when our CLOSEs crossed them.
        for cid in (mine.id, theirs.id):
            pw.write(_data(cid, b"late"))
            pw.write(encode(Frame(FrameType.CREDIT, cid, struct.pack("!I", 10))))
            pw.write(encode(Frame(FrameType.EOF, cid)))
            pw.write(encode(Frame(FrameType.CLOSE, cid)))
        pw.write(encode(Frame(FrameType.OPEN, 4, b"{}")))
        pw.write(_data(4, b'"still alive"'))
        assert await (await host.accept()).recv_json() == "still alive"
        assert not host.closed
        frames: list[Frame] = []
        while len(frames) < 3:
            frame = await read_frame(pr)
            assert frame is not None
            frames.append(frame)
        assert frames == [
            Frame(FrameType.OPEN, 1, b"{}"),
            Frame(FrameType.CLOSE, 1),
            Frame(FrameType.CLOSE, 2),
        ]
        await host.close()
        pw.close()

    arun(go())


@pytest.mark.timeout(10)
def test_peer_disconnect_mid_frame_and_mid_write() -> None:
    async def go() -> None:
        host, _pr, pw = await raw_peer()
        ch = await host.open_channel({})
        writer = asyncio.create_task(ch.write(b"z" * (4 * DEFAULT_WINDOW)))
        pw.write(struct.pack("!BBHII", 3, 0, 0, 1, 50) + b"partial")
        await asyncio.sleep(0.05)
        pw.transport.abort()
        await asyncio.wait_for(host.wait_closed(), 5)
        assert host.close_reason is not None
        with pytest.raises(SessionClosed):
            await asyncio.wait_for(writer, 5)
        await host.close()

    arun(go())


# -- quiescing and takeover (snapshots) ---------------------------------------------


async def _relayed_pair() -> tuple[Session, Session, Any]:
    """A host and an agent with a byte relay between them whose host side can be
    swapped for a new connection: what restoring a VM from a snapshot does (the
    guest's transport stays, a new host connects)."""
    (hr, hw), (r1, w1) = await stream_pair()
    (r2, w2), (ar, aw) = await stream_pair()

    class Relay:
        def __init__(self) -> None:
            self.host_side = (r1, w1)
            self.tasks = [asyncio.create_task(self.up()), asyncio.create_task(self.down())]

        async def up(self) -> None:  # host -> agent
            while True:
                data = await self.host_side[0].read(65536)
                if data:
                    w2.write(data)

        async def down(self) -> None:  # agent -> host
            while data := await r2.read(65536):
                self.host_side[1].write(data)

        async def reconnect(self) -> tuple[Any, Any]:
            """Drop the old host connection; return the new host's end."""
            (nr, nw), (mr, mw) = await stream_pair()
            self.host_side = (mr, mw)
            self.tasks[0].cancel()  # it was reading the old connection
            self.tasks[0] = asyncio.create_task(self.up())
            return nr, nw

        def stop(self) -> None:
            for t in self.tasks:
                t.cancel()
            w2.close()

    relay = Relay()
    host = Session(hr, hw, role="host")
    agent = Session(ar, aw, role="agent")
    await asyncio.gather(host.start(5), agent.start(5))
    return host, agent, relay


@pytest.mark.timeout(10)
def test_quiesce_holds_both_ends_until_resume() -> None:
    async def go() -> None:
        host, agent, relay = await _relayed_pair()
        ch = await host.open_channel({})
        peer = await agent.accept()
        await host.quiesce()
        assert host.held and agent.held
        await ch.write(b"from host ")  # held: does not reach the agent
        await peer.write(b"from agent")
        await asyncio.sleep(0.1)
        assert peer._buffered == 0 and ch._buffered == 0
        await host.resume()
        assert await peer.readexactly(10) == b"from host "
        assert await ch.readexactly(10) == b"from agent"
        assert not host.held and not agent.held
        relay.stop()
        await both_closed(host, agent)

    arun(go())


@pytest.mark.timeout(10)
def test_a_new_host_takes_over_a_quiesced_agent_session() -> None:
    async def go() -> None:
        old_host, old_agent, relay = await _relayed_pair()
        ch = await old_host.open_channel({"old": True})
        old_peer = await old_agent.accept()
        await old_host.quiesce()
        await old_peer.write(b"held, never delivered")  # in the snapshot's buffers
        # "Restore": the guest side is the same; a new host connects and says HELLO.
        nr, nw = await relay.reconnect()
        new_host = Session(nr, nw, role="host")
        starting = asyncio.create_task(new_host.start(5))
        await asyncio.wait_for(old_agent.wait_closed(), 5)
        assert old_agent.close_reason == "replaced by a new host session"
        hello = old_agent.takeover_hello
        assert hello is not None and hello["session"] == new_host.session_id
        new_agent = Session(old_agent._reader, old_agent._writer, role="agent", peer_hello=hello)
        await new_agent.start(5)
        await starting
        assert new_agent.session_id == new_host.session_id != old_host.session_id
        # The new session works; nothing of the old one leaks into it.
        fresh = await new_host.open_channel({"new": True})
        got = await new_agent.accept()
        assert got.meta == {"new": True}
        await fresh.write(b"hi")
        assert await got.readexactly(2) == b"hi"
        await got.write(b"back")
        assert await fresh.readexactly(4) == b"back"
        with pytest.raises(SessionClosed):
            await old_peer.write(b"x")
        relay.stop()
        await ch.close()
        await both_closed(new_host, new_agent, old_host)

    arun(go())


@pytest.mark.timeout(10)
def test_an_agent_answering_another_session_is_refused() -> None:
    """What a stale agent (one that did not take the new HELLO) would look like."""

    async def go() -> None:
        (hr, hw), (pr, pw) = await stream_pair()
        host = Session(hr, hw, role="host")
        starting = asyncio.create_task(host.start(5))
        await read_frame(pr)
        pw.write(hello("agent", session="0123456789abcdef"))
        with pytest.raises(ProtocolError, match="a stale session"):
            await starting
        pw.close()

    arun(go())
