"""Host helpers for the network code: tools, /proc settings, identifying and ending helpers.

A helper process (namespace holder, slirp4netns) is identified by (pid, start time
from /proc/PID/stat) so that a record read after kill -9 of fcvm never makes us
signal an unrelated process that reused the pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from fcvm import log
from fcvm.errors import FcvmError
from fcvm.state import process_start_time

_log = log.get("fcvm.net")


start_time = process_start_time  # one /proc/PID/stat reader for all of fcvm


def alive(pid: int | None, start: int | None) -> bool:
    return bool(pid) and start is not None and start_time(int(pid or 0)) == start


def end_process(pid: int | None, start: int | None, timeout: float = 2.0) -> None:
    """SIGTERM, then SIGKILL, the process (pid, start) if it is still that process.

    Never raises. Waits until it is gone (or a zombie someone else must reap)."""
    if not pid or start is None or not alive(pid, start):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid, start):
            return
        time.sleep(0.01)
    try:
        if alive(pid, start):
            os.kill(pid, signal.SIGKILL)
    except OSError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid, start) and time.monotonic() < deadline:
        time.sleep(0.01)


def end_child(p: subprocess.Popen[bytes] | None, timeout: float = 2.0) -> None:
    """End and reap a child we started. Never raises."""
    if p is None or p.returncode is not None:
        return
    try:
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        _log.debug("could not end pid %s: %s", p.pid, e)


def need_tool(name: str, what: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FcvmError(f"{name} not found: it is needed for {what}", hint=_install_hint(name))
    return path


def _install_hint(name: str) -> str:
    pkg = {"ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux"}.get(name, name)
    if name.startswith("iptables"):
        pkg = "iptables"
    return f"install it, e.g. apt-get install {pkg}"


def run(cmd: list[str], what: str, *, input: str | None = None, timeout: float = 20) -> str:
    """Run a tool; on failure raise one-line FcvmError naming `what` and the tool's words."""
    try:
        r = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise FcvmError(f"{what}: {cmd[0]} not found", hint=_install_hint(cmd[0])) from None
    except subprocess.TimeoutExpired:
        raise FcvmError(f"{what}: {cmd[0]} did not finish in {timeout:.0f} s") from None
    if r.returncode != 0:
        msg = " ".join((r.stderr or r.stdout).split()) or f"exit status {r.returncode}"
        raise FcvmError(f"{what}: {msg[:300]}")
    return r.stdout


def try_run(cmd: list[str], *, input: str | None = None, timeout: float = 20) -> bool:
    """Best effort (teardown): True if the command ran and succeeded."""
    try:
        r = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        _log.debug("%s failed: %s", cmd[0], e)
        return False
    if r.returncode != 0:
        _log.debug("%s: %s", " ".join(cmd), r.stderr.strip())
    return r.returncode == 0


def read_setting(path: str) -> str | None:
    """A small host file's stripped text (a /proc setting, resolv.conf); None if unreadable."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None
