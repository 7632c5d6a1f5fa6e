"""One channel of a session: a flow-controlled byte (or JSON message) stream.

Stdlib only (plus fcvm.errors): the guest agent imports this too.

A Channel buffers what the peer sent, up to the receive window this side granted
(the peer cannot send more without breaking the protocol), and returns consumed
bytes to the peer as CREDIT once half a window has been read. Writes wait for the
peer's credit and go out in frames of at most MAX_PAYLOAD. DATA after the sender's
EOF, or beyond its credit, is a protocol error. The Session (mux.py) owns the
transport and the reader loop and calls the `_on_*` methods, which never block.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import TYPE_CHECKING, Any

from fcvm.errors import ProtocolError
from fcvm.session.frame import (
    CREDIT,
    MAX_CHANNEL,
    MAX_PAYLOAD,
    Frame,
    FrameType,
    decode_json,
    encode_json,
)

if TYPE_CHECKING:
    from fcvm.session.mux import Session


class SessionClosed(Exception):
    """The session has ended; its close_reason says why."""


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
        return decode_json(head, f"channel {self.id} message")

    def _consumed(self, n: int) -> None:
        self._unreported += n
        window = self._session._window
        if self._unreported >= window // 2 and not self.closed:
            credit, self._unreported = self._unreported, 0
            self._peer_credit += credit
            self._session._send_nowait(Frame(FrameType.CREDIT, self.id, CREDIT.pack(credit)))

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
        payload = encode_json(obj)
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
