"""Reaching a VM that another fcvm process owns: a session through its control socket.

The owning process (its Machine) serves `<vm dir>/exec.sock` (relay.py); a client
speaks the session protocol there as if to the agent itself.
"""

from __future__ import annotations

from fcvm import paths, state
from fcvm.errors import GuestError
from fcvm.session import Session

CONNECT_TIMEOUT = 5.0


async def connect(record: state.VmRecord, timeout: float = CONNECT_TIMEOUT) -> Session:
    """A started session with the VM of `record`; GuestError if it cannot be reached."""
    from fcvm.session.transport import connect_unix

    try:
        reader, writer = await connect_unix(str(paths.exec_socket(record.vm_id)), timeout)
        session = Session(reader, writer, role="host")
        await session.start(timeout=timeout)
    except (TimeoutError, OSError, ConnectionError) as exc:
        raise GuestError(f"cannot reach VM {record.name!r} (it may be stopping): {exc}") from None
    return session
