"""Firecracker backend: drives Firecracker's REST API on its Unix socket.

Boot: launch ``firecracker --api-sock <workdir>/fc.sock --id <vm_id>`` (under the
config's netns_exec prefix, dying with fcvm through PR_SET_PDEATHSIG, stdout and
stderr to ``<workdir>/firecracker.log``), wait for the API socket to answer, then
send the requests of `fc_api.boot_requests` in order (logger, boot source, machine
config, drives with the root first, network interface, vsock, entropy, serial,
and last ``InstanceStart``).

Snapshots, the Vmm contract (vmm/base.py) as Firecracker documents it
(docs/snapshotting/snapshot-support.md, API 1.17):

- `pause()` / `resume()`: PATCH /vm Paused / Resumed; each a no-op when the VM is
  already in that state.
- `save_snapshot(files)` (VM paused): PUT /snapshot/create Full. With ``base`` (the
  snapshot this VM was restored from, or its last save) and dirty-page tracking on, a
  Diff into a temporary file next to files.memory, merged onto a copy of base.memory
  (`fc_diff.merge`), so files.memory is always complete; anything that makes the Diff
  unsafe (no tracking, a base this VM's dirty pages are not relative to, a filesystem
  whose holes cannot be trusted, a refused Diff or merge) falls back to Full.
- `restore(files)` instead of `start()`, on a fresh process: PUT /logger, then PUT
  /snapshot/load with the memory file (File: mapped privately, never written) or the
  page server's socket (Uffd, `files.page_server`), this VM's TAP as eth0's
  network override and its own vsock socket as vsock override, ``clock_realtime``,
  ``track_dirty_pages`` (unless ``config.extra["track_dirty_pages"] = "0"``) and
  ``resume_vm: false``: it returns with the VM paused.
- The agent stream of a paused restore: Firecracker's vsock cannot complete a host's
  ``CONNECT`` while the guest is paused (the request waits for the guest, then is reset
  after 2 s), and the restored agent listens again only once it has handled the vsock
  transport reset Firecracker queues at snapshot time. So `open_agent_stream` resumes a
  just-restored VM first and then connects (retrying until the agent listens); the
  caller's `resume()` after it is a no-op.
- Firecracker resets the guest's vsock connections at every snapshot: a VM that goes
  on after `save_snapshot` sees its agent connection closed once resumed, and the host
  must connect again (the agent waits for a new host after a quiesced session).

``config.extra["track_dirty_pages"] = "1"`` boots with dirty page tracking (so the
second save of a booted VM can be a Diff); ``config.extra["vsock_port"]`` overrides the
agent's vsock port (1024). `update_drive` (PATCH /drives) points a drive elsewhere
after boot or load.

The guest agent is reached through Firecracker's vsock Unix socket
(``CONNECT <port>``), see `fcvm.session.transport.connect_firecracker_vsock`.

Call `start()`/`restore()` from a long-lived thread (the main thread):
PR_SET_PDEATHSIG fires when the *thread* that forked the VMM ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fcvm import errors, log
from fcvm.agent.protocol import MAP_VSOCK_PORT_BASE
from fcvm.vmm import fc_api, process
from fcvm.vmm.base import Accel, Availability, Backend, Capabilities, SnapshotFiles, VmConfig
from fcvm.vmm.endpoints import UnixListener
from fcvm.vmm.fc_api import ApiClient, ApiRequest, FirecrackerApiError, SnapshotType

if TYPE_CHECKING:
    from fcvm.vmm.kvm import KvmStatus

_log = log.get("vmm.firecracker")

API_SOCKET = "fc.sock"
VSOCK_SOCKET = "v.sock"
PROCESS_LOG = "firecracker.log"  # the VMM's stdout/stderr
VMM_LOG = "firecracker-vmm.log"  # Firecracker's own logger (PUT /logger)
AGENT_VSOCK_PORT = 1024
MAX_UNIX_PATH = 107
SNAPSHOT_TIMEOUT = 120.0  # writing/reading guest memory can take a while
EXIT_GRACE = 1.0  # after a lost API connection: how long the process may take to exit
FIRECRACKER_ENV = "FCVM_FIRECRACKER"

# A line of Firecracker's logger with show_level (what fc_api.logger_request asks for):
# "<time> [<instance id>:<thread>:<LEVEL>(:<file>:<line>)] <message>".
_FC_LOG_LINE = re.compile(r"^\S+ \[(?P<tags>[^\]]*)\] (?P<msg>.*)$")

VmState = Literal["none", "running", "paused"]
FileId = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


def firecracker_binary() -> Path | None:
    """$FCVM_FIRECRACKER if set (and executable), else `firecracker` on PATH."""
    env = os.environ.get(FIRECRACKER_ENV)
    if env:
        p = Path(env)
        return p if p.is_file() and os.access(p, os.X_OK) else None
    found = shutil.which("firecracker")
    return Path(found) if found else None


def _missing_binary_reason() -> str:
    env = os.environ.get(FIRECRACKER_ENV)
    if env:
        return f"{FIRECRACKER_ENV}={env} is not an executable file"
    return f"no firecracker binary (set {FIRECRACKER_ENV} or put it on PATH)"


def availability(kvm: KvmStatus) -> Availability:
    """Firecracker needs its binary and a /dev/kvm that can run a stock guest kernel."""
    binary = firecracker_binary()
    problems = [] if binary is not None else [_missing_binary_reason()]
    if not kvm.usable:
        problems.append(kvm.reason)
    if problems:
        return Availability(False, "; ".join(problems))
    return Availability(True, f"firecracker at {binary}; {kvm.reason}", "kvm")


def firecracker_errors(path: Path | None, lines: int = 3) -> list[str]:
    """The last ERROR messages of Firecracker's own log file (its logger's format),
    oldest first, repeats dropped."""
    if path is None:
        return []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    found: list[str] = []
    for raw in text.splitlines():
        m = _FC_LOG_LINE.match(raw.strip())
        if m is None or "ERROR" not in m["tags"].split(":"):
            continue
        msg = m["msg"].strip()
        if msg and msg not in found[-lines:]:
            found.append(msg)
    return found[-lines:]


def _file_id(path: Path) -> FileId | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _exit_words(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with {code}"


class FirecrackerVmm(process.ProcessVmm):
    name = "firecracker"

    def __init__(
        self,
        config: VmConfig,
        *,
        binary: Path | None = None,
        api_timeout: float = 5.0,
        vsock_port: int | None = None,
    ) -> None:
        super().__init__(config)
        self._binary = binary
        self.api_timeout = api_timeout
        self.vsock_port = vsock_port or int(config.extra.get("vsock_port", AGENT_VSOCK_PORT))
        self.api_socket = config.workdir / API_SOCKET
        self.vsock_path = config.workdir / VSOCK_SOCKET
        self.log_path = config.workdir / PROCESS_LOG
        self.vmm_log_path = config.workdir / VMM_LOG
        # Dirty page tracking (what Diff snapshots need; KVM write-protects guest pages
        # for it, a cost): off for boots unless config.extra["track_dirty_pages"] is
        # "1", on for restores (whose first save can then be a Diff) unless it is "0".
        wanted = config.extra.get("track_dirty_pages", "")
        self.track_dirty_pages = wanted in ("1", "true")
        self.restore_track_dirty_pages = wanted not in ("0", "false")
        self.log_level: fc_api.LogLevel = (
            "Debug" if os.environ.get("FCVM_LOG", "").lower() == "debug" else "Warning"
        )
        self._api: ApiClient | None = None
        self.sent: list[ApiRequest] = []  # every request sent, in order (for diagnostics)
        self.vm_state: VmState = "none"  # as far as our own requests made it
        self.dirty_tracking = False  # the running VM tracks dirty pages
        # The memory file this VM's dirty pages are counted from (the snapshot it was
        # loaded from, or its last save): only a Diff against that file is complete.
        self._dirty_since: FileId | None = None
        self._mapped: Path | None = None  # the memory file a File restore maps
        self._resume_to_connect = False  # restored, paused, nobody connected yet

    # --- process ---------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(accel="kvm", snapshot=True, restore=True,
                            agent_survives_snapshot=False)  # fmt: skip

    def binary(self) -> Path:
        if self._binary is not None:
            return self._binary
        found = firecracker_binary()
        if found is None:
            raise errors.VmmUnavailable(_missing_binary_reason())
        return found

    def argv(self) -> list[str]:
        return [
            *self.config.netns_exec,
            str(self.binary()),
            "--api-sock",
            str(self.api_socket),
            "--id",
            self.config.vm_id,
        ]

    def _launch(self) -> None:
        if self._proc is not None:
            raise errors.VmmUnavailable(f"Firecracker VM {self.config.vm_id} already started")
        for sock in (self.api_socket, self.vsock_path):
            if len(str(sock)) > MAX_UNIX_PATH:
                raise errors.VmmUnavailable(
                    f"socket path too long for a Unix socket ({len(str(sock))} bytes): {sock}"
                )
        self.config.workdir.mkdir(parents=True, exist_ok=True)
        for stale in (self.api_socket, self.vsock_path):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        argv = self.argv()
        _log.debug("launching %s", " ".join(argv))
        self._proc = process.spawn(argv, log_path=self.log_path)
        try:
            self._wait_for_api()
        except BaseException:
            self.stop(timeout=1.0)
            raise
        self._api = ApiClient(self.api_socket)

    def _wait_for_api(self) -> None:
        """Wait until the API socket accepts connections, the VMM dies, or timeout."""
        deadline = time.monotonic() + self.api_timeout
        while True:
            code = self.poll()
            if code is not None:
                raise errors.VmmUnavailable(
                    f"firecracker {_exit_words(code)} before its API socket appeared",
                    hint=self.failure_detail() or None,
                )
            if self.api_socket.exists():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    try:
                        s.connect(str(self.api_socket))
                        return
                    except OSError:
                        pass
            if time.monotonic() >= deadline:
                raise errors.VmmUnavailable(
                    f"Firecracker API socket {self.api_socket} did not appear within "
                    f"{self.api_timeout:g} s",
                    hint=self.failure_detail() or None,
                )
            time.sleep(0.005)

    def _exit_code(self, grace: float) -> int | None:
        """The process's exit status, waiting up to `grace` for a dying one (the API
        connection closes a moment before the process can be reaped)."""
        deadline = time.monotonic() + grace
        while True:
            code = self.poll()
            if code is not None or time.monotonic() >= deadline:
                return code
            time.sleep(0.01)

    def _send(self, request: ApiRequest, timeout: float | None = None) -> Any:
        if self._api is None:
            raise errors.VmmUnavailable(f"Firecracker VM {self.config.vm_id} is not running")
        self.sent.append(request)
        try:
            return self._api.send(request, timeout=timeout)
        except FirecrackerApiError:
            raise
        except errors.VmmUnavailable as exc:
            code = self._exit_code(EXIT_GRACE)
            if code is not None:
                raise errors.VmmUnavailable(
                    f"firecracker {_exit_words(code)} during {request.describe()}",
                    hint=self.failure_detail() or None,
                ) from exc
            raise

    def _touch(self, path: Path) -> None:
        # Firecracker opens its log and serial output files without creating them.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.close(fd)

    # --- Vmm interface ---------------------------------------------------------

    def start(self) -> None:
        """Launch Firecracker, configure the VM over the API, InstanceStart."""
        requests = fc_api.boot_requests(
            self.config,
            vsock_path=self.vsock_path,
            vsock_port=self.vsock_port,
            log_path=self.vmm_log_path,
            log_level=self.log_level,
            track_dirty_pages=self.track_dirty_pages,
        )
        self._touch(self.vmm_log_path)
        if self.config.console_log is not None:
            self._touch(self.config.console_log)
        self._launch()
        try:
            for req in requests:
                self._send(req)
        except BaseException:
            self.stop(timeout=1.0)
            raise
        self.vm_state = "running"
        self.dirty_tracking = self.track_dirty_pages
        self._dirty_since = None  # a booted VM's pages are all new: its first save is Full

    async def open_agent_stream(
        self, timeout: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The agent's byte stream over Firecracker's vsock. A VM restored (and so
        paused) is resumed first: a paused guest cannot accept the connection."""
        from fcvm.session.transport import connect_firecracker_vsock

        if self._resume_to_connect:
            self._resume_to_connect = False
            self.resume()
        return await connect_firecracker_vsock(str(self.vsock_path), self.vsock_port, timeout)

    def map_endpoint(self, index: int) -> UnixListener:
        """A guest connecting to vsock port P reaches the host's `<vsock uds>_P`."""
        return UnixListener(Path(f"{self.vsock_path}_{MAP_VSOCK_PORT_BASE + index}"))

    def log_files(self) -> list[Path | None]:
        return [self.log_path, self.vmm_log_path, self.config.console_log]

    def failure_detail(self) -> str:
        """Firecracker's own error lines (its log file), then the last words of its
        stdout/stderr and of the guest console."""
        return " | ".join(self._detail_lines())

    def _detail_lines(self, besides: str = "") -> list[str]:
        lines = firecracker_errors(self.vmm_log_path)
        if not lines:
            tail = process.log_tail(self.vmm_log_path, 2)
            lines = [tail] if tail else []
        for path in (self.log_path, self.config.console_log):
            tail = process.log_tail(path)
            if tail:
                lines.append(tail)
        if besides:  # what the error message already says need not be said twice
            lines = [x for x in lines if besides not in x and x not in besides]
        return lines

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; reaps. Idempotent, never raises.

        (SendCtrlAltDel needs an ACPI power button / i8042 handling in the guest;
        the root disk is read-only and container state is in guest RAM, so a kill
        loses nothing.)"""
        if self._api is not None:
            with contextlib.suppress(Exception):
                self._api.close()
            self._api = None
        super().stop(timeout)
        self.vm_state = "none"
        self._resume_to_connect = False

    # --- snapshots -------------------------------------------------------------

    def pause(self) -> None:
        """PATCH /vm Paused (a no-op for a VM already paused)."""
        if self.vm_state == "paused":
            return
        self._send(fc_api.vm_state_request("Paused"))
        self.vm_state = "paused"

    def resume(self) -> None:
        """PATCH /vm Resumed (a no-op for a running VM)."""
        if self.vm_state == "running":
            return
        self._send(fc_api.vm_state_request("Resumed"))
        self.vm_state = "running"
        self._resume_to_connect = False

    def snapshot_create(
        self, mem_path: Path, state_path: Path, snapshot_type: SnapshotType = "Full"
    ) -> None:
        """PUT /snapshot/create: write the (paused) VM's memory and device state."""
        self._send(
            fc_api.snapshot_create_request(mem_path, state_path, snapshot_type),
            timeout=SNAPSHOT_TIMEOUT,
        )

    def save_snapshot(self, files: SnapshotFiles, *, base: SnapshotFiles | None = None) -> None:
        """Write the paused VM's memory and state into files (see the module docstring:
        a Diff merged onto base's memory where that is provably complete, else Full)."""
        guarded = [(self._mapped, "it maps"), (base.memory if base else None, "of its base")]
        for other, what in guarded:
            if other is not None and _same_file(files.memory, other):
                raise errors.VmmUnavailable(
                    f"will not write a snapshot over {files.memory}: it is the memory file "
                    f"{what} (a snapshot's files are never written)"
                )
        why_full = self._why_not_diff(files, base)
        if why_full is None:
            assert base is not None
            why_full = self._save_diff(files, base)
            if why_full is None:
                return
        _log.info("snapshot %s: Full (%s)", files.memory, why_full)
        files.memory.unlink(missing_ok=True)  # (a failed merge's leftovers)
        self._dirty_since = None  # (unknown, should the Full fail)
        self._create_or_explain(files.memory, files.state, "Full")
        self._dirty_since = _file_id(files.memory) if self.dirty_tracking else None

    def _why_not_diff(self, files: SnapshotFiles, base: SnapshotFiles | None) -> str | None:
        """Why a Diff onto base would not be complete (None: it would be)."""
        from fcvm.vmm import fc_diff

        if base is None:
            return "no base snapshot given"
        if not self.dirty_tracking:
            return "this VM does not track dirty pages"
        if self._dirty_since is None or _file_id(base.memory) != self._dirty_since:
            return f"this VM's dirty pages are not counted from {base.memory}"
        return fc_diff.holes_unreliable(files.memory.parent)

    def _save_diff(self, files: SnapshotFiles, base: SnapshotFiles) -> str | None:
        """Diff into a temporary file, merged onto a copy of base.memory into
        files.memory. None when done, else why a Full snapshot must be taken instead
        (the VM is still paused, so it can be)."""
        from fcvm.vmm import fc_diff

        diff = files.memory.with_name(f".{files.memory.name}.diff-{os.getpid()}")
        diff.unlink(missing_ok=True)  # Firecracker would write a layer onto an old one
        try:
            try:
                self.snapshot_create(diff, files.state, "Diff")
            except FirecrackerApiError as exc:
                self._dirty_since = None  # what the bitmap now counts from is unknown
                return f"Firecracker refused the Diff: {exc.fault_message}"
            # The dirty bitmap now counts from this Diff: until the merge is done, no
            # file holds that state.
            self._dirty_since = None
            try:
                stats = fc_diff.merge(base.memory, diff, files.memory)
            except (fc_diff.MergeError, OSError) as exc:
                return f"the Diff could not be merged onto {base.memory}: {exc}"
        finally:
            diff.unlink(missing_ok=True)
        self._dirty_since = _file_id(files.memory)
        _log.info("snapshot %s: Diff onto %s, %d extents, %d bytes (%s)", files.memory,
                  base.memory, stats.extents, stats.data_bytes,
                  "reflink" if stats.reflinked else "copied")  # fmt: skip
        return None

    def _create_or_explain(self, mem: Path, state: Path, kind: SnapshotType) -> None:
        try:
            self.snapshot_create(mem, state, kind)
        except FirecrackerApiError as exc:
            raise errors.VmmUnavailable(
                f"Firecracker could not create the snapshot: {exc.fault_message}",
                hint=" | ".join(self._detail_lines(besides=exc.fault_message)) or None,
            ) from exc

    def restore(self, files: SnapshotFiles) -> None:
        """Launch Firecracker and load the snapshot (see the module docstring); returns
        with the VM paused. On failure the process is gone and one line says why,
        quoting Firecracker."""
        uffd = files.page_server is not None
        track = self.restore_track_dirty_pages
        load = fc_api.snapshot_load_request(
            files.state,
            files.page_server if files.page_server is not None else files.memory,
            mem_backend_type="Uffd" if uffd else "File",
            resume_vm=False,
            track_dirty_pages=track,
            network_overrides=fc_api.overrides_for(self.config.net),
            vsock_override=self.vsock_path,
            clock_realtime=True,
        )
        memory_id = _file_id(files.memory)  # before the load: what the pages count from
        self._touch(self.vmm_log_path)
        self._launch()
        try:
            self._send(fc_api.logger_request(self.vmm_log_path, self.log_level))
            self._send(load, timeout=SNAPSHOT_TIMEOUT)
        except FirecrackerApiError as exc:
            self.stop(timeout=1.0)  # Firecracker ends itself after a failed load, too
            raise errors.VmmUnavailable(
                f"Firecracker could not load the snapshot: {exc.fault_message}",
                hint=" | ".join(self._detail_lines(besides=exc.fault_message)) or None,
            ) from exc
        except errors.VmmUnavailable as exc:
            self.stop(timeout=1.0)
            raise errors.VmmUnavailable(
                f"Firecracker could not load the snapshot: {exc}", hint=exc.hint
            ) from exc
        except BaseException:
            self.stop(timeout=1.0)
            raise
        self.vm_state = "paused"
        self._resume_to_connect = True
        self.dirty_tracking = track
        self._dirty_since = memory_id if track else None
        self._mapped = None if uffd else files.memory

    def update_drive(self, drive_id: str, path: Path) -> None:
        """Point a drive at another backing file (a clone's reflinked disk)."""
        self._send(fc_api.drive_update_request(drive_id, path))

    def instance_info(self) -> dict[str, Any]:
        info = self._send(fc_api.instance_info_request())
        return info if isinstance(info, dict) else {}


def _create(config: VmConfig, accel: Accel) -> FirecrackerVmm:
    return FirecrackerVmm(config)


def _version() -> str:
    binary = firecracker_binary()
    return process.binary_version(str(binary)) if binary else ""


BACKEND = Backend(name="firecracker", availability=availability, create=_create,
                  version=_version)  # fmt: skip
