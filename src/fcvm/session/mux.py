"""Channels multiplexed over one byte stream, with per-channel flow control.

Stdlib only (plus fcvm.errors): the guest agent imports this too.

Rules beyond the wire format (see DESIGN.md, "Session protocol"):

* The first frame each side sends is HELLO on channel 0:
  ``{"version": 1, "role": "host"|"agent", "window": <bytes>}``. ``window`` is the
  receive window the sender grants on every channel (optional; default 256 KiB; at
  least ``2 * MAX_PAYLOAD``).
* Channel ids are allocated in increasing order: the host uses 1, 3, 5, ..., the
  agent 2, 4, 6, .... An OPEN whose id is not above every id the peer opened before
  is a duplicate (or reuse) and a protocol error. Because ids only grow, "an id the
  peer opened earlier, now gone" is known without keeping a list, and frames still
  in flight for a channel closed by either side are ignored.
* CLOSE is not answered: after CLOSE either way the channel is gone for both sides.
  Data received before the CLOSE stays readable.
* DATA after the sender's EOF on that channel is a protocol error.
* The reader loop never waits for the application: it buffers up to the window per
  channel, which the peer cannot exceed without breaking the protocol. It never
  writes either, so it cannot be stuck behind a full transport.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import struct
from typing import Any, Literal

from fcvm.errors import ProtocolError
from fcvm.session.frame import MAX_CHANNEL, MAX_PAYLOAD, Frame, FrameType, encode, read_frame

log = logging.getLogger("fcvm.session")

PROTOCOL_VERSION = 1
DEFAULT_WINDOW = 256 * 1024
MIN_WINDOW = 2 * MAX_PAYLOAD
MAX_WINDOW = 1 << 30
_CREDIT = struct.Struct("!I")

Role = Literal["host", "agent"]


class SessionClosed(Exception):
    """The session has ended; its close_reason says why."""


def _decode_json(payload: bytes, what: str) -> Any:
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"{what}: invalid JSON ({type(e).__name__}: {e})") from None


def _encode_json(obj: Any) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_PAYLOAD:
        raise ValueError(f"JSON message of {len(data)} bytes exceeds {MAX_PAYLOAD}")
    return data


class Channel:
    """One bidirectional, flow-controlled byte stream (or JSON message stream)."""

    def __init__(self, session: Session, channel_id: int, meta: dict[str, Any]) -> None:
        self.id = channel_id
        self.meta = meta
        self._session = session
        # Receiving.
        self._chunks: collections.deque[bytes] = collections.deque()
        self._offset = 0  # consumed bytes of _chunks[0]
        self._buffered = 0  # unread bytes in _chunks
        self._peer_credit = session._window  # bytes the peer may still send us
        self._unreported = 0  # consumed bytes not yet returned as CREDIT
        self._peer_eof = False  # EOF or CLOSE from the peer
        self._readable = asyncio.Event()
        # Sending.
        self._send_credit = session._peer_window if session._peer_hello is not None else 0
        self._credit_changed = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._eof_sent = False
        # Lifetime.
        self._closed_local = False  # we sent CLOSE
        self._closed_remote = False  # the peer sent CLOSE
        #: How often a write had to wait for the peer's credit (diagnostics).
        self.credit_waits = 0
        #: Largest number of received-but-unread bytes seen (diagnostics).
        self.max_buffered = 0

    def __repr__(self) -> str:
        return f"<Channel {self.id} meta={self.meta!r}>"

    # -- state ---------------------------------------------------------------

    @property
    def at_eof(self) -> bool:
        """Nothing more will ever be read: the peer is done and the buffer is empty."""
        return self._buffered == 0 and (
            self._peer_eof or self._closed_local or self._session.closed
        )

    @property
    def closed(self) -> bool:
        return self._closed_local or self._closed_remote or self._session.closed

    # -- reading -------------------------------------------------------------

    async def _wait_readable(self) -> None:
        while self._buffered == 0 and not self.at_eof:
            self._readable.clear()
            await self._readable.wait()

    async def read(self, n: int = -1) -> bytes:
        """Up to n bytes (everything buffered if n < 0); b"" at EOF."""
        if n == 0:
            return b""
        await self._wait_readable()
        if self._buffered == 0:
            return b""
        if n < 0 or n > self._buffered:
            n = self._buffered
        parts: list[bytes] = []
        need = n
        while need:
            head = self._chunks[0]
            avail = len(head) - self._offset
            if avail <= need:
                parts.append(head[self._offset :] if self._offset else head)
                self._chunks.popleft()
                self._offset = 0
                need -= avail
            else:
                parts.append(head[self._offset : self._offset + need])
                self._offset += need
                need = 0
        self._buffered -= n
        self._consumed(n)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def readexactly(self, n: int) -> bytes:
        """Exactly n bytes; asyncio.IncompleteReadError if EOF comes first."""
        parts: list[bytes] = []
        got = 0
        while got < n:
            chunk = await self.read(n - got)
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    async def recv_json(self) -> Any | None:
        """The next JSON message (one DATA frame), or None at EOF."""
        await self._wait_readable()
        if self._buffered == 0:
            return None
        head = self._chunks.popleft()
        if self._offset:
            head = head[self._offset :]
            self._offset = 0
        self._buffered -= len(head)
        self._consumed(len(head))
        return _decode_json(head, f"channel {self.id} message")

    def _consumed(self, n: int) -> None:
        self._unreported += n
        window = self._session._window
        if self._unreported >= window // 2 and not self.closed:
            credit, self._unreported = self._unreported, 0
            self._peer_credit += credit
            self._session._send_nowait(Frame(FrameType.CREDIT, self.id, _CREDIT.pack(credit)))

    # -- writing -------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._session.closed:
            raise SessionClosed(self._session.close_reason or "session closed")
        if self._closed_local or self._closed_remote:
            raise BrokenPipeError(f"channel {self.id} is closed")
        if self._eof_sent:
            raise BrokenPipeError(f"channel {self.id}: write after write_eof()")

    async def _wait_credit(self, need: int) -> None:
        waited = False
        while True:
            self._check_writable()
            if self._send_credit >= need:
                return
            if not waited:
                self.credit_waits += 1
                waited = True
            self._credit_changed.clear()
            await self._credit_changed.wait()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send data, waiting for credit; frames of at most MAX_PAYLOAD bytes.

        Raises SessionClosed if the session ended, BrokenPipeError if the channel
        was closed (either side) or write_eof() was called.
        """
        view = memoryview(data).cast("B")
        async with self._write_lock:
            self._check_writable()
            while view:
                await self._wait_credit(1)
                n = min(len(view), self._send_credit, MAX_PAYLOAD)
                self._send_credit -= n
                self._session._send_nowait(Frame(FrameType.DATA, self.id, bytes(view[:n])))
                view = view[n:]
                await self._session._drain()

    async def send_json(self, obj: Any) -> None:
        """Send one JSON message as one DATA frame (ValueError if over MAX_PAYLOAD)."""
        payload = _encode_json(obj)
        async with self._write_lock:
            await self._wait_credit(len(payload))
            self._send_credit -= len(payload)
            self._session._send_nowait(Frame(FrameType.DATA, self.id, payload))
            await self._session._drain()

    async def write_eof(self) -> None:
        """Tell the peer no more data comes from this side. Idempotent."""
        async with self._write_lock:
            if self._eof_sent or self.closed:
                return
            self._eof_sent = True
            self._session._send_nowait(Frame(FrameType.EOF, self.id))
            await self._session._drain()

    async def close(self) -> None:
        """Send CLOSE: the channel is gone both ways. Idempotent."""
        if self.id == 0:
            raise ValueError("the control channel cannot be closed; close the session")
        if self._closed_local:
            return
        already_gone = self._closed_remote or self._session.closed
        self._closed_local = True
        self._session._forget(self)
        self._wake()
        if not already_gone:
            self._session._send_nowait(Frame(FrameType.CLOSE, self.id))
            with contextlib.suppress(SessionClosed):
                await self._session._drain()

    # -- events from the reader loop (synchronous, never block) ---------------

    def _wake(self) -> None:
        self._readable.set()
        self._credit_changed.set()

    def _on_data(self, payload: bytes) -> None:
        if self._peer_eof:
            raise ProtocolError(f"DATA after EOF on channel {self.id}")
        n = len(payload)
        if n > self._peer_credit:
            raise ProtocolError(
                f"DATA beyond credit on channel {self.id}: {n} bytes, {self._peer_credit} allowed"
            )
        self._peer_credit -= n
        if self._closed_local or n == 0:
            return
        self._chunks.append(payload)
        self._buffered += n
        self.max_buffered = max(self.max_buffered, self._buffered)
        self._readable.set()

    def _on_eof(self) -> None:
        self._peer_eof = True
        self._readable.set()

    def _on_credit(self, n: int) -> None:
        self._send_credit += n
        if self._send_credit > MAX_CHANNEL:
            raise ProtocolError(f"credit overflow on channel {self.id}")
        self._credit_changed.set()

    def _on_close(self) -> None:
        self._closed_remote = True
        self._peer_eof = True
        self._wake()


