"""Wire framing of the fcvm session protocol (stdlib only: this runs in the guest too).

A frame is a 12-byte header in network byte order followed by its payload::

    type u8 | flags u8 | reserved u16 | channel u32 | length u32

``length`` is at most :data:`MAX_PAYLOAD`. ``flags`` and ``reserved`` are sent as
zero; readers ignore them so a later version can use them.

Payloads: HELLO, OPEN and JSON-channel messages are compact JSON
(`encode_json`/`decode_json`); CREDIT is one u32, the bytes granted (`CREDIT`).
"""

from __future__ import annotations

import asyncio
import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

from fcvm.errors import ProtocolError

MAX_PAYLOAD = 64 * 1024
HEADER_SIZE = 12
MAX_CHANNEL = 0xFFFFFFFF

_HEADER = struct.Struct("!BBHII")
assert _HEADER.size == HEADER_SIZE
CREDIT = struct.Struct("!I")  # the payload of a CREDIT frame


class FrameType(enum.IntEnum):
    HELLO = 1
    OPEN = 2
    DATA = 3
    EOF = 4
    CLOSE = 5
    CREDIT = 6


@dataclass(frozen=True)
class Frame:
    type: FrameType
    channel: int
    payload: bytes = b""
    flags: int = 0


def encode(frame: Frame) -> bytes:
    """The frame's bytes on the wire. ValueError if it cannot be represented."""
    if len(frame.payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(frame.payload)} bytes exceeds {MAX_PAYLOAD}")
    if not 0 <= frame.channel <= MAX_CHANNEL:
        raise ValueError(f"channel id {frame.channel} out of range")
    if not 0 <= frame.flags <= 0xFF:
        raise ValueError(f"flags {frame.flags} out of range")
    header = _HEADER.pack(int(frame.type), frame.flags, 0, frame.channel, len(frame.payload))
    return header + bytes(frame.payload)


def decode_header(header: bytes) -> tuple[FrameType, int, int, int]:
    """(type, flags, channel, length) of a 12-byte header; ProtocolError if invalid."""
    if len(header) != HEADER_SIZE:
        raise ProtocolError(f"frame header must be {HEADER_SIZE} bytes, got {len(header)}")
    type_, flags, _reserved, channel, length = _HEADER.unpack(header)
    try:
        ftype = FrameType(type_)
    except ValueError:
        raise ProtocolError(f"unknown frame type {type_}") from None
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame too large: {length} bytes (max {MAX_PAYLOAD})")
    return ftype, flags, channel, length


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame, or None on a clean end of stream at a frame boundary.

    ProtocolError for an invalid header or a stream that ends inside a frame.
    """
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ProtocolError(
            f"truncated frame header: stream ended after {len(e.partial)} bytes"
        ) from None
    ftype, flags, channel, length = decode_header(header)
    if length == 0:
        return Frame(ftype, channel, b"", flags)
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError as e:
        raise ProtocolError(
            f"truncated frame payload: got {len(e.partial)} of {length} bytes"
        ) from None
    return Frame(ftype, channel, payload, flags)


def decode_json(payload: bytes, what: str) -> Any:
    """A JSON payload; ProtocolError (naming `what`) if it is not valid JSON."""
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"{what}: invalid JSON ({type(e).__name__}: {e})") from None


def encode_json(obj: Any) -> bytes:
    """Compact JSON for a payload; ValueError if over MAX_PAYLOAD."""
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_PAYLOAD:
        raise ValueError(f"JSON message of {len(data)} bytes exceeds {MAX_PAYLOAD}")
    return data
