"""Starting fcvm runs in the background from VM tests, and waiting for them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from typing import Any

from tests.conftest import fcvm


def start(*args: str) -> subprocess.Popen[str]:
    """`fcvm ARGS...` in the background, output captured as text."""
    return subprocess.Popen([sys.executable, "-m", "fcvm", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def start_run(name: str, image: str, *flags: str, cmd: tuple[str, ...]) -> subprocess.Popen[str]:
    """`fcvm podman run --name NAME FLAGS... IMAGE -- CMD...` in the background."""
    return start("podman", "run", "--name", name, *flags, image, "--", *cmd)


def records() -> dict[str, dict[str, Any]]:
    """`fcvm ls --json` by VM name."""
    return {r["name"]: r for r in json.loads(fcvm("ls", "--json", check=True).stdout)}


def wait_healthy(name: str, proc: subprocess.Popen[str] | None = None, timeout: float = 180
                 ) -> dict[str, Any]:  # fmt: skip
    """The VM's record once `fcvm ls` says it is healthy; fails at once if proc (its
    fcvm process) has exited meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"{name} exited {proc.returncode}: {err}")
        rec = records().get(name)
        if rec and rec["health"] == "healthy":
            return rec
        time.sleep(0.2)
    raise AssertionError(f"{name} never became healthy")


def stop(*procs: subprocess.Popen[str]) -> None:
    """Stop fcvm runs in the background as Ctrl-C at their terminals would: the first
    signal goes to the container (podman's sig-proxy; a `sleep` or `httpd` as PID 1
    ignores it), the second stops the VM at once; SIGKILL after 30 s (the next fcvm
    reaps what that leaves)."""
    for _ in range(2):
        live = [p for p in procs if p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGINT)
        if live:
            time.sleep(0.05)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