class Session:
    """One end of a session: channel 0 for control, more channels opened by either side."""

    #: How long close() lets the transport flush what is queued before aborting it.
    close_timeout = 2.0

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        role: Role,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        if role not in ("host", "agent"):
            raise ValueError(f"role must be 'host' or 'agent', not {role!r}")
        if not MIN_WINDOW <= window <= MAX_WINDOW:
            raise ValueError(f"window must be within [{MIN_WINDOW}, {MAX_WINDOW}]")
        self.role: Role = role
        self.peer_role: Role = "agent" if role == "host" else "host"
        self._reader = reader
        self._writer = writer
        self._window = window
        self._peer_window = DEFAULT_WINDOW
        self._peer_hello: dict[str, Any] | None = None
        self._hello_done = asyncio.Event()
        self._closed = False
        self._closed_event = asyncio.Event()
        self.close_reason: str | None = None
        self._drain_lock = asyncio.Lock()
        self._reader_task: asyncio.Task[None] | None = None
        self._started = False
        # Channel ids: host odd, agent even, each side increasing.
        self._next_id = 1 if role == "host" else 2
        self._peer_parity = 0 if role == "host" else 1
        self._max_peer_id = 0
        self._channels: dict[int, Channel] = {}
        self._accept_queue: asyncio.Queue[Channel | None] = asyncio.Queue()
        self.control = Channel(self, 0, {"name": "control"})
        self._channels[0] = self.control

    def __repr__(self) -> str:
        state = f"closed: {self.close_reason}" if self._closed else "open"
        return f"<Session {self.role} {state} channels={len(self._channels)}>"

    # -- lifecycle -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def peer_hello(self) -> dict[str, Any] | None:
        return self._peer_hello

    async def start(self, timeout: float | None = None) -> dict[str, Any]:
        """Send HELLO, start reading, return the peer's HELLO.

        ProtocolError if the peer's HELLO is bad or the session ends first;
        TimeoutError (the session is then closed) if it does not come in time.
        """
        if self._started:
            raise RuntimeError("session already started")
        self._started = True
        if self._closed:
            raise SessionClosed(self.close_reason or "session closed")
        hello = {"version": PROTOCOL_VERSION, "role": self.role, "window": self._window}
        self._send_nowait(Frame(FrameType.HELLO, 0, _encode_json(hello)))
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"fcvm-session-{self.role}-reader"
        )
        try:
            await self._drain()
            await asyncio.wait_for(self._hello_done.wait(), timeout)
        except TimeoutError:
            await self._shutdown("no HELLO from the peer in time")
            raise TimeoutError(f"no HELLO from the {self.peer_role} within {timeout}s") from None
        except SessionClosed:
            pass
        if self._peer_hello is None:
            raise ProtocolError(f"session handshake failed: {self.close_reason}")
        return self._peer_hello

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    async def close(self) -> None:
        """End the session and close the transport. Idempotent."""
        await self._shutdown("closed locally")

    async def _shutdown(self, reason: str) -> None:
        self._end(reason)
        task = self._reader_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        try:
            await asyncio.wait_for(self._writer.wait_closed(), self.close_timeout)
        except TimeoutError:  # the peer does not take our last bytes: drop them
            self._writer.transport.abort()
        except (OSError, RuntimeError):
            pass

    def _end(self, reason: str, *, level: int = logging.INFO) -> None:
        """Mark the session ended (synchronous, idempotent): wake everybody up."""
        if self._closed:
            return
        self._closed = True
        self.close_reason = reason
        log.log(level, "session (%s) ended: %s", self.role, reason)
        for ch in list(self._channels.values()):
            ch._wake()
        self._accept_queue.put_nowait(None)
        self._hello_done.set()
        self._closed_event.set()
        with contextlib.suppress(OSError, RuntimeError):  # transport already gone
            self._writer.close()

    # -- channels ------------------------------------------------------------

    async def open_channel(self, meta: dict[str, Any]) -> Channel:
        """Open a new channel; the peer gets it from accept() with this meta."""
        if self._closed:
            raise SessionClosed(self.close_reason or "session closed")
        if self._peer_hello is None:
            raise RuntimeError("open_channel() before start() completed")
        payload = _encode_json(meta)
        cid = self._next_id
        if cid > MAX_CHANNEL:
            raise ProtocolError("channel ids exhausted")
        self._next_id += 2
        ch = Channel(self, cid, dict(meta))
        self._channels[cid] = ch
        self._send_nowait(Frame(FrameType.OPEN, cid, payload))
        await self._drain()
        return ch

    async def accept(self) -> Channel:
        """The next channel the peer opened; SessionClosed once the session ended
        and every channel opened before that has been accepted."""
        ch = await self._accept_queue.get()
        if ch is None:
            self._accept_queue.put_nowait(None)  # for other acceptors
            raise SessionClosed(self.close_reason or "session closed")
        return ch

    def _forget(self, ch: Channel) -> None:
        self._channels.pop(ch.id, None)

    def _was_open(self, cid: int) -> bool:
        """Was this id ever in use (and so may still see in-flight frames)?"""
        if cid == 0:
            return True
        if cid % 2 == self._peer_parity:
            return cid <= self._max_peer_id
        return cid < self._next_id

    # -- writing -------------------------------------------------------------

    def _send_nowait(self, frame: Frame) -> None:
        """Queue one whole frame on the transport (one write call: never interleaves)."""
        if self._closed:
            raise SessionClosed(self.close_reason or "session closed")
        self._writer.write(encode(frame))

    async def _drain(self) -> None:
        """Wait until the transport accepts more (one waiter at a time)."""
        async with self._drain_lock:
            if self._closed:
                raise SessionClosed(self.close_reason or "session closed")
            try:
                await self._writer.drain()
            except (ConnectionError, OSError) as e:
                self._end(f"connection lost while writing: {e}")
                raise SessionClosed(self.close_reason or "session closed") from e

    # -- reading -------------------------------------------------------------

    async def _read_loop(self) -> None:
        reason = "peer closed the connection"
        level = logging.INFO
        try:
            while not self._closed:
                frame = await read_frame(self._reader)
                if frame is None:
                    break
                self._dispatch(frame)
        except ProtocolError as e:
            reason, level = f"protocol error: {e}", logging.WARNING
        except (ConnectionError, OSError) as e:
            reason, level = f"connection lost: {e!r}", logging.WARNING
        except asyncio.CancelledError:
            reason = "closed locally"
        except Exception as e:  # a bug of ours: end this session, never the process
            log.exception("session (%s) reader failed", self.role)
            reason, level = f"internal error: {e!r}", logging.ERROR
        finally:
            self._end(reason, level=level)

    def _dispatch(self, frame: Frame) -> None:
        if self._peer_hello is None:
            self._on_hello(frame)
            return
        ftype, cid = frame.type, frame.channel
        if ftype is FrameType.HELLO:
            raise ProtocolError("second HELLO")
        if ftype is FrameType.OPEN:
            self._on_open(frame)
            return
        if ftype is FrameType.CREDIT:
            if len(frame.payload) != _CREDIT.size:
                raise ProtocolError(f"CREDIT payload must be 4 bytes, got {len(frame.payload)}")
        elif ftype is FrameType.CLOSE and cid == 0:
            raise ProtocolError("CLOSE on the control channel")
        ch = self._channels.get(cid)
        if ch is None:
            if self._was_open(cid):
                log.debug("ignoring %s on closed channel %d", ftype.name, cid)
                return
            raise ProtocolError(f"{ftype.name} on unknown channel {cid}")
        if ftype is FrameType.DATA:
            ch._on_data(frame.payload)
        elif ftype is FrameType.EOF:
            ch._on_eof()
        elif ftype is FrameType.CREDIT:
            ch._on_credit(_CREDIT.unpack(frame.payload)[0])
        else:  # CLOSE
            self._forget(ch)
            ch._on_close()

    def _on_hello(self, frame: Frame) -> None:
        if frame.type is not FrameType.HELLO or frame.channel != 0:
            raise ProtocolError(
                f"bad HELLO: first frame is {frame.type.name} on channel {frame.channel}"
            )
        hello = _decode_json(frame.payload, "bad HELLO")
        if not isinstance(hello, dict):
            raise ProtocolError("bad HELLO: not a JSON object")
        if hello.get("version") != PROTOCOL_VERSION:
            raise ProtocolError(f"bad HELLO: unsupported version {hello.get('version')!r}")
        if hello.get("role") != self.peer_role:
            raise ProtocolError(
                f"bad HELLO: peer role {hello.get('role')!r}, expected {self.peer_role!r}"
            )
        window = hello.get("window", DEFAULT_WINDOW)
        if (
            not isinstance(window, int)
            or isinstance(window, bool)
            or not MIN_WINDOW <= window <= MAX_WINDOW
        ):
            raise ProtocolError(f"bad HELLO: window {window!r}")
        self._peer_window = window
        self._peer_hello = hello
        for ch in self._channels.values():  # the control channel, so far
            ch._on_credit(window)
        self._hello_done.set()

    def _on_open(self, frame: Frame) -> None:
        cid = frame.channel
        if cid == 0 or cid % 2 != self._peer_parity:
            raise ProtocolError(f"OPEN with id {cid} of the wrong parity for the {self.peer_role}")
        if cid <= self._max_peer_id:
            raise ProtocolError(f"OPEN with duplicate or reused id {cid}")
        meta = _decode_json(frame.payload, f"OPEN {cid}")
        if not isinstance(meta, dict):
            raise ProtocolError(f"OPEN {cid}: metadata is not a JSON object")
        self._max_peer_id = cid
        ch = Channel(self, cid, meta)
        self._channels[cid] = ch
        self._accept_queue.put_nowait(ch)
