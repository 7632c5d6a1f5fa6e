"""Launching a VMM process so that it can never outlive fcvm.

The child gets PR_SET_PDEATHSIG=SIGKILL: if fcvm dies (even by kill -9) the kernel
kills the VMM too, so nothing keeps running; `fcvm gc` / the next command then only
has files and network leftovers to reap.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from fcvm.children import die_with_parent
from fcvm.vmm.base import VmConfig, Vmm


def _die_with_parent() -> None:
    die_with_parent(signal.SIGKILL)
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


# -- why did the VM die? ---------------------------------------------------------------
#
# When a VMM ends, fcvm's one line quotes what explains it, in this order:
#   1. the guest's own account: its agent failed (a traceback's exception), its init
#      failed, or its kernel panicked (PID 1 dying is the agent's death, decoded);
#   2. the VMM's own error (QEMU/Firecracker log lines that are not warnings);
#   3. a signal: the VMM killed (nobody logs a SIGKILL), or QEMU's own "terminating
#      on signal N from pid P" for the ones it catches;
#   4. the guest powered itself off or rebooted (which ends a -no-reboot VM);
#   5. the agent's last error line;
#   6. else the last lines that are not known-benign: never a line every boot prints.

TAIL_BYTES = 256 << 10  # of each log: a guest can print a lot; the end is what matters

_KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\]\s?")
_NOISE = re.compile(
    r"^(R[A-Z0-9]{2}:|Code:|Call Trace|<TASK>|</TASK>|\? |CPU: |Hardware name|"
    r"dump_stack|panic\+|do_exit|do_group_exit|__x64|do_syscall|entry_SYSCALL|Kernel Offset|"
    r"[a-z_][\w.]*\+0x[0-9a-f]+/0x[0-9a-f]+)"  # a stack frame: write_sysrq_trigger+0x24/0x40
)
# Lines every normal boot prints, which therefore explain nothing.
_BENIGN = re.compile(
    r"^(PCI: Fatal: No config space access function found"  # microvm has no PCI bus
    r"|hrtimer: interrupt took \d+ ns"  # an emulated CPU is slow, not broken
    r"|fcvm-agent \[[^\]]*\] (INFO|DEBUG) "  # the agent's progress
    r")"
)
_AGENT = re.compile(r"^fcvm-agent \[[^\]]*\] (?P<level>[A-Z]+) (?P<msg>.*)$")
_AGENT_WRAPPER = re.compile(r"^fcvm-agent: (?P<what>cannot start|crashed): (?P<msg>.*)$")
# the initrd's fatal line (not its warnings, fcvm.debug=1 timings or fcvm.break=1 note)
_INIT_FATAL = re.compile(r"^fcvm-init: (?!warning:|\[|fcvm\.break)(?P<msg>.*)$")
_PANIC = re.compile(r"Kernel panic - not syncing: (?P<reason>.*?)\s*$")
_KILL_INIT = re.compile(r"^Attempted to kill init! exitcode=0x(?P<status>[0-9a-fA-F]+)")
_PID1_COMM = re.compile(r"^CPU: \d+ PID: 1 Comm: (?P<comm>\S+)")
# What an oops says went wrong (its "Oops: 0000 [#1] SMP" line, next, says less).
_OOPS = re.compile(
    r"^(BUG: |general protection fault|kernel BUG at|divide error|invalid opcode|"
    r"unable to handle|stack segment|double fault)"
)
_POWER_OFF = re.compile(r"^(reboot: Power down|sysrq: Power Off)")
_REBOOT = re.compile(r"^(reboot: Restarting system|sysrq: Resetting)")
_VMM_TERMINATED = re.compile(
    r"terminating on signal (?P<sig>\d+)(?: from pid (?P<pid>\d+)(?: \((?P<comm>.*)\))?)?"
)
_VMM_NOT_ERROR = re.compile(
    r"(\bwarning\b|:WARN\b|:INFO\b|:DEBUG\b|:TRACE\b|Running Firecracker)", re.IGNORECASE
)


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _lines(text: str) -> list[str]:
    """Console lines without the kernel's timestamps, blank ones dropped."""
    out = []
    for raw in text.splitlines():
        line = _KERNEL_LINE.sub("", raw).strip()
        if line:
            out.append(line)
    return out


def _raw_lines(text: str) -> list[str]:
    """Like _lines but keeping indentation (tracebacks need it)."""
    return [_KERNEL_LINE.sub("", raw).rstrip() for raw in text.splitlines() if raw.strip()]


def _exception(lines: list[str]) -> str:
    """The exception of the last Python traceback in lines ("" if none): the first
    unindented line after its frames, e.g. `RuntimeError: boom`."""
    tracebacks = [i for i, x in enumerate(lines) if x.startswith("Traceback (most recent")]
    start = tracebacks[-1] if tracebacks else -1
    if start < 0:
        return ""
    for line in lines[start + 1 :]:
        if line[:1].isspace() or line.startswith(("Traceback", "During handling", "The above")):
            continue
        return line.strip()
    return ""


def _agent_failure(raw: list[str]) -> str:
    """The agent's own report of its failure, if any."""
    for i in range(len(raw) - 1, -1, -1):
        line = raw[i].strip()
        m = _AGENT.match(line)
        if m and m["level"] in ("ERROR", "CRITICAL") and m["msg"] == "agent failed":
            exc = _exception(raw[i + 1 :])
            return f"the guest agent failed: {exc}" if exc else "the guest agent failed"
        m2 = _AGENT_WRAPPER.match(line)
        if m2:
            what = "could not start" if m2["what"] == "cannot start" else "crashed"
            return f"the guest agent {what}: {m2['msg']}"
        m3 = _INIT_FATAL.match(line)
        if m3:
            return f"the guest's init failed: {m3['msg']}"
    return ""


