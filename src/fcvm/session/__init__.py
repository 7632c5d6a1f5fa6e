"""The framed, multiplexed, flow-controlled session protocol between host and agent.

frame.py is the wire format, channel.py one flow-controlled channel, mux.py the
session that multiplexes channels over a stream, transport.py the byte streams
(virtio-serial, vsock, Unix sockets). Stdlib only (plus fcvm.errors): the guest
agent imports this package too.
"""

from __future__ import annotations

from fcvm.session.channel import Channel, SessionClosed
from fcvm.session.frame import HEADER_SIZE, MAX_PAYLOAD, Frame, FrameType, encode, read_frame
from fcvm.session.mux import DEFAULT_WINDOW, Session

__all__ = [
    "DEFAULT_WINDOW",
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "Channel",
    "Frame",
    "FrameType",
    "Session",
    "SessionClosed",
    "encode",
    "read_frame",
]
