"""A running VM's network helpers, watched: what NetHandle.check() does every ~50 ms.

What the death of each helper breaks, and what is done about it:

- slirp4netns (rootless) carries every packet between the VM's namespace and the
  host: without it the guest has no network at all and published ports refuse. It
  is started again, against the same namespace, within a check or two: its slirp0
  is a persistent TAP fcvm made in the namespace and bridged to br0, so the new one
  attaches to the same device, and the published ports are added again through its
  API. The guest keeps its address, gateway, DNS and the gateway's MAC (slirp's
  are fixed), so it notices nothing but the loss of the connections the old one
  carried (slirp4netns terminates TCP itself): those break, new ones work.
- the namespace holder (both modes) makes the namespaces and holds them until fcvm has
  its own fds on them (netns.py), a moment later. After that, its death breaks
  nothing: the VMM's process and fcvm's fds keep the namespaces (veth0/br0/tap0 and
  slirp0 live on, no packet is lost), and everything that enters them (netns_exec,
  hence the VMM's launch; a slirp4netns restart) goes through fcvm's fds. It is
  reaped and the death is said in one warning; nothing is restarted.
- bridged mode's host veth is no process, but if it is deleted the VM is cut off
  (its peer goes with it): that is reported (cheap: one stat per check).

Every dead helper is reaped at once (no zombie) and our end of its pipe closed. A
slirp4netns replacement is started, and its readiness polled on later checks: a
check never waits for it (the slowest check, the one that forks it, takes ~2-4 ms).
The record and lease name the replacement from its start, so teardown_from_record
(gc after kill -9 of fcvm) ends it too. One that keeps dying (more than MAX_RESTARTS
in RESTART_WINDOW seconds), or whose replacement does not come up within
READY_TIMEOUT, is reported in one line: the Machine then stops the VM with it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fcvm import log
from fcvm.errors import FcvmError
from fcvm.net.proc import start_time

if TYPE_CHECKING:
    from fcvm.net.handle import NetHandle

_log = log.get("fcvm.net")

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
READY_TIMEOUT = 5.0
NAMES = {"slirp": "slirp4netns", "holder": "the namespace holder"}


@dataclass
class Helper:
    """A helper process of the network and our end of the pipe whose EOF ends it."""

    key: str  # its key in the record: "holder" | "slirp"
    proc: subprocess.Popen[bytes]
    keep_fd: int = -1

    @property
    def name(self) -> str:
        return NAMES.get(self.key, self.key)

    def close_fd(self) -> None:
        if self.keep_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.keep_fd)
            self.keep_fd = -1


def describe_exit(code: int) -> str:
    """`killed by SIGKILL` / `exited with 1`, from a Popen returncode."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with {code}"


@dataclass
class _Pending:
    """A slirp4netns replacement started, not yet ready: it writes "1" to ready_fd
    when it is."""

    helper: Helper
    ready_fd: int
    deadline: float
    died: str  # how the one it replaces died, for messages
    got: bytes = b""
    expect: bytes = b"1"


@dataclass
class Watch:
    h: NetHandle
    pending: dict[str, _Pending] = field(default_factory=dict)
    deaths: dict[str, list[float]] = field(default_factory=dict)

    def check(self) -> str | None:
        for pending in list(self.pending.values()):
            dead = self._advance(pending)
            if dead:
                return dead
        for helper in list(self.h._helpers.values()):
            if helper.key in self.pending:
                continue  # (its replacement's exit is _advance's to notice)
            code = helper.proc.poll()  # reaps it: no zombie
            if code is not None:
                dead = self._replace(helper, code)
                if dead:
                    return dead
        return self._links()

    def close(self) -> None:
        """At teardown: stop polling replacements (they are helpers: teardown ends them)."""
        for pending in self.pending.values():
            _close_ready(pending)
        self.pending.clear()

    # -- a helper died ---------------------------------------------------------------

    def _replace(self, old: Helper, code: int) -> str | None:
        died = f"{old.name} (pid {old.proc.pid}) {describe_exit(code)}"
        old.close_fd()
        if old.key == "holder":  # nothing depends on it any more (see above)
            del self.h._helpers[old.key]
            _log.warning("%s; the VM's network does not need it any more", died)
            return None
        now = time.monotonic()
        recent = [t for t in self.deaths.get(old.key, []) if now - t < RESTART_WINDOW]
        recent.append(now)
        self.deaths[old.key] = recent
        if len(recent) > MAX_RESTARTS:
            return f"{died} ({len(recent)} times in {RESTART_WINDOW:.0f} s): not restarted again"
        try:
            pending = self._launch(old.key, died)
        except (OSError, FcvmError) as e:
            return f"{died} and could not be restarted: {e}"
        self.pending[old.key] = pending
        # named in the lease from now on: a teardown from the record ends it too
        self.h._rec[old.key] = [pending.helper.proc.pid, start_time(pending.helper.proc.pid)]
        self._save()
        _log.warning("%s; restarting it", died)
        return None

    def _launch(self, key: str, died: str) -> _Pending:
        from fcvm.net import rootless

        h = self.h
        if key != "slirp" or h._ns is None:
            raise FcvmError(f"no way to restart {NAMES.get(key, key)}")
        start = rootless.launch_slirp(h)
        helper = Helper(key, start.proc, start.exit_fd)
        h._helpers[key] = helper
        return _Pending(helper, start.ready_fd, time.monotonic() + READY_TIMEOUT, died)

    def _advance(self, p: _Pending) -> str | None:
        """Poll a replacement: finish it once ready; a line if it failed."""
        helper = p.helper
        eof = False
        while len(p.got) < len(p.expect):
            ready, _, _ = select.select([p.ready_fd], [], [], 0)
            if not ready:
                break
            chunk = os.read(p.ready_fd, 64)
            if not chunk:
                eof = True
                break
            p.got += chunk
        if p.got.startswith(p.expect):
            return self._ready(p)
        code = helper.proc.poll()
        why = ""
        if code is not None:
            why = f"it {describe_exit(code)}"
        elif eof or (p.got and not p.expect.startswith(p.got)):
            why = "it did not start"
        elif time.monotonic() > p.deadline:
            why = f"it did not start within {READY_TIMEOUT:.0f} s"
        if not why:
            return None
        del self.pending[helper.key]
        from fcvm.net import rootless

        detail = rootless.slirp_log_tail(self.h._rec)
        _close_ready(p)
        return f"{p.died}; restarting it failed: {why}" + (f" ({detail})" if detail else "")

    def _ready(self, p: _Pending) -> str | None:
        from fcvm.net import rootless

        h, helper = self.h, p.helper
        del self.pending[helper.key]
        _close_ready(p)
        try:
            rootless.add_forwards(h)
        except FcvmError as e:
            return f"{p.died}; its replacement failed: {e}"
        self._save()
        _log.warning(
            "%s is running again (pid %d); connections it carried were lost",
            helper.name,
            helper.proc.pid,
        )
        return None

    def _save(self) -> None:
        try:
            self.h.save_lease()
        except FcvmError as e:  # the lease lock unusable: the next save may work
            _log.warning("net: cannot update the lease of VM %s: %s", self.h.vm_id, e)

    # -- links -----------------------------------------------------------------------

    def _links(self) -> str | None:
        veth = self.h._rec.get("veth")
        if veth and not Path(f"/sys/class/net/{veth}").exists():
            return f"its host link {veth} was deleted"
        return None


def _close_ready(p: _Pending) -> None:
    with contextlib.suppress(OSError):
        os.close(p.ready_fd)
