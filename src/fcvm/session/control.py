"""Control messages on channel 0 of a session: small requests with replies.

Stdlib only (the agent imports it). Messages are JSON objects, one per DATA frame:

    request       {"op": NAME, "id": N, ...fields}
    notification  {"op": NAME, ...fields}           (no id: nothing is answered)
    reply         {"reply": N, ...result}  or  {"reply": N, "error": MESSAGE}

Either side may call the other. `quiesce` and `resume` are the session's own
(mux.py: both ends silent at a frame boundary, for a snapshot); every other op goes
to the handler the application registers with `serve()`. Control frames are never
held back by a quiesced session, so these keep working while everything else waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fcvm.errors import ProtocolError
from fcvm.session.channel import SessionClosed

if TYPE_CHECKING:
    from fcvm.session.mux import Session

log = logging.getLogger("fcvm.session")

Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]]


class RequestFailed(Exception):
    """The peer answered a request with an error."""


class ControlPort:
    """Requests over a session's control channel (created by the Session itself)."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._handler: Handler | None = None
        self._task: asyncio.Task[None] | None = None
        self._handling: set[asyncio.Task[None]] = set()

    def serve(self, handler: Handler) -> None:
        """Answer the peer's requests (other than quiesce/resume) with handler(op, msg)."""
        self._handler = handler

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"fcvm-control-{self._session.role}"
        )

    async def call(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Ask the peer; its reply. RequestFailed if it answered an error, SessionClosed
        if the session ends first, TimeoutError after timeout seconds."""
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._session.control.send_json({"op": op, "id": rid, **fields})
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)
        if "error" in reply:
            raise RequestFailed(str(reply["error"]))
        return reply

    async def notify(self, op: str, **fields: Any) -> None:
        await self._session.control.send_json({"op": op, **fields})

    def end(self, reason: str) -> None:
        """The session ended: every call still waiting gets SessionClosed."""
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(SessionClosed(reason))
        self._pending.clear()
        for task in self._handling:
            task.cancel()

    async def _loop(self) -> None:
        try:
            while (msg := await self._session.control.recv_json()) is not None:
                if not isinstance(msg, dict):
                    raise ProtocolError("control message is not a JSON object")
                if "reply" in msg:
                    fut = self._pending.get(msg["reply"])
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                elif isinstance(msg.get("op"), str):
                    self._on_request(msg)
                else:
                    raise ProtocolError(f"control message without op or reply: {msg!r:.80}")
        except ProtocolError as exc:
            self._session._end(f"protocol error: {exc}", level=logging.WARNING)
        except (SessionClosed, ConnectionError, OSError):
            pass

    def _on_request(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "resume":
            self._session.release()
            return
        task = asyncio.get_running_loop().create_task(self._answer(op, msg))
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)

    async def _answer(self, op: str, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        try:
            if op == "quiesce":
                result: dict[str, Any] | None = {}
            elif self._handler is None:
                raise RequestFailed(f"unknown control op {op!r}")
            else:
                result = await self._handler(op, msg)
            reply = {"reply": rid, **(result or {})}
        except Exception as exc:  # the peer gets the reason; this side carries on
            if not isinstance(exc, RequestFailed):
                log.exception("control op %s failed", op)
            reply = {"reply": rid, "error": str(exc) or type(exc).__name__}
        if rid is None:
            return
        if op == "quiesce" and "error" not in reply:
            # Hold everything else *before* answering: the host snapshots the guest as
            # soon as it has the answer, and the guest must already be quiesced in that
            # snapshot (a new host's HELLO to a restore of it is a takeover only then).
            # Control frames, this answer included, are never held.
            self._session.hold()
        with contextlib.suppress(SessionClosed, ConnectionError, OSError):
            await self._session.control.send_json(reply)
