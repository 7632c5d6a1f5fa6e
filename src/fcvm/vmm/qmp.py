"""A small blocking QMP client: QEMU's JSON control protocol on its Unix socket.

fcvm needs few commands (stop, cont, migrate, migrate-incoming, query-migrate,
getfd, migrate-set-parameters) and only from one thread at a time, so this is a
plain socket with line-delimited JSON. Asynchronous events QEMU interleaves are
skipped while waiting for a command's answer. Errors are one line: `QmpError`.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from fcvm.errors import VmmUnavailable


class QmpError(VmmUnavailable):
    """QEMU refused a command (or its QMP socket is not answering)."""


class Qmp:
    def __init__(self, path: Path, *, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def connect(self, deadline: float) -> None:
        """Connect (retrying while QEMU creates the socket) and negotiate capabilities."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"QEMU's QMP socket {self.path} did not appear") from None
                time.sleep(0.002)
        sock.settimeout(self.timeout)
        self._sock = sock
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting!r:.100}")
        self.execute("qmp_capabilities")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *,
        fds: list[int] | None = None,
    ) -> Any:  # fmt: skip
        """Run one command; its "return" value. QmpError with QEMU's own words."""
        if self._sock is None:
            raise QmpError("QMP is not connected")
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        try:
            if fds:
                socket.send_fds(self._sock, [data], fds)
            else:
                self._sock.sendall(data)
            while True:
                answer = self._read()
                if "return" in answer:
                    return answer["return"]
                if "error" in answer:
                    err = answer["error"]
                    raise QmpError(f"QEMU refused {command}: {err.get('desc', err)}")
                # an event ({"event": ...}): not ours
        except OSError as exc:
            raise QmpError(f"QMP {command}: {exc}") from None

    def _read(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise QmpError("QEMU closed its QMP socket")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        value = json.loads(line)
        if not isinstance(value, dict):
            raise QmpError(f"unexpected QMP message {line!r:.100}")
        return value

    def wait_migration(self, deadline: float) -> dict[str, Any]:
        """Poll query-migrate until completed; QmpError if it failed or took too long."""
        while True:
            info = self.execute("query-migrate")
            status = info.get("status", "") if isinstance(info, dict) else ""
            if status == "completed":
                return info  # type: ignore[no-any-return]
            if status in ("failed", "cancelled"):
                raise QmpError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
            if time.monotonic() > deadline:
                raise QmpError(f"migration did not complete in time (status {status!r})")
            time.sleep(0.001)