def _panic(raw: list[str]) -> str:
    """A guest kernel panic, said in one clause; the death of PID 1 named as such."""
    lines = [x.strip() for x in raw]
    at = max((i for i, x in enumerate(lines) if _PANIC.search(x)), default=-1)
    if at < 0:
        return ""
    m = _PANIC.search(lines[at])
    assert m is not None
    reason = m["reason"]
    kill_init = _KILL_INIT.match(reason)
    if kill_init:
        status = int(kill_init["status"], 16)
        comm = next((c["comm"] for x in lines[at + 1 : at + 4] if (c := _PID1_COMM.match(x))), "")
        agent_seen = any(x.startswith("fcvm-agent") for x in lines[:at])
        is_agent = comm == "fcvm-agent" or (not comm and agent_seen)
        who = "the guest agent (PID 1)" if is_agent else "the guest's init (PID 1)"
        sig = status & 0x7F
        how = f"died of {_signame(sig)}" if sig else f"exited with {(status >> 8) & 0xFF}"
        exc = _exception(raw[:at])
        return f"{who} {how}" + (f" ({exc})" if exc else "")
    if reason.startswith(("Fatal exception", "Oops")):
        before = lines[max(0, at - 80) : at]
        oops = next((x for x in reversed(before) if _OOPS.match(x)), "")
        oops = oops or next((x for x in reversed(before) if x.startswith("Oops")), "")
        if oops:
            return f"the guest kernel panicked: {reason} ({oops})"
    return f"the guest kernel panicked: {reason}"


def guest_cause(console: str) -> str:
    """What the guest's console says killed it: its agent or init failing, or a kernel
    panic (the agent's failure first: a PID 1 that fails may panic the kernel next)."""
    raw = _raw_lines(console)
    return _agent_failure(raw) or _panic(raw)


def vmm_cause(log: str) -> str:
    """The VMM's own last error line (not a warning; not the signal line)."""
    for line in reversed(_lines(log)):
        if _VMM_TERMINATED.search(line) or _VMM_NOT_ERROR.search(line):
            continue
        return line[:300]
    return ""


def signal_cause(name: str, code: int | None, logs: Sequence[str]) -> str:
    """A signal ended the VMM: the one it logged catching, or the one it died of."""
    for log in logs:
        for line in reversed(_lines(log)):
            m = _VMM_TERMINATED.search(line)
            if m:
                who = f" from pid {m['pid']}" if m["pid"] else ""
                comm = f" ({m['comm']})" if m["comm"] else ""
                return f"{name} was stopped by {_signame(int(m['sig']))}{who}{comm}"
    if code is not None and code < 0:
        return f"{name} was killed by {_signame(-code)}"
    return ""


def _guest_stop(console: str) -> str:
    for line in reversed(_lines(console)):
        if _POWER_OFF.match(line):
            return "the guest powered itself off"
        if _REBOOT.match(line):
            return "the guest rebooted, which ends its VM"
    return ""


def _agent_error(console: str) -> str:
    for line in reversed(_lines(console)):
        m = _AGENT.match(line)
        if m and m["level"] in ("ERROR", "CRITICAL"):
            return f"the guest agent said: {m['msg']}"[:300]
    return ""


def informative_tail(text: str, lines: int = 3) -> str:
    """The last lines of a log that are neither register/stack noise nor known-benign."""
    useful = [x for x in _lines(text) if not _NOISE.match(x) and not _BENIGN.match(x)]
    return " | ".join(useful[-lines:])


def explain(name: str, code: int | None, vmm_logs: Sequence[str], console: str) -> str:
    """One clause saying why the VM died (or is not answering): see the order above.
    name is the VMM's ("qemu"), code its exit status (None: still running)."""
    return (
        guest_cause(console)
        or next((c for c in map(vmm_cause, vmm_logs) if c), "")
        or signal_cause(name, code, vmm_logs)
        or (_guest_stop(console) if code is not None else "")
        or _agent_error(console)
        or informative_tail(console)
        or " | ".join(t for t in (informative_tail(v, 2) for v in vmm_logs) if t)
    )


def read_tail(path: Path | None, limit: int = TAIL_BYTES) -> str:
    """The last `limit` bytes of a log file as text ("" if unreadable)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return ""
    if len(data) >= limit:  # started mid-line: drop the fragment
        data = data.partition(b"\n")[2]
    return data.decode(errors="replace")


def log_tail(path: Path | None, lines: int = 3) -> str:
    """The informative end of a log file (no register dumps, no known-benign lines)."""
    return informative_tail(read_tail(path), lines)


class ProcessVmm(Vmm):
    """A backend whose VMM is one child process, explained by its log files."""

    def __init__(self, config: VmConfig) -> None:
        super().__init__(config)
        self._proc: subprocess.Popen[bytes] | None = None

    def log_files(self) -> list[Path | None]:
        """Logs worth quoting when the VM fails: the VMM's own, and the guest console."""
        return [self.config.console_log]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def poll(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def failure_detail(self) -> str:
        """Why the VM died (or does not answer), in one clause: see explain()."""
        console = self.config.console_log
        vmm_logs = [read_tail(p) for p in self.log_files() if p is not None and p != console]
        return explain(self.name, self.poll(), vmm_logs, read_tail(console))

    def stop(self, timeout: float = 5.0) -> None:
        terminate(self._proc, timeout)
