"""`fcvm snapshot serve`: a page server for one snapshot, registered like a VM.

The server has a state record named ``serve-NAME`` (so a second server for NAME is
refused and `fcvm ls` shows it) held for its whole life through the machine layer's
`held_record`, with `reap_server_socket` registered for a killed server. It listens on
``BASE/serve/NAME.sock`` and runs pageserver.PageServer until SIGINT/SIGTERM.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcvm import paths, state
from fcvm.errors import FcvmError, StateError

if TYPE_CHECKING:
    from fcvm.state import VmRecord

MAX_UNIX_PATH = 107


def socket_path(name: str) -> Path:
    return paths.serve_dir() / f"{name}.sock"


def reap_server_socket(record: VmRecord) -> None:
    """state.reap_stale()'s reaper for a page server: its socket lives under
    serve_dir(), outside the VM directory. The path is the snapshot's, not the
    server's: once a new server for the snapshot has its record (made under the lock
    reap_stale holds), the path is that server's (it replaces a stale socket itself)
    and is left alone."""
    sock = record.extra.get("socket")
    if not isinstance(sock, str) or Path(sock).parent != paths.serve_dir():
        return
    for other in state.list_live():
        if other.vm_id != record.vm_id and other.extra.get("socket") == sock:
            return
    with contextlib.suppress(OSError):
        Path(sock).unlink()


def serve_snapshot(
    name: str,
    *,
    block_size: int,
    prefetch: bool = True,
    record_workingset: bool = True,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Serve snapshot `name` until SIGINT/SIGTERM (VMs still attached are filled in
    first; a second signal stops at once). on_ready gets the server's pid, socket, ..."""
    from fcvm.machine import held_record
    from fcvm.snapshot import layout, store, uffd
    from fcvm.snapshot.pageserver import PageServer

    snap, meta = layout.open_snapshot(name)
    if meta.kind in layout.CACHE_KINDS:  # (as `snapshot run` says)
        raise layout.SnapshotError(
            f"snapshot {snap.name!r} is a {meta.kind} snapshot of the image cache, not one "
            "of a VM (fcvm snapshot create makes those)"
        )
    if not snap.memory.is_file():
        raise layout.SnapshotError(f"snapshot {snap.name!r} has no memory file ({snap.memory})")
    # The VMs a user's fcvm starts create their userfaultfd as that user: say now, in
    # one line, what to change if they cannot.
    uffd.probe()
    sock_path = socket_path(snap.name)
    if len(os.fsencode(sock_path)) > MAX_UNIX_PATH:
        raise FcvmError(f"socket path too long for a Unix socket: {sock_path}",
                        hint="use a shorter FCVM_BASE_DIR or snapshot name")  # fmt: skip
    record = state.VmRecord(
        vm_id=state.new_vm_id(),
        name=f"serve-{snap.name}",
        kind="serve",
        status="starting",
        extra={
            "snapshot": snap.name,
            "socket": str(sock_path),
            "block_size": block_size,
            "prefetch": prefetch,
        },
    )
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(held_record(record, reap_server_socket))
        except StateError:
            other = next((r for r in state.list_live() if r.name == record.name), None)
            pid = f" by pid {other.pid}" if other else ""
            raise FcvmError(
                f"snapshot {snap.name!r} is already being served{pid} ({sock_path})"
            ) from None
        # Held in use while served, as by a VM restored from it: `fcvm snapshots rm` and
        # prune leave it alone (the clones this server feeds map its memory file).
        held = store.lease(snap.name)
        if held is None:
            raise layout.SnapshotNotFound(f"snapshot {snap.name!r} is being removed")
        stack.callback(held.release)
        server = PageServer(snap.memory, sock_path, block_size=block_size, prefetch=prefetch,
                            record=record_workingset, workingset_path=snap.workingset)  # fmt: skip
        stack.callback(server.close)
        try:
            server.open()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise FcvmError(
                    f"snapshot {snap.name!r} is already being served ({sock_path})"
                ) from None
            raise FcvmError(f"cannot serve snapshot {snap.name!r}: {exc}") from None
        except ValueError as exc:
            raise layout.SnapshotError(f"snapshot {snap.name!r}: {exc}") from None
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(sig, lambda signum, frame: server.stop())
            stack.callback(signal.signal, sig, previous)
        state.update(record, status="running")
        if on_ready is not None:
            on_ready({"pid": os.getpid(), "socket": str(sock_path), "snapshot": snap.name,
                      "vm_id": record.vm_id, "block_size": block_size,
                      "prefetch": prefetch})  # fmt: skip
        server.serve_forever()
