"""Firecracker backend: drives Firecracker's REST API on its Unix socket.

Boot: launch ``firecracker --api-sock <workdir>/fc.sock --id <vm_id>`` (under the
config's netns_exec prefix, dying with fcvm through PR_SET_PDEATHSIG, stdout and
stderr to ``<workdir>/firecracker.log``), wait for the API socket to answer, then
send the requests of `fc_api.boot_requests` in order (logger, boot source, machine
config, drives with the root first, network interface, vsock, entropy, serial,
and last ``InstanceStart``).

Snapshots (used by fcvm.snapshot): `pause`/`resume` (PATCH /vm), `snapshot_create`
(Full or Diff), and `snapshot_load` in place of `start` on a fresh process
(memory from a File or from a userfaultfd page server over Uffd, with the clone's
own TAP and vsock path as overrides), `update_drive` (PATCH /drives, a clone's
reflinked disk). ``config.extra["track_dirty_pages"] = "1"`` boots with dirty page
tracking for Diff snapshots; ``config.extra["vsock_port"]`` overrides the agent's
vsock port (1024).

The guest agent is reached through Firecracker's vsock Unix socket
(``CONNECT <port>``), see `fcvm.session.transport.connect_firecracker_vsock`.

Call `start()`/`snapshot_load()` from a long-lived thread (the main thread):
PR_SET_PDEATHSIG fires when the *thread* that forked the VMM ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcvm import errors, log
from fcvm.vmm import fc_api, process
from fcvm.vmm.base import Accel, Availability, Backend, Capabilities, VmConfig
from fcvm.vmm.fc_api import ApiClient, ApiRequest, MemBackendType, SnapshotType

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
FIRECRACKER_ENV = "FCVM_FIRECRACKER"


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
        # config.extra["track_dirty_pages"] = "1": boot with dirty page tracking so
        # that Diff snapshots can be taken later.
        self.track_dirty_pages = config.extra.get("track_dirty_pages", "") in ("1", "true")
        self.log_level: fc_api.LogLevel = (
            "Debug" if os.environ.get("FCVM_LOG", "").lower() == "debug" else "Warning"
        )
        self._api: ApiClient | None = None
        self.sent: list[ApiRequest] = []  # every request sent, in order (for diagnostics)

    # --- process ---------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(accel="kvm", snapshot=True, restore=True)

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
                    f"firecracker exited with {code} before its API socket appeared",
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

    def _send(self, request: ApiRequest, timeout: float | None = None) -> Any:
        if self._api is None:
            raise errors.VmmUnavailable(f"Firecracker VM {self.config.vm_id} is not running")
        self.sent.append(request)
        try:
            return self._api.send(request, timeout=timeout)
        except fc_api.FirecrackerApiError:
            raise
        except errors.VmmUnavailable as exc:
            code = self.poll()
            if code is not None:
                raise errors.VmmUnavailable(
                    f"firecracker exited with {code} during {request.describe()}",
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

    async def open_agent_stream(
        self, timeout: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        from fcvm.session.transport import connect_firecracker_vsock

        return await connect_firecracker_vsock(str(self.vsock_path), self.vsock_port, timeout)

    def log_files(self) -> list[Path | None]:
        return [self.log_path, self.vmm_log_path, self.config.console_log]

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

    # --- snapshots -------------------------------------------------------------

    def pause(self) -> None:
        self._send(fc_api.vm_state_request("Paused"))

    def resume(self) -> None:
        self._send(fc_api.vm_state_request("Resumed"))

    def snapshot_create(
        self, mem_path: Path, state_path: Path, snapshot_type: SnapshotType = "Full"
    ) -> None:
        """Write the (paused) VM's memory and device state."""
        self._send(
            fc_api.snapshot_create_request(mem_path, state_path, snapshot_type),
            timeout=SNAPSHOT_TIMEOUT,
        )

    def snapshot_load(
        self,
        state_path: Path,
        mem_backend_path: Path,
        *,
        mem_backend_type: MemBackendType = "File",
        resume_vm: bool = True,
        track_dirty_pages: bool | None = None,
        network_overrides: Mapping[str, str] | None = None,
        vsock_override: Path | None = None,
    ) -> None:
        """Start this VM from a snapshot instead of `start()` (fresh Firecracker process).

        mem_backend_path is the memory file (File) or the page server's Unix socket
        (Uffd). By default the clone gets this config's TAP (as the override of
        eth0) and its own vsock socket in its workdir."""
        if network_overrides is None:
            network_overrides = fc_api.overrides_for(self.config.net)
        request = fc_api.snapshot_load_request(
            state_path,
            mem_backend_path,
            mem_backend_type=mem_backend_type,
            resume_vm=resume_vm,
            track_dirty_pages=(
                self.track_dirty_pages if track_dirty_pages is None else track_dirty_pages
            ),
            network_overrides=network_overrides,
            vsock_override=vsock_override or self.vsock_path,
        )
        self._touch(self.vmm_log_path)
        self._launch()
        try:
            self._send(fc_api.logger_request(self.vmm_log_path, self.log_level))
            self._send(request, timeout=SNAPSHOT_TIMEOUT)
        except BaseException:
            self.stop(timeout=1.0)
            raise

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
