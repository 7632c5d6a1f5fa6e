"""Launching a VMM process so that it can never outlive fcvm.

The child gets PR_SET_PDEATHSIG=SIGKILL: if fcvm dies (even by kill -9) the kernel
kills the VMM too, so nothing keeps running; `fcvm gc` / the next command then only
has files and network leftovers to reap.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from fcvm.vmm.base import VmConfig, Vmm

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # Ctrl-C in the terminal goes to fcvm, which stops the VM in order; the VMM
    # itself must not get the SIGINT of the foreground process group.
    os.setpgid(0, 0)


def spawn(argv: Sequence[str], *, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            close_fds=True,
        )


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM, wait up to timeout, then SIGKILL; always reaps. Never raises."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


def binary_version(binary: str, argv: Sequence[str] = ("--version",)) -> str:
    """The first line `binary --version` prints, cached on disk per binary identity
    (path, size, mtime): asking costs tens of milliseconds, and every cached run asks."""
    import json
    import shutil

    from fcvm import paths
    from fcvm.fsutil import atomic_write

    path = shutil.which(binary) or binary
    try:
        st = os.stat(path)
    except OSError:
        return ""
    ident = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    cache = paths.base_dir() / "vmm-versions.json"
    known: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(cache.read_text())
        known = loaded if isinstance(loaded, dict) else {}
    if ident in known:
        return known[ident]
    try:
        out = subprocess.run([path, *argv], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    version = out.strip().splitlines()[0] if out.strip() else ""
    known[ident] = version
    with contextlib.suppress(OSError):
        atomic_write(cache, json.dumps(known))
    return version


_KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\]\s?")
_NOISE = re.compile(
    r"^(R[A-Z0-9]{2}:|Code:|Call Trace|<TASK>|</TASK>|\? |CPU: |Hardware name|"
    r"dump_stack|panic\+|do_exit|do_group_exit|__x64|do_syscall|entry_SYSCALL)"
)


def log_tail(path: Path | None, lines: int = 4) -> str:
    """The informative end of a VMM/console log, for error messages.

    Kernel register dumps and stack traces are dropped: what a user needs is the
    last thing the guest said (an agent error, a panic reason), not the registers.
    """
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    useful = []
    for raw in text.splitlines():
        line = _KERNEL_LINE.sub("", raw).strip()
        if line and not _NOISE.match(line) and not line.startswith("Kernel Offset"):
            useful.append(line)
    return " | ".join(useful[-lines:])


class ProcessVmm(Vmm):
    """A backend whose VMM is one child process, explained by its log files."""

    def __init__(self, config: VmConfig) -> None:
        super().__init__(config)
        self._proc: subprocess.Popen[bytes] | None = None

    def log_files(self) -> list[Path | None]:
        """Logs worth quoting when the VM fails, most specific last."""
        return [self.config.console_log]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def poll(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def failure_detail(self) -> str:
        """What the VMM and the guest console said last, for error messages."""
        return " | ".join(t for t in map(log_tail, self.log_files()) if t)

    def stop(self, timeout: float = 5.0) -> None:
        terminate(self._proc, timeout)
