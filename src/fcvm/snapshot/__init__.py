"""Snapshots: the on-disk layout (layout.py), the userfaultfd page server
(pageserver.py, uffd.py) and the recorded working sets (workingset.py).

Importing this package registers the stale-record cleanup for page servers (their
socket under paths.serve_dir()), so `state.reap_stale()` removes what a killed
`fcvm snapshot serve` left behind.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from fcvm import paths, state


def _cleanup_stale_server(record: state.VmRecord) -> None:
    if record.kind != "serve":
        return
    sock = record.extra.get("socket")
    if isinstance(sock, str) and Path(sock).parent == paths.serve_dir():
        with contextlib.suppress(OSError):
            Path(sock).unlink()


state.register_cleanup(_cleanup_stale_server)
