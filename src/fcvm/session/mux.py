"""A session: channels multiplexed over one byte stream (the handshake, ids, dispatch).

Stdlib only (plus fcvm.errors): the guest agent imports this too.

Rules beyond the wire format (see DESIGN.md, "Session protocol"); per-channel flow
control is channel.py's:

* The first frame each side sends is HELLO on channel 0:
  ``{"version": 1, "role": "host"|"agent", "window": <bytes>, "session": <id>}``.
  ``window`` is the receive window the sender grants on every channel (optional;
  default 256 KiB; at least ``2 * MAX_PAYLOAD``). The host speaks first and names a
  fresh random session id; the agent answers after reading it and echoes the id, and
  the host refuses any other answer: a session restored from a snapshot can never be
  mistaken for the new one.
* Channel 0 carries control messages (control.py): requests ``{"op", "id", ...}``
  and replies ``{"reply": id, ...}``. Its frames are never held (below).
* Quiescing, for snapshots: the host holds back its own frames, asks ``quiesce``; the
  agent replies and from then on holds its frames too. Both ends are then silent at a
  frame boundary, so a snapshot of the guest holds no half-sent frame either way.
  ``resume`` releases both. A HELLO that reaches a quiesced agent is a new host (a VM
  restored from that snapshot): the old session ends without closing the transport,
  and a new one starts on it (`takeover_hello`).
* Channel ids are allocated in increasing order: the host uses 1, 3, 5, ..., the
  agent 2, 4, 6, .... An OPEN whose id is not above every id the peer opened before
  is a duplicate (or reuse) and a protocol error. Because ids only grow, "an id the
  peer opened earlier, now gone" is known without keeping a list, and frames still
  in flight for a channel closed by either side are ignored.
* CLOSE is not answered: after CLOSE either way the channel is gone for both sides.
  Data received before the CLOSE stays readable.
* The reader loop never waits for the application: each channel buffers up to its
  window. It never writes either, so it cannot be stuck behind a full transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Literal

from fcvm.errors import ProtocolError
from fcvm.session.channel import Channel, SessionClosed
from fcvm.session.control import ControlPort
from fcvm.session.frame import (
    CREDIT,
    MAX_CHANNEL,
    MAX_PAYLOAD,
    Frame,
    FrameType,
    decode_json,
    encode,
    encode_json,
    read_frame,
)

__all__ = ["DEFAULT_WINDOW", "Channel", "Session", "SessionClosed"]

log = logging.getLogger("fcvm.session")

PROTOCOL_VERSION = 1
DEFAULT_WINDOW = 256 * 1024
MIN_WINDOW = 2 * MAX_PAYLOAD
MAX_WINDOW = 1 << 30

Role = Literal["host", "agent"]


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
        peer_hello: dict[str, Any] | None = None,
        hello_extra: dict[str, Any] | None = None,
        on_hello: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
        loss_level: int = logging.WARNING,
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
        # A HELLO already read by the session this one replaces (agent side, takeover).
        self._given_hello = peer_hello
        # More for our HELLO (host: e.g. a restored guest's new identity), and what the
        # agent does with the host's before answering (its result rides on the answer,
        # and every frame after the HELLO is handled only after it: one round trip).
        self._hello_extra = dict(hello_extra or {})
        self._hello_hook = on_hello
        # How a lost connection is logged: a VM's agent vanishing is news; an `fcvm exec`
        # client that exits with frames still unread (a reset) is not.
        self._loss_level = loss_level
        self.session_id = os.urandom(8).hex() if role == "host" else ""
        # Set when a new host's HELLO ended this (quiesced) session: start the next
        # Session on the same transport with it.
        self.takeover_hello: dict[str, Any] | None = None
        self.takeover_at = 0.0  # time.monotonic() when it was read
        self._held: list[bytes] | None = None  # frames kept back while quiesced
        self.ended_quiesced = False
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
        self.requests = ControlPort(self)

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
        """Exchange HELLOs (the host first), start reading, return the peer's HELLO.

        ProtocolError if the peer's HELLO is bad or the session ends first;
        TimeoutError (the session is then closed) if it does not come in time.
        """
        if self._started:
            raise RuntimeError("session already started")
        self._started = True
        if self._closed:
            raise SessionClosed(self.close_reason or "session closed")
        if self.role == "host":
            self._send_hello()
        elif self._given_hello is not None:  # taking over a quiesced session's transport
            try:
                self._accept_hello(self._given_hello)
            except ProtocolError as e:
                self._end(f"protocol error: {e}", level=logging.WARNING)
                raise
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"fcvm-session-{self.role}-reader"
        )
        try:
            await self._drain()
            await asyncio.wait_for(self._hello_done.wait(), timeout)
            if self._peer_hello is not None and self.role == "agent":
                if self._hello_hook is not None:
                    self._hello_extra.update(self._hello_hook(self._peer_hello) or {})
                self._send_hello()  # echoing the host's session id
                await self._drain()
        except TimeoutError:
            await self._shutdown("no HELLO from the peer in time")
            raise TimeoutError(f"no HELLO from the {self.peer_role} within {timeout}s") from None
        except SessionClosed:
            pass
        if self._peer_hello is None:
            raise ProtocolError(f"session handshake failed: {self.close_reason}")
        self.requests.start()
        return self._peer_hello

    def _send_hello(self) -> None:
        hello = {**self._hello_extra, "version": PROTOCOL_VERSION, "role": self.role,
                 "window": self._window, "session": self.session_id}  # fmt: skip
        self._send_nowait(Frame(FrameType.HELLO, 0, encode_json(hello)))

    # -- quiescing (snapshots) ----------------------------------------------

    @property
    def held(self) -> bool:
        return self._held is not None

    def hold(self) -> None:
        """Keep every frame except control messages back until release()."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Send what hold() kept back, in order, and stop holding."""
        held, self._held = self._held, None
        if held and not self._closed:
            self._writer.write(b"".join(held))

    async def quiesce(self, timeout: float = 10.0) -> None:
        """Host: make both ends silent at a frame boundary (before a snapshot)."""
        self.hold()
        try:
            await self.requests.call("quiesce", timeout=timeout)
        except BaseException:
            self.release()
            raise

    async def resume(self) -> None:
        """Host: undo quiesce() on this same session (the snapshotted VM goes on)."""
        await self.requests.notify("resume")
        self.release()

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

    def _end(
        self, reason: str, *, level: int = logging.INFO, keep_transport: bool = False
    ) -> None:
        """Mark the session ended (synchronous, idempotent): wake everybody up."""
        if self._closed:
            return
        self._closed = True
        self.close_reason = reason
        # Ended while quiesced: the snapshot was restored elsewhere (agent side), so
        # its owner waits for a new host rather than giving up.
        self.ended_quiesced = self._held is not None
        self._held = None  # (a quiesced session that ends drops what it held)
        log.log(level, "session (%s) ended: %s", self.role, reason)
        for ch in list(self._channels.values()):
            ch._wake()
        self._accept_queue.put_nowait(None)
        self._hello_done.set()
        self._closed_event.set()
        self.requests.end(reason)
        if not keep_transport:
            with contextlib.suppress(OSError, RuntimeError):  # transport already gone
                self._writer.close()

    # -- channels ------------------------------------------------------------

    async def open_channel(self, meta: dict[str, Any]) -> Channel:
        """Open a new channel; the peer gets it from accept() with this meta."""
        if self._closed:
            raise SessionClosed(self.close_reason or "session closed")
        if self._peer_hello is None:
            raise RuntimeError("open_channel() before start() completed")
        payload = encode_json(meta)
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
        """Queue one whole frame on the transport (one write call: never interleaves),
        or keep it back while the session is held (control frames always go)."""
        if self._closed:
            raise SessionClosed(self.close_reason or "session closed")
        if self._held is not None and frame.channel != 0:
            self._held.append(encode(frame))
            return
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
                if (
                    frame.type is FrameType.HELLO
                    and self._peer_hello is not None
                    and self.role == "agent"
                    and self._held is not None
                ):
                    # A new host on the transport of this quiesced session: the VM was
                    # restored from a snapshot. Hand the transport and its HELLO over.
                    self.takeover_hello = decode_json(frame.payload, "bad HELLO")
                    self.takeover_at = time.monotonic()
                    # (debug: on a restore's path, and a console line is slow in a guest)
                    self._end("replaced by a new host session", level=logging.DEBUG,
                              keep_transport=True)  # fmt: skip
                    return
                self._dispatch(frame)
        except ProtocolError as e:
            reason, level = f"protocol error: {e}", logging.WARNING
        except (ConnectionError, OSError) as e:
            reason, level = f"connection lost: {e!r}", self._loss_level
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
            if len(frame.payload) != CREDIT.size:
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
            ch._on_credit(CREDIT.unpack(frame.payload)[0])
        else:  # CLOSE
            self._forget(ch)
            ch._on_close()

    def _on_hello(self, frame: Frame) -> None:
        if frame.type is not FrameType.HELLO or frame.channel != 0:
            raise ProtocolError(
                f"bad HELLO: first frame is {frame.type.name} on channel {frame.channel}"
            )
        self._accept_hello(decode_json(frame.payload, "bad HELLO"))

    def _accept_hello(self, hello: Any) -> None:
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
        session = hello.get("session", "")
        if not isinstance(session, str) or len(session) > 64:
            raise ProtocolError("bad HELLO: session id")
        if self.role == "host" and session != self.session_id:
            raise ProtocolError(
                f"the agent answered session {session!r}, not ours ({self.session_id}): "
                "a stale session"
            )
        if self.role == "agent":
            self.session_id = session
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
        meta = decode_json(frame.payload, f"OPEN {cid}")
        if not isinstance(meta, dict):
            raise ProtocolError(f"OPEN {cid}: metadata is not a JSON object")
        self._max_peer_id = cid
        ch = Channel(self, cid, meta)
        self._channels[cid] = ch
        self._accept_queue.put_nowait(ch)
