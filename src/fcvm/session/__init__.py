"""The framed, multiplexed, flow-controlled session protocol between host and agent.

Stdlib only (plus fcvm.errors): the guest agent imports this package too.
"""

from __future__ import annotations

from fcvm.session.frame import HEADER_SIZE, MAX_PAYLOAD, Frame, FrameType, encode, read_frame
from fcvm.session.mux import DEFAULT_WINDOW, Channel, Session, SessionClosed

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
