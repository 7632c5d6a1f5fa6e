"""FirecrackerVmm against a stand-in for Firecracker's API server.

There is no Firecracker binary on these machines, so Firecracker's side of the
contract is played by `Standin`, a real HTTP/1.1 server on a Unix socket that
follows Firecracker's documented behaviour (docs/snapshotting/snapshot-support.md,
the 1.17 API, its error wording) where fcvm depends on it:

- pre-boot-only resources, InstanceStart needing a boot source, PATCH /vm only after
  boot or load (a repeated Paused/Resumed is ignored), errors as
  ``{"fault_message": ...}`` and logged as "Received Error. ..." to the logger's file;
- guest memory is a real mapping: anonymous after a boot, the memory file mapped
  MAP_PRIVATE after a File load (so the file is never written), anonymous memory
  registered with a userfaultfd after a Uffd load, whose handshake goes to the page
  server exactly as Firecracker sends it (tests/host/uffd_driver.Driver);
- a "guest" writes pages whenever the VM starts running (each run: a few pages set,
  two pages zeroed, one partly rewritten), counted as dirty when dirty-page tracking
  is on (machine-config at boot, track_dirty_pages at load; a booted VM's pages
  are all dirty until its first snapshot, a load starts clean);
- snapshot/create: Diff refused without tracking, any create refused unless paused;
  writes the state file, then the memory file sized to the guest (not truncated when
  it exists with that size: 1.17 merges a Diff into it), Full = every page (the
  stand-in leaves all-zero MiBs of a new file as holes), Diff = the dirty pages
  only, zero pages included; then the dirty set is cleared;
- snapshot/load only on a fresh process before any boot-specific resource (the
  logger and metrics are allowed); a failed load is answered and then the process
  exits, as Firecracker does;
- vsock: ``CONNECT <port>`` / ``OK <n>`` and an echoing guest while running; a
  CONNECT to a paused guest is never answered and is reset when the guest runs or
  after CONN_REQUEST_TIMEOUT (2 s); a snapshot queues the vsock transport reset,
  so established connections are closed when the VM runs again.

These tests check fcvm's side of the contract: what it launches, what it sends and in
which order, and what it makes of the answers and files. They do not test
Firecracker. The stand-in's own state file is JSON (Firecracker's is binary).

The same module is the stand-in "firecracker" executable: run as a script
(``python test_firecracker_vmm.py --api-sock S --id ID``) it serves the stand-in
until SIGTERM, appending every request (and the guest's writes, method "GUEST") to
$FCVM_STANDIN_RECORD as JSON lines; $FCVM_STANDIN_MEMDUMP names a directory where
each successful snapshot/create also leaves the whole guest memory as it was
(``<id>-<n>.mem``), the truth a merged Diff is compared with.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import json
import mmap
import os
import random
import shutil
import signal
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path
from typing import Any

# --- the stand-in (stdlib only; a Uffd load imports tests/host/uffd_driver) ----------

PAGE = 4096
MiB = 1 << 20
ZERO_MIB = bytes(MiB)
CONN_REQUEST_TIMEOUT = 2.0  # Firecracker's vsock: an unanswered host CONNECT is reset
GUEST_WRITES = 24  # pages the stand-in's guest sets each time it runs
BOOT_IMAGE_PAGES = 256  # what a boot writes first (the "kernel"): 1 MiB of data

PRE_BOOT_ONLY = (
    "/boot-source",
    "/machine-config",
    "/drives/",
    "/network-interfaces/",
    "/vsock",
    "/entropy",
    "/serial",
    "/logger",
    "/snapshot/load",
)
NOT_STARTED, RUNNING, PAUSED = "Not started", "Running", "Paused"
# Firecracker's own wording of the refusals fcvm may run into.
AFTER_START = "The requested operation is not supported after starting the microVM."
BEFORE_START = "The requested operation is not supported before starting the microVM."
NO_KERNEL = "Start microvm error: Cannot start microvm without kernel configuration."
NOT_PAUSED = (
    "Create snapshot error: Cannot save the microVM state: Operation not allowed: "
    "save/restore unavailable while running"
)
NO_DIRTY_TRACKING = (
    "The requested operation is not supported: Diff snapshots are not allowed on uVMs "
    "with dirty page tracking disabled."
)
LOAD_AFTER_CONFIG = (
    "Load snapshot error: Loading a microVM snapshot not allowed after configuring "
    "boot-specific resources."
)
LOAD_FAILED = "Load snapshot error: Failed to restore from snapshot: "
FROM_FILE = "Failed to load guest memory: Error creating guest memory from file: "
FROM_UFFD = "Failed to load guest memory: Error creating guest memory from uffd: "
STATE_FROM_FILE = "Failed to get snapshot state from file: "
EXITING = "Firecracker exiting with error. exit_code=1"


def fault(message: str, status: int = 400) -> tuple[int, dict[str, Any]]:
    return status, {"fault_message": message}


def io_error(exc: OSError) -> str:
    """An OSError as Rust's io::Error displays it."""
    return f"{os.strerror(exc.errno or 0)} (os error {exc.errno})"


class LoadFailed(Exception):
    """A snapshot load failed; the message continues LOAD_FAILED."""


def page_bytes(tag: str) -> bytes:
    return (hashlib.sha256(tag.encode()).digest() * (PAGE // 32))[:PAGE]


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class Standin:
    """What the API server of one Firecracker process remembers."""

    def __init__(
        self,
        vm_id: str,
        record: Path | None,
        faults: dict[str, list[Any]],
        *,
        exit_on_fatal: bool = False,
        die_during: str | None = None,
        memdump: Path | None = None,
    ) -> None:
        self.vm_id = vm_id
        self.record = record
        self.faults = faults
        self.exit_on_fatal = exit_on_fatal  # a process: end after a failed load
        self.die_during = die_during  # "METHOD /path": crash while handling it
        self.memdump = memdump
        self.state = NOT_STARTED
        self.configured: list[str] = []  # boot-specific resources (not the logger)
        self.vsock_uds: str | None = None
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.fatal = False  # answered a request after which Firecracker exits
        self.exit_logged = False
        self.log_path: Path | None = None
        self.mem_mib = 128
        self.vcpus = 1
        self.track_config = False  # machine-config track_dirty_pages (boot)
        self.track = False  # the VM tracks dirty pages
        self.mem: mmap.mmap | None = None  # guest memory, one region
        self.dirty: set[int] | None = set()  # dirty pages; None: all of them
        self.runs = 0
        self.dumps = 0
        self.net: dict[str, str] = {}  # iface id -> TAP
        self.conns: list[socket.socket] = []  # established vsock connections
        self.reset_at_run: list[socket.socket] = []  # the queued transport reset's
        self.uffd: Any = None  # the uffd_driver.Driver of a Uffd load (kept for life)
        self.clock_realtime = False

    # -- requests ------------------------------------------------------------------

    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, dict[str, Any] | None]:
        with self.lock:
            try:
                body = json.loads(raw) if raw else None
            except ValueError as exc:
                return fault(f"An error occurred when deserializing the json body: {exc}.")
            entry = {"method": method, "path": path, "body": body}
            self.requests.append(entry)
            self._record(entry)
            if self.die_during == f"{method} {path}":
                self._log("ERROR", f"stand-in: simulated crash during {method} {path}")
                os.kill(os.getpid(), signal.SIGKILL)
            injected = self.faults.get(f"{method} {path}")
            if injected is not None:
                status, payload = fault(str(injected[1]), int(injected[0]))
            else:
                status, payload = self._dispatch(method, path, body)
            if status >= 400 and payload is not None:
                self._log("ERROR", f"Received Error. Status code: {status} Bad Request. "
                                   f"Message: {payload['fault_message']}")  # fmt: skip
            if self.fatal and not self.exit_logged:
                self.exit_logged = True
                self._log("ERROR", EXITING)
            return status, payload

    def _record(self, entry: dict[str, Any]) -> None:
        if self.record is not None:
            with self.record.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def _log(self, level: str, msg: str) -> None:
        """A line in Firecracker's logger format (show_level)."""
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        line = f"{stamp}.{int(now % 1 * 1e9):09d} [{self.vm_id}:fc_api:{level}] {msg}\n"
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(line)
        else:
            print(line, end="", flush=True)

    def _dispatch(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any] | None]:
        if method == "GET" and path == "/":
            return 200, {"app_name": "Firecracker", "id": self.vm_id, "state": self.state,
                         "vmm_version": "1.17.0-standin"}  # fmt: skip
        if method == "PUT" and any(path.startswith(p) for p in PRE_BOOT_ONLY):
            if self.state != NOT_STARTED:
                return fault(AFTER_START)
            if path == "/snapshot/load":
                return self._load(body)
            if body is None:
                return 400, {"fault_message": "Empty request body."}
            return self._configure(path, body)
        if method == "PUT" and path == "/actions":
            action = (body or {}).get("action_type")
            if action != "InstanceStart":
                return 400, {"fault_message": f"unsupported action {action}"}
            if self.state != NOT_STARTED:
                return fault(AFTER_START)
            if "/boot-source" not in self.configured:
                return fault(NO_KERNEL)
            self.mem = mmap.mmap(-1, self.mem_mib * MiB)
            self.track = self.track_config
            self.dirty = None if self.track else set()  # all of a booted VM's pages
            for p in range(min(BOOT_IMAGE_PAGES, len(self.mem) // PAGE)):
                self.mem[p * PAGE : (p + 1) * PAGE] = page_bytes(f"boot/{p}")
            self.state = RUNNING
            self._serve_vsock()
            self._run()
            return 204, None
        if method == "PATCH" and path == "/vm":
            if self.state == NOT_STARTED:
                return fault(BEFORE_START)
            if body["state"] == "Paused":
                self.state = PAUSED
            elif self.state == PAUSED:  # Resumed; on a running VM it is ignored
                self.state = RUNNING
                self._run()
            return 204, None
        if method == "PUT" and path == "/snapshot/create":
            if self.state == NOT_STARTED:
                return fault(BEFORE_START)
            kind = body.get("snapshot_type", "Full")
            if kind == "Diff" and not self.track:
                return fault(NO_DIRTY_TRACKING)
            if self.state != PAUSED:
                return fault(NOT_PAUSED)
            return self._create(body, kind)
        if method == "PATCH" and path.startswith("/drives/"):
            if self.state == NOT_STARTED:
                return fault(BEFORE_START)
            return 204, None
        return 400, {"fault_message": f"Invalid request method and/or path: {method} {path}."}

    def _configure(self, path: str, body: Any) -> tuple[int, dict[str, Any] | None]:
        if path == "/logger":
            log_path = Path(body["log_path"])
            if not log_path.exists():  # Firecracker opens it, never creates it
                return fault("Logger error: Failed to open target file: "
                             "No such file or directory (os error 2)")  # fmt: skip
            self.log_path = log_path
            return 204, None
        if path == "/machine-config":
            self.mem_mib = body["mem_size_mib"]
            self.vcpus = body["vcpu_count"]
            self.track_config = bool(body.get("track_dirty_pages", False))
        elif path == "/vsock":
            self.vsock_uds = body["uds_path"]
        elif path.startswith("/network-interfaces/"):
            self.net[body["iface_id"]] = body["host_dev_name"]
        self.configured.append(path)
        return 204, None

    # -- the guest ----------------------------------------------------------------

    def _set_page(self, p: int, data: bytes, offset: int = 0) -> None:
        assert self.mem is not None
        self.mem[p * PAGE + offset : p * PAGE + offset + len(data)] = data
        if self.track and self.dirty is not None:
            self.dirty.add(p)

    def _run(self) -> None:
        """The VM runs again: a snapshot's queued vsock transport reset closes the
        connections established before it, and the guest writes some memory."""
        assert self.mem is not None
        self.runs += 1
        for c in self.reset_at_run:
            self._close(c)
        self.reset_at_run = []
        npages = len(self.mem) // PAGE
        rng = random.Random(f"{self.vm_id}/{self.runs}")
        image = min(BOOT_IMAGE_PAGES, npages)
        writes = sorted(rng.sample(range(image, npages), min(GUEST_WRITES, npages - image)))
        zeroed = sorted(rng.sample(range(image), min(2, image)))
        partial = rng.randrange(image)
        for p in writes:
            self._set_page(p, page_bytes(f"{self.vm_id}/{self.runs}/{p}"))
        for p in zeroed:
            self._set_page(p, bytes(PAGE))
        self._set_page(partial, f"{self.vm_id} run {self.runs}".encode(), offset=100)
        self._record(
            {
                "method": "GUEST",
                "path": "writes",
                "body": {"run": self.runs, "pages": sorted({*writes, *zeroed, partial})},
            }
        )
        self.cond.notify_all()

    # -- snapshots ----------------------------------------------------------------

    def _create(self, body: Any, kind: str) -> tuple[int, dict[str, Any] | None]:
        assert self.mem is not None
        try:
            state = {
                "standin_vmstate": 1,
                "from_vm": self.vm_id,
                "mem_size_mib": self.mem_mib,
                "vcpu_count": self.vcpus,
                "vsock_uds": self.vsock_uds,
                "net": self.net,
            }
            Path(body["snapshot_path"]).write_text(json.dumps(state))
            self._write_memory(Path(body["mem_file_path"]), kind)
        except OSError as exc:
            return fault(f"Create snapshot error: Cannot perform open on the memory backing "
                         f"file: {io_error(exc)}")  # fmt: skip
        self.dirty = set()  # "resets the dirtied page bitmap and marks all pages clean"
        self.reset_at_run = list(self.conns)  # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET queued
        if self.memdump is not None:
            self.dumps += 1
            self._dump(self.memdump / f"{self.vm_id}-{self.dumps}.mem")
        return 204, None

    def _write_memory(self, path: Path, kind: str) -> None:
        assert self.mem is not None
        size = len(self.mem)
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if existed and os.fstat(fd).st_size != size:
                os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
            mem = memoryview(self.mem)
            if kind == "Diff":
                pages = range(size // PAGE) if self.dirty is None else sorted(self.dirty)
                for start, end in _runs(pages):
                    pwrite_all(fd, mem[start * PAGE : end * PAGE], start * PAGE)
            else:
                for off in range(0, size, MiB):
                    chunk = mem[off : off + MiB]
                    if existed or chunk != ZERO_MIB:
                        pwrite_all(fd, chunk, off)
            mem.release()
            os.fsync(fd)
        finally:
            os.close(fd)

    def _dump(self, path: Path) -> None:
        assert self.mem is not None
        with open(path, "wb") as f:
            f.truncate(len(self.mem))
            for off in range(0, len(self.mem), MiB):
                chunk = self.mem[off : off + MiB]
                if chunk != ZERO_MIB:
                    f.seek(off)
                    f.write(chunk)

    def _load(self, body: Any) -> tuple[int, dict[str, Any] | None]:
        if self.configured:
            return fault(LOAD_AFTER_CONFIG)  # (not fatal: the process goes on)
        try:
            state = self._read_state(Path(body["snapshot_path"]))
            self.mem_mib, self.vcpus = state["mem_size_mib"], state["vcpu_count"]
            self.track = bool(body.get("track_dirty_pages") or body.get("enable_diff_snapshots"))
            backend = body["mem_backend"]
            if backend["backend_type"] == "File":
                self.mem = self._map_file(Path(backend["backend_path"]))
            else:
                self.mem = self._uffd_memory(Path(backend["backend_path"]))
            self.net = dict(state["net"])
            for override in body.get("network_overrides", []):
                self.net[override["iface_id"]] = override["host_dev_name"]
            self.vsock_uds = (body.get("vsock_override") or {}).get("uds_path") or state[
                "vsock_uds"
            ]
            try:
                self._serve_vsock()
            except OSError as exc:
                raise LoadFailed("Failed to build microVM from snapshot: (stand-in) vsock: "
                                 f"Error binding to the host-side Unix socket: {io_error(exc)}"
                                 ) from None  # fmt: skip
        except LoadFailed as exc:
            self.fatal = True
            return fault(LOAD_FAILED + str(exc))
        self.clock_realtime = bool(body.get("clock_realtime"))
        self.dirty = set()  # a loaded VM starts clean
        self.state = PAUSED
        if body.get("resume_vm"):
            self.state = RUNNING
            self._run()
        return 204, None

    def _read_state(self, path: Path) -> dict[str, Any]:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise LoadFailed(
                f"{STATE_FROM_FILE}Failed to open snapshot file: {io_error(exc)}"
            ) from None
        if len(raw) < 8:
            raise LoadFailed(f"{STATE_FROM_FILE}Failed to load snapshot state from file: "
                             "Snapshot file is smaller than CRC length.")  # fmt: skip
        try:
            state: dict[str, Any] = json.loads(raw)
            if state.get("standin_vmstate") != 1:
                raise ValueError
        except ValueError:
            raise LoadFailed(f"{STATE_FROM_FILE}Failed to load snapshot state from file: "
                             "(stand-in) not a stand-in state file") from None  # fmt: skip
        return state

    def _map_file(self, path: Path) -> mmap.mmap:
        """The memory file mapped privately: reads come from it, writes stay ours."""
        size = self.mem_mib * MiB
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise LoadFailed(f"{FROM_FILE}Failed to load guest memory: {io_error(exc)}") from None
        try:
            if os.fstat(fd).st_size < size:
                raise LoadFailed(f"{FROM_FILE}(stand-in) the memory file is smaller than "
                                 f"the guest's {size} bytes")  # fmt: skip
            return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        finally:
            os.close(fd)

    def _uffd_memory(self, sock: Path) -> mmap.mmap:
        """Firecracker's guest_memory_from_uffd: anonymous memory registered with a new
        userfaultfd, the regions and the uffd sent to the page server in one message
        (tests/host/uffd_driver does exactly that), the socket kept open for life."""
        root = Path(__file__).resolve().parents[2]
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        from tests.host.uffd_driver import Driver

        try:
            driver = Driver(sock, size=self.mem_mib * MiB)
        except Exception as exc:  # (UffdUnavailable: no privilege for a userfaultfd)
            raise LoadFailed(f"{FROM_UFFD}Failed to UFFD object: {exc}") from None
        try:
            driver.connect(sock)
        except OSError as exc:
            driver.close()
            raise LoadFailed(
                f"{FROM_UFFD}Failed to connect to UDS Unix stream: {io_error(exc)}"
            ) from None
        self.uffd = driver
        mem: mmap.mmap = driver.maps[0]
        return mem

    # -- vsock ----------------------------------------------------------------------

    def _serve_vsock(self) -> None:
        """Host-initiated vsock: `CONNECT <port>\\n` -> `OK <host port>\\n` from a running
        guest, which then echoes bytes back."""
        if self.vsock_uds is None:
            return
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            srv.bind(self.vsock_uds)
        except OSError:
            srv.close()
            raise
        srv.listen(4)

        def accept() -> None:
            while True:
                c, _ = srv.accept()
                threading.Thread(target=self._vsock_conn, args=(c,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def _vsock_conn(self, c: socket.socket) -> None:
        with c:
            line = c.makefile("rb").readline()
            if not line.startswith(b"CONNECT "):
                return
            with self.cond:
                if self.state != RUNNING:
                    # The request waits for a guest that cannot answer; when it runs (a
                    # restored agent listens again only after the transport reset) or
                    # after CONN_REQUEST_TIMEOUT, the connection is reset.
                    self.cond.wait_for(lambda: self.state == RUNNING, CONN_REQUEST_TIMEOUT)
                    return
                self.conns.append(c)
            c.sendall(b"OK 1073741824\n")
            with contextlib.suppress(OSError):
                while data := c.recv(65536):
                    c.sendall(data)

    @staticmethod
    def _close(c: socket.socket) -> None:
        with contextlib.suppress(OSError):
            c.shutdown(socket.SHUT_RDWR)


def _runs(pages: Any) -> list[tuple[int, int]]:
    """Sorted page numbers -> [start, end) runs."""
    runs: list[tuple[int, int]] = []
    for p in pages:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False


def make_handler(standin: Standin) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as Firecracker's micro_http

        def _any(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            status, payload = standin.handle(self.command, self.path, raw)
            data = json.dumps(payload).encode() if payload is not None else b""
            self.send_response(status)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            if standin.fatal and standin.exit_on_fatal:
                self.wfile.flush()
                os._exit(1)  # after a failed load Firecracker ends (exit_code=1)

        do_GET = do_PUT = do_PATCH = _any

        def address_string(self) -> str:  # Unix sockets have no client address
            return "unix"

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def serve_in_thread(sock: Path, standin: Standin) -> UnixHTTPServer:
    server = UnixHTTPServer(str(sock), make_handler(standin))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str]) -> None:
    """The stand-in "firecracker" process: --api-sock PATH --id ID."""
    api_sock = argv[argv.index("--api-sock") + 1]
    vm_id = argv[argv.index("--id") + 1]
    record = os.environ.get("FCVM_STANDIN_RECORD")
    memdump = os.environ.get("FCVM_STANDIN_MEMDUMP")
    faults = json.loads(os.environ.get("FCVM_STANDIN_FAULTS") or "{}")
    print(f"stand-in firecracker {vm_id} pid {os.getpid()} argv {argv}", flush=True)
    if os.environ.get("FCVM_STANDIN_NOSOCKET"):
        time.sleep(3600)
    time.sleep(float(os.environ.get("FCVM_STANDIN_DELAY") or 0))
    standin = Standin(
        vm_id,
        Path(record) if record else None,
        faults,
        exit_on_fatal=True,
        die_during=os.environ.get("FCVM_STANDIN_DIE_DURING"),
        memdump=Path(memdump) if memdump else None,
    )
    UnixHTTPServer(api_sock, make_handler(standin)).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)


# --- the tests --------------------------------------------------------------------

import pytest  # noqa: E402

from fcvm import errors  # noqa: E402
from fcvm.vmm import fc_api, fc_diff, select  # noqa: E402
from fcvm.vmm.base import Drive, NetIface, SnapshotFiles, VmConfig  # noqa: E402
from fcvm.vmm.fc_api import ApiClient, ApiRequest, FirecrackerApiError  # noqa: E402
from fcvm.vmm.firecracker import FirecrackerVmm  # noqa: E402

from .test_firecracker_api import validate as validate_against_spec  # noqa: E402


def fake_firecracker(tmp_path: Path) -> Path:
    exe = tmp_path / "firecracker"
    if not exe.exists():
        exe.write_text(f'#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} "$@"\n')
        exe.chmod(0o755)
    return exe


def config_for(
    tmp_path: Path,
    *,
    net: bool = True,
    console: bool = True,
    name: str = "t1",
    mem_mib: int = 256,
    extra: dict[str, str] | None = None,
) -> VmConfig:
    workdir = tmp_path / name
    return VmConfig(
        vm_id=name,
        workdir=workdir,
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd",
        vcpus=1,
        mem_mib=mem_mib,
        drives=(
            Drive("image", tmp_path / "image.tar"),
            Drive("root", tmp_path / "rootfs.ext4", is_root=True),
        ),
        net=NetIface(f"tap-{name}", "06:00:0a:00:00:02") if net else None,
        console_log=workdir / "console.log" if console else None,
        extra=extra or {},
    )


def recorded(path: Path) -> list[dict[str, Any]]:
    """The API requests the stand-ins received, in order."""
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in entries if e["method"] != "GUEST"]


def calls(reqs: list[dict[str, Any]]) -> list[str]:
    return [f"{r['method']} {r['path']}" for r in reqs]


def guest_writes(path: Path) -> list[list[int]]:
    """The pages the stand-ins' guests wrote, one list per run, in order."""
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return [e["body"]["pages"] for e in entries if e["method"] == "GUEST"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dumps(memdump: Path, vm: str) -> list[Path]:
    return sorted(memdump.glob(f"{vm}-*.mem"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))


def files_in(directory: Path) -> SnapshotFiles:
    directory.mkdir(parents=True, exist_ok=True)
    return SnapshotFiles(directory / "memory", directory / "vmstate")


@pytest.fixture
def standin_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return standin_environment(tmp_path, monkeypatch)


def standin_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The environment the stand-in processes read; returns the request record."""
    record = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FCVM_STANDIN_RECORD", str(record))
    (tmp_path / "memdump").mkdir()
    monkeypatch.setenv("FCVM_STANDIN_MEMDUMP", str(tmp_path / "memdump"))
    for var in ("FCVM_STANDIN_FAULTS", "FCVM_STANDIN_NOSOCKET", "FCVM_STANDIN_DIE_DURING"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FCVM_STANDIN_DELAY", "0.1")  # the socket appears a little late
    return record


class Vms:
    """Stand-in Firecracker VMs of one test, each stopped at the end."""

    def __init__(self, tmp_path: Path, record: Path) -> None:
        self.tmp_path, self.record = tmp_path, record
        self.memdump = tmp_path / "memdump"
        self.all: list[FirecrackerVmm] = []

    def make(self, name: str, mem_mib: int = 8, **kw: Any) -> FirecrackerVmm:
        vmm = FirecrackerVmm(config_for(self.tmp_path, name=name, mem_mib=mem_mib, **kw),
                             binary=fake_firecracker(self.tmp_path))  # fmt: skip
        self.all.append(vmm)
        return vmm

    def booted(self, name: str, **kw: Any) -> FirecrackerVmm:
        vmm = self.make(name, **kw)
        vmm.start()
        return vmm

    def saved(self, name: str, **kw: Any) -> SnapshotFiles:
        """A snapshot of a freshly booted VM `name` (stopped afterwards)."""
        vmm = self.booted(name, **kw)
        vmm.pause()
        files = files_in(self.tmp_path / f"snap-{name}")
        vmm.save_snapshot(files)
        vmm.stop(timeout=2)
        return files

    def requests(self, since: int = 0) -> list[dict[str, Any]]:
        return recorded(self.record)[since:]

    def close(self) -> None:
        for vmm in self.all:
            vmm.stop(timeout=2)


@pytest.fixture
def vms(tmp_path: Path, standin_env: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("FCVM_STANDIN_DELAY", "0")  # (many VMs: no late socket here)
    v = Vms(tmp_path, standin_env)
    try:
        yield v
    finally:
        v.close()


def connect(vmm: FirecrackerVmm, data: bytes = b"hello agent") -> bytes:
    """What Machine does after restore(): open the agent stream, then resume()."""

    async def go() -> bytes:
        reader, writer = await vmm.open_agent_stream(timeout=5)
        vmm.resume()
        writer.write(data)
        await writer.drain()
        got = await reader.readexactly(len(data))
        writer.close()
        return got

    return asyncio.run(go())


# -- boot ------------------------------------------------------------------------------


@pytest.mark.unit
def test_boot_sends_configuration_then_instance_start(tmp_path: Path, standin_env: Path) -> None:
    """Stand-in for Firecracker's API (not Firecracker): a boot launches the VMM with
    --api-sock/--id, configures everything, and sends InstanceStart last."""
    vmm = FirecrackerVmm(config_for(tmp_path), binary=fake_firecracker(tmp_path))
    try:
        vmm.start()
        assert vmm.pid is not None and vmm.poll() is None
        reqs = recorded(standin_env)
        assert calls(reqs) == [
            "PUT /logger",
            "PUT /boot-source",
            "PUT /machine-config",
            "PUT /drives/root",
            "PUT /drives/image",
            "PUT /network-interfaces/eth0",
            "PUT /vsock",
            "PUT /entropy",
            "PUT /serial",
            "PUT /actions",
        ]
        assert reqs[-1]["body"] == {"action_type": "InstanceStart"}
        boot = reqs[1]["body"]
        assert boot["kernel_image_path"] == str(tmp_path / "vmlinux")
        assert boot["initrd_path"] == str(tmp_path / "initrd")
        assert "fcvm.transport=vsock" in boot["boot_args"].split()
        assert f"fcvm.port={vmm.vsock_port}" in boot["boot_args"].split()
        assert reqs[6]["body"] == {"guest_cid": 3, "uds_path": str(tmp_path / "t1" / "v.sock")}
        assert reqs[5]["body"]["host_dev_name"] == "tap-t1"
        assert "track_dirty_pages" not in reqs[2]["body"]  # boots do not track by default
        for r in reqs:  # what went over the wire matches the contract
            validate_against_spec(ApiRequest(r["method"], r["path"], r["body"]))
        log = (tmp_path / "t1" / "firecracker.log").read_text()
        assert "--api-sock" in log and str(tmp_path / "t1" / "fc.sock") in log and "'t1'" in log
        assert (tmp_path / "t1" / "console.log").exists()  # created for serial_out_path
        assert vmm.instance_info()["state"] == "Running"
        assert vmm.vm_state == "running"
    finally:
        vmm.stop(timeout=2)
    assert vmm.poll() is not None
    vmm.stop()  # idempotent


@pytest.mark.unit
def test_boot_without_net_or_console(tmp_path: Path, standin_env: Path) -> None:
    """Stand-in for Firecracker's API (not Firecracker): optional devices stay out."""
    vmm = FirecrackerVmm(
        config_for(tmp_path, net=False, console=False), binary=fake_firecracker(tmp_path)
    )
    try:
        vmm.start()
    finally:
        vmm.stop(timeout=2)
    paths = [r["path"] for r in recorded(standin_env)]
    assert "/network-interfaces/eth0" not in paths and "/serial" not in paths
    assert paths[-1] == "/actions"


@pytest.mark.unit
def test_fault_message_becomes_one_error_line(
    tmp_path: Path, standin_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stand-in for Firecracker's API (not Firecracker): a 400 with fault_message
    becomes one clear FcvmError line, and the VMM process is gone afterwards."""
    monkeypatch.setenv(
        "FCVM_STANDIN_FAULTS",
        json.dumps({"PUT /machine-config": [400, "The memory size (MiB) is invalid."]}),
    )
    vmm = FirecrackerVmm(config_for(tmp_path), binary=fake_firecracker(tmp_path))
    with pytest.raises(errors.FcvmError) as info:
        vmm.start()
    err = info.value
    assert isinstance(err, FirecrackerApiError) and isinstance(err, errors.VmmUnavailable)
    assert err.line() == (
        "Firecracker rejected PUT /machine-config (HTTP 400): The memory size (MiB) is invalid."
    )
    assert err.exit_code == errors.EXIT_FCVM
    assert vmm.poll() is not None  # start() cleaned up after itself
    assert "PUT /actions" not in calls(recorded(standin_env))


@pytest.mark.unit
def test_api_socket_that_never_appears_times_out(
    tmp_path: Path, standin_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stand-in for Firecracker (not Firecracker) that never creates its API socket:
    start() fails within the API timeout with a clear line and kills the VMM."""
    monkeypatch.setenv("FCVM_STANDIN_NOSOCKET", "1")
    vmm = FirecrackerVmm(config_for(tmp_path), binary=fake_firecracker(tmp_path), api_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(errors.VmmUnavailable, match=r"did not appear within 0.5 s"):
        try:
            vmm._launch()
        finally:
            vmm.stop(timeout=1)
    assert time.monotonic() - t0 < 5
    assert vmm.poll() is not None


@pytest.mark.unit
def test_start_times_out_and_cleans_up(
    tmp_path: Path, standin_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same as above through start(): the VMM process does not outlive the failure."""
    monkeypatch.setenv("FCVM_STANDIN_NOSOCKET", "1")
    vmm = FirecrackerVmm(config_for(tmp_path), binary=fake_firecracker(tmp_path), api_timeout=0.3)
    with pytest.raises(errors.VmmUnavailable, match="did not appear"):
        vmm.start()
    assert vmm.poll() is not None


@pytest.mark.unit
def test_vmm_that_exits_early_is_reported(tmp_path: Path) -> None:
    """A VMM that dies before its socket appears: exit code and its last words."""
    exe = tmp_path / "firecracker"
    exe.write_text("#!/bin/sh\necho 'Error: bad --api-sock' >&2\nexit 3\n")
    exe.chmod(0o755)
    vmm = FirecrackerVmm(config_for(tmp_path), binary=exe)
    with pytest.raises(errors.VmmUnavailable) as info:
        vmm.start()
    assert "firecracker exited with 3" in str(info.value)
    assert "bad --api-sock" in info.value.line()


@pytest.mark.unit
def test_agent_stream_after_boot(tmp_path: Path, standin_env: Path) -> None:
    """Stand-in for Firecracker's vsock (not Firecracker): open_agent_stream does the
    CONNECT handshake on <workdir>/v.sock and yields a working byte stream."""
    vmm = FirecrackerVmm(config_for(tmp_path), binary=fake_firecracker(tmp_path))
    try:
        vmm.start()
        assert connect(vmm, b"ping") == b"ping"
    finally:
        vmm.stop(timeout=2)
    assert "PATCH /vm" not in calls(recorded(standin_env))  # resume() of a running VM: no-op


# -- pause, resume, save --------------------------------------------------------------


@pytest.mark.unit
def test_pause_and_resume_are_patch_vm_and_idempotent(vms: Vms) -> None:
    """Stand-in for Firecracker's API (not Firecracker): PATCH /vm Paused/Resumed, each
    sent once however often it is asked for."""
    vmm = vms.booted("p1")
    n = len(vms.requests())
    vmm.pause()
    vmm.pause()
    assert vmm.instance_info()["state"] == "Paused"
    vmm.resume()
    vmm.resume()
    assert vmm.instance_info()["state"] == "Running"
    reqs = vms.requests(n)
    assert [(r["method"], r["path"], r["body"]) for r in reqs] == [
        ("PATCH", "/vm", {"state": "Paused"}),
        ("GET", "/", None),
        ("PATCH", "/vm", {"state": "Resumed"}),
        ("GET", "/", None),
    ]


@pytest.mark.unit
def test_save_is_pause_full_create_resume(vms: Vms) -> None:
    """Stand-in for Firecracker's API (not Firecracker): Machine.snapshot's order -
    pause(), save_snapshot(), resume() - is PATCH Paused, PUT /snapshot/create Full
    into the two files, PATCH Resumed; the memory file is the whole guest memory."""
    vmm = vms.booted("s1")
    n = len(vms.requests())
    files = files_in(vms.tmp_path / "snap")
    vmm.pause()
    vmm.save_snapshot(files)
    vmm.resume()
    reqs = vms.requests(n)
    assert [(r["method"], r["path"], r["body"]) for r in reqs] == [
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": str(files.state),
                                     "mem_file_path": str(files.memory)}),
        ("PATCH", "/vm", {"state": "Resumed"}),
    ]  # fmt: skip
    for r in reqs:
        validate_against_spec(ApiRequest(r["method"], r["path"], r["body"]))
    assert files.memory.stat().st_size == 8 * MiB  # sized to the machine config
    (dump,) = dumps(vms.memdump, "s1")
    assert sha(files.memory) == sha(dump)
    assert json.loads(files.state.read_text())["mem_size_mib"] == 8
    assert vmm.instance_info()["state"] == "Running"


@pytest.mark.unit
def test_create_refused_while_running_is_reported(vms: Vms) -> None:
    """Stand-in for Firecracker's API (not Firecracker): snapshot/create of a running VM
    is refused; save_snapshot says so in one line quoting Firecracker."""
    vmm = vms.booted("r1")
    with pytest.raises(FirecrackerApiError, match="save/restore unavailable while running"):
        vmm.snapshot_create(vms.tmp_path / "mem", vms.tmp_path / "state")
    with pytest.raises(errors.VmmUnavailable) as info:
        vmm.save_snapshot(files_in(vms.tmp_path / "snap"))
    line = info.value.line()
    assert line.startswith(f"Firecracker could not create the snapshot: {NOT_PAUSED}")
    assert "\n" not in line and line.count(NOT_PAUSED) == 1
    assert vmm.poll() is None  # a refused create leaves the VM as it was


@pytest.mark.unit
def test_create_failure_leaves_the_vm_paused_and_usable(
    vms: Vms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stand-in for Firecracker's API (not Firecracker): a create that fails (here: the
    memory file cannot be opened) is one line; the VM is still paused and resumes."""
    monkeypatch.setenv("FCVM_STANDIN_FAULTS", json.dumps({"PUT /snapshot/create": [
        400, "Create snapshot error: Cannot perform open on the memory backing file: "
             "Permission denied (os error 13)"]}))  # fmt: skip
    vmm = vms.booted("c1")
    vmm.pause()
    with pytest.raises(errors.VmmUnavailable, match="Permission denied") as info:
        vmm.save_snapshot(files_in(vms.tmp_path / "snap"))
    assert info.value.line().startswith("Firecracker could not create the snapshot: ")
    assert vmm.instance_info()["state"] == "Paused"
    vmm.resume()
    assert vmm.instance_info()["state"] == "Running"


@pytest.mark.unit
def test_a_snapshot_resets_the_live_agent_connection(vms: Vms) -> None:
    """Stand-in for Firecracker's vsock (not Firecracker): Firecracker queues a vsock
    transport reset at every snapshot, so the agent connection of a VM that goes on
    after a save is closed once it runs again - the host must connect anew."""
    vmm = vms.booted("v1")

    async def go() -> bytes:
        reader, writer = await vmm.open_agent_stream(timeout=5)
        writer.write(b"before")
        await writer.drain()
        assert await reader.readexactly(6) == b"before"
        vmm.pause()
        vmm.save_snapshot(files_in(vms.tmp_path / "snap"))
        vmm.resume()
        rest = await asyncio.wait_for(reader.read(), 5)  # EOF: the guest reset it
        writer.close()
        return rest

    assert asyncio.run(go()) == b""
    assert connect(vmm, b"after") == b"after"  # a new connection works


# -- restore ---------------------------------------------------------------------------


@pytest.mark.unit
def test_restore_file_call_order_and_body(vms: Vms) -> None:
    """Stand-in for Firecracker's API (not Firecracker): restore() on a fresh process
    sends PUT /logger, then PUT /snapshot/load (File backend, this VM's TAP and vsock
    socket as overrides, clock_realtime, dirty-page tracking, resume_vm false) and
    returns with the VM paused; the caller's open_agent_stream() resumes it (a paused
    guest cannot accept a vsock connection) and its resume() is then a no-op."""
    snap = vms.saved("a")
    memory_before = (sha(snap.memory), snap.memory.stat().st_mtime_ns)
    vmm = vms.make("b")
    n = len(vms.requests())
    vmm.restore(snap)
    assert vmm.vm_state == "paused" and vmm.instance_info()["state"] == "Paused"
    assert connect(vmm) == b"hello agent"
    reqs = vms.requests(n)
    assert calls(reqs) == ["PUT /logger", "PUT /snapshot/load", "GET /", "PATCH /vm"]
    assert reqs[1]["body"] == {
        "snapshot_path": str(snap.state),
        "mem_backend": {"backend_type": "File", "backend_path": str(snap.memory)},
        "resume_vm": False,
        "track_dirty_pages": True,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap-b"}],
        "vsock_override": {"uds_path": str(vms.tmp_path / "b" / "v.sock")},
        "clock_realtime": True,
    }
    assert reqs[3]["body"] == {"state": "Resumed"}
    for r in reqs:
        validate_against_spec(ApiRequest(r["method"], r["path"], r["body"]))
    assert len(guest_writes(vms.record)) == 2  # a's boot, b's first run: it ran
    # Mapped privately: b's guest wrote pages, the snapshot's memory file is untouched.
    assert (sha(snap.memory), snap.memory.stat().st_mtime_ns) == memory_before


@pytest.mark.unit
def test_restore_without_net_or_dirty_tracking(vms: Vms) -> None:
    """No TAP: no network override; config.extra track_dirty_pages=0: not tracked."""
    snap = vms.saved("a", net=False)
    vmm = vms.make("b", net=False, extra={"track_dirty_pages": "0"})
    n = len(vms.requests())
    vmm.restore(snap)
    body = vms.requests(n)[1]["body"]
    assert "network_overrides" not in body and "track_dirty_pages" not in body
    assert body["resume_vm"] is False and body["clock_realtime"] is True
    assert connect(vmm) == b"hello agent"


@pytest.mark.unit
def test_connect_to_a_paused_restore_is_not_answered(vms: Vms) -> None:
    """Stand-in for Firecracker's vsock (not Firecracker): why open_agent_stream resumes
    first - a CONNECT to a paused guest gets no OK, and is reset when the guest runs."""
    snap = vms.saved("a")
    vmm = vms.make("b")
    vmm.restore(snap)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(vmm.vsock_path))
        s.sendall(b"CONNECT 1024\n")
        time.sleep(0.2)
        vmm.resume()
        assert s.recv(100) == b""  # reset, never "OK"
    assert connect(vmm) == b"hello agent"


@pytest.mark.unit
def test_restored_vm_snapshots_again(vms: Vms) -> None:
    """Stand-in for Firecracker's API (not Firecracker): load -> resume -> pause ->
    create, the documented sequence, gives a snapshot that restores in turn."""
    a = vms.saved("a")
    b = vms.make("b")
    b.restore(a)
    connect(b)
    b.pause()
    s1 = files_in(vms.tmp_path / "s1")
    b.save_snapshot(s1)  # (no base: Full)
    assert sha(s1.memory) == sha(dumps(vms.memdump, "b")[-1])
    c = vms.make("c")
    c.restore(s1)
    assert connect(c) == b"hello agent"


# -- Diff snapshots --------------------------------------------------------------------


def _diff_path(files: SnapshotFiles) -> str:
    return str(files.memory.with_name(f".{files.memory.name}.diff-{os.getpid()}"))


@pytest.mark.unit
def test_diff_snapshot_merged_onto_its_base(vms: Vms) -> None:
    """Stand-in for Firecracker's API (not Firecracker): a VM restored from S0 (with
    dirty-page tracking) saves S1 with base=S0 as a Diff into a temporary file merged
    onto a copy of S0's memory: S1's memory is the guest's whole memory, S0 is
    untouched, the temporary file is gone; S2 with base=S1 is a Diff again."""
    s0 = vms.saved("a")
    s0_before = sha(s0.memory)
    b = vms.make("b")
    b.restore(s0)
    connect(b)
    b.pause()
    n = len(vms.requests())
    s1 = files_in(vms.tmp_path / "s1")
    b.save_snapshot(s1, base=s0)
    (create,) = vms.requests(n)
    assert create["body"] == {"snapshot_type": "Diff", "snapshot_path": str(s1.state),
                              "mem_file_path": _diff_path(s1)}  # fmt: skip
    assert sha(s1.memory) == sha(dumps(vms.memdump, "b")[-1])  # complete, not a layer
    assert sha(s0.memory) == s0_before
    assert sorted(p.name for p in s1.memory.parent.iterdir()) == ["memory", "vmstate"]
    # b's guest wrote few pages: S1 differs from S0 exactly there.
    written = set(guest_writes(vms.record)[-1])
    m0, m1 = s0.memory.read_bytes(), s1.memory.read_bytes()
    changed = {p for p in range(len(m0) // PAGE)
               if m0[p * PAGE : (p + 1) * PAGE] != m1[p * PAGE : (p + 1) * PAGE]}  # fmt: skip
    assert changed and changed <= written

    b.resume()
    b.pause()
    n = len(vms.requests())
    s2 = files_in(vms.tmp_path / "s2")
    b.save_snapshot(s2, base=s1)  # the dirty pages now count from S1
    assert vms.requests(n)[0]["body"]["snapshot_type"] == "Diff"
    assert sha(s2.memory) == sha(dumps(vms.memdump, "b")[-1])

    c = vms.make("c")  # and the merged snapshot restores
    c.restore(s2)
    assert connect(c) == b"hello agent"


@pytest.mark.unit
def test_diff_of_a_booted_vm_after_its_first_save(vms: Vms) -> None:
    """A booted VM with track_dirty_pages: its first save is Full (nothing to diff
    against), the next one with that save as base is a Diff."""
    a = vms.booted("a", extra={"track_dirty_pages": "1"})
    assert vms.requests()[2]["body"]["track_dirty_pages"] is True
    a.pause()
    s0 = files_in(vms.tmp_path / "s0")
    a.save_snapshot(s0, base=None)
    a.resume()
    a.pause()
    n = len(vms.requests())
    s1 = files_in(vms.tmp_path / "s1")
    a.save_snapshot(s1, base=s0)
    assert vms.requests(n)[0]["body"]["snapshot_type"] == "Diff"
    assert sha(s1.memory) == sha(dumps(vms.memdump, "a")[-1])


def _restored(vms: Vms, **kw: Any) -> tuple[FirecrackerVmm, SnapshotFiles]:
    s0 = vms.saved("a")
    b = vms.make("b", **kw)
    b.restore(s0)
    connect(b)
    b.pause()
    return b, s0


def _save(
    vms: Vms, vmm: FirecrackerVmm, base: SnapshotFiles | None
) -> tuple[list[str], SnapshotFiles]:
    """save_snapshot into new files: the snapshot types sent, and the files (checked to
    be the guest's whole memory, with no temporary diff left)."""
    n = len(vms.requests())
    files = files_in(vms.tmp_path / f"out{n}")
    vmm.save_snapshot(files, base=base)
    assert sha(files.memory) == sha(dumps(vms.memdump, vmm.config.vm_id)[-1])
    assert not list(files.memory.parent.glob(".memory.diff-*"))
    return [r["body"]["snapshot_type"] for r in vms.requests(n)], files  # fmt: skip


def _save_kind(vms: Vms, vmm: FirecrackerVmm, base: SnapshotFiles | None) -> list[str]:
    return _save(vms, vmm, base)[0]


@pytest.mark.unit
def test_full_without_a_base(vms: Vms) -> None:
    b, _s0 = _restored(vms)
    assert _save_kind(vms, b, None) == ["Full"]


@pytest.mark.unit
def test_full_without_dirty_tracking(vms: Vms) -> None:
    b, s0 = _restored(vms, extra={"track_dirty_pages": "0"})
    assert _save_kind(vms, b, s0) == ["Full"]


@pytest.mark.unit
def test_full_against_a_base_the_dirty_pages_do_not_count_from(vms: Vms) -> None:
    """Saved once since the restore: the dirty pages count from that save, so a Diff
    against the original base would miss pages; an unrelated base likewise."""
    b, s0 = _restored(vms)
    assert _save_kind(vms, b, s0) == ["Diff"]
    b.resume()
    b.pause()
    assert _save_kind(vms, b, s0) == ["Full"]
    other = vms.saved("x")
    assert _save_kind(vms, b, other) == ["Full"]


@pytest.mark.unit
def test_full_where_holes_cannot_be_trusted(vms: Vms, monkeypatch: pytest.MonkeyPatch) -> None:
    b, s0 = _restored(vms)
    monkeypatch.setattr(fc_diff, "holes_unreliable", lambda d: "holes are data here")
    assert _save_kind(vms, b, s0) == ["Full"]


@pytest.mark.unit
def test_full_when_firecracker_refuses_the_diff(vms: Vms) -> None:
    """Our idea of dirty tracking is wrong (Firecracker has it off): the Diff is refused
    and the save is Full, not an error."""
    b, s0 = _restored(vms, extra={"track_dirty_pages": "0"})
    st = os.stat(s0.memory)
    b.dirty_tracking = True
    b._dirty_since = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    assert _save_kind(vms, b, s0) == ["Diff", "Full"]


@pytest.mark.unit
def test_full_when_the_merge_fails(vms: Vms, monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge that fails after the Diff was taken: the VM is still paused, so a Full
    replaces it; later Diffs count from that Full."""
    b, s0 = _restored(vms)

    def broken(base: Path, diff: Path, out: Path) -> fc_diff.MergeStats:
        out.write_bytes(b"half")
        raise fc_diff.MergeError("simulated")

    monkeypatch.setattr(fc_diff, "merge", broken)
    kinds, full = _save(vms, b, s0)
    assert kinds == ["Diff", "Full"]
    monkeypatch.undo()
    b.resume()
    b.pause()
    assert _save_kind(vms, b, full) == ["Diff"]


@pytest.mark.unit
def test_never_writes_over_the_memory_it_runs_from(vms: Vms) -> None:
    b, s0 = _restored(vms)
    n = len(vms.requests())
    for target in (s0, SnapshotFiles(s0.memory, vms.tmp_path / "other-state")):
        with pytest.raises(errors.VmmUnavailable, match="will not write a snapshot over"):
            b.save_snapshot(target, base=s0)
    assert vms.requests(n) == []


# -- restore failures ------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "missing,message",
    [
        ("state", f"{LOAD_FAILED}{STATE_FROM_FILE}Failed to open snapshot file: "
                  "No such file or directory (os error 2)"),
        ("memory", f"{LOAD_FAILED}{FROM_FILE}Failed to load guest memory: "
                   "No such file or directory (os error 2)"),
    ],
    ids=["no-state-file", "no-memory-file"],
)  # fmt: skip
def test_load_refused_stops_the_vmm_with_one_line(vms: Vms, missing: str, message: str) -> None:
    """Stand-in for Firecracker's API (not Firecracker): a refused load is one
    VmmUnavailable line quoting Firecracker; its process is gone (Firecracker ends
    itself after a failed load, and fcvm stops it anyway)."""
    snap = vms.saved("a")
    (snap.state if missing == "state" else snap.memory).unlink()
    vmm = vms.make("b")
    with pytest.raises(errors.VmmUnavailable) as info:
        vmm.restore(snap)
    err = info.value
    assert str(err) == f"Firecracker could not load the snapshot: {message}"
    line = err.line()
    assert "\n" not in line and line.count(message) == 1
    assert EXITING in line  # Firecracker's own last words, from its log file
    assert vmm.poll() is not None and vmm.vm_state == "none"
    assert not vmm.api_socket.exists() or vmm.poll() is not None


@pytest.mark.unit
def test_firecracker_exiting_mid_load(vms: Vms, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in for Firecracker (not Firecracker) killed while loading: one line naming
    the request and the signal, with what Firecracker logged last."""
    snap = vms.saved("a")
    monkeypatch.setenv("FCVM_STANDIN_DIE_DURING", "PUT /snapshot/load")
    vmm = vms.make("b")
    with pytest.raises(errors.VmmUnavailable) as info:
        vmm.restore(snap)
    line = info.value.line()
    assert line.startswith("Firecracker could not load the snapshot: firecracker was killed "
                           "by SIGKILL during PUT /snapshot/load")  # fmt: skip
    assert "simulated crash during PUT /snapshot/load" in line and "\n" not in line
    assert vmm.poll() is not None


@pytest.mark.unit
def test_standin_load_rules(tmp_path: Path) -> None:
    """The stand-in itself (threaded): load only before boot-specific resources (the
    logger is fine), and not fatal then; create and PATCH /vm not before start."""
    sock = tmp_path / "api.sock"
    standin = Standin("x", None, {})
    server = serve_in_thread(sock, standin)
    client = ApiClient(sock, timeout=2)
    log = tmp_path / "fc.log"
    log.touch()
    try:
        client.send(fc_api.logger_request(log))
        with pytest.raises(FirecrackerApiError, match="before starting"):
            client.send(fc_api.snapshot_create_request(tmp_path / "m", tmp_path / "s"))
        client.send(fc_api.boot_source_request(Path("/k"), "console=ttyS0"))
        with pytest.raises(FirecrackerApiError) as info:
            client.send(fc_api.snapshot_load_request(tmp_path / "s", tmp_path / "m"))
        assert info.value.fault_message == LOAD_AFTER_CONFIG
        assert not standin.fatal
        assert "Received Error. Status code: 400 Bad Request. Message: " in log.read_text()
    finally:
        client.close()
        server.shutdown()
        server.server_close()


@pytest.mark.unit
def test_failure_detail_quotes_firecracker_errors(tmp_path: Path) -> None:
    vmm = FirecrackerVmm(config_for(tmp_path), binary=Path("/bin/true"))
    vmm.config.workdir.mkdir(parents=True)
    vmm.vmm_log_path.write_text(
        "2025-01-01T00:00:00.000000001 [t1:main:INFO] Running Firecracker v1.17.0\n"
        "2025-01-01T00:00:00.000000002 [t1:fc_api:ERROR] Received Error. Status code: 400 "
        "Bad Request. Message: Load snapshot error: boom\n"
        "2025-01-01T00:00:00.000000003 [t1:fc_vcpu 0:ERROR:src/vmm/src/vstate/vcpu.rs:1] "
        "Unexpected exit reason on vcpu run: Shutdown\n"
        "2025-01-01T00:00:00.000000004 [t1:main:ERROR] Firecracker exiting with error. "
        "exit_code=1\n"
    )
    vmm.log_path.write_text("Error: RunWithApi(...)\n")
    detail = vmm.failure_detail()
    assert detail == (
        "Received Error. Status code: 400 Bad Request. Message: Load snapshot error: boom | "
        "Unexpected exit reason on vcpu run: Shutdown | "
        "Firecracker exiting with error. exit_code=1 | Error: RunWithApi(...)"
    )
    assert "Running Firecracker" not in detail


# -- the client --------------------------------------------------------------------------


@pytest.mark.unit
def test_api_client_against_threaded_standin(tmp_path: Path) -> None:
    """Stand-in API server in a thread (not Firecracker): fcvm's HTTP client maps
    answers to results and errors."""
    sock = tmp_path / "api.sock"
    standin = Standin("x", None, {"PUT /entropy": [500, "Internal error."]})
    server = serve_in_thread(sock, standin)
    client = ApiClient(sock, timeout=2)
    try:
        assert client.send(fc_api.instance_info_request())["state"] == "Not started"
        assert client.send(fc_api.boot_source_request(Path("/k"), "console=ttyS0")) is None
        with pytest.raises(FirecrackerApiError) as info:
            client.send(fc_api.vm_state_request("Paused"))
        assert info.value.status == 400
        assert "not supported before starting the microVM" in info.value.fault_message
        with pytest.raises(FirecrackerApiError, match=r"HTTP 500\): Internal error\.$"):
            client.send(fc_api.entropy_request())
        assert client.send(fc_api.instance_start_request()) is None
        with pytest.raises(FirecrackerApiError, match="after starting the microVM"):
            client.send(fc_api.machine_config_request(config_for(tmp_path)))
    finally:
        client.close()
        server.shutdown()
        server.server_close()
    assert [r["path"] for r in standin.requests][:2] == ["/", "/boot-source"]


@pytest.mark.unit
def test_api_client_without_server(tmp_path: Path) -> None:
    client = ApiClient(tmp_path / "missing.sock", timeout=1)
    with pytest.raises(errors.VmmUnavailable, match="did not answer PATCH /vm"):
        client.send(fc_api.vm_state_request("Paused"))
    client.close()


@pytest.mark.unit
def test_fault_message_parsing() -> None:
    assert fc_api.fault_message(400, '{"fault_message": "bad"}') == "bad"
    assert fc_api.fault_message(500, "plain\ntext") == "plain text"
    assert fc_api.fault_message(502, "") == "no error body (HTTP 502)"


@pytest.mark.unit
def test_socket_path_too_long(tmp_path: Path) -> None:
    cfg = config_for(tmp_path)
    long_dir = tmp_path / ("d" * 120)
    cfg = VmConfig(**{**cfg.__dict__, "workdir": long_dir})
    vmm = FirecrackerVmm(cfg, binary=Path("/bin/true"))
    with pytest.raises(errors.VmmUnavailable, match="too long"):
        vmm.start()


@pytest.mark.unit
def test_two_root_drives_are_refused(tmp_path: Path) -> None:
    cfg = config_for(tmp_path)
    cfg = VmConfig(
        **{**cfg.__dict__, "drives": (Drive("a", tmp_path / "a", is_root=True),
                                      Drive("b", tmp_path / "b", is_root=True))}
    )  # fmt: skip
    with pytest.raises(errors.UsageError, match="more than one root drive"):
        FirecrackerVmm(cfg, binary=Path("/bin/true")).start()


@pytest.mark.unit
def test_patch_drive_after_boot(vms: Vms) -> None:
    vmm = vms.booted("d1")
    vmm.update_drive("root", vms.tmp_path / "clone.ext4")
    assert vms.requests()[-1] == {"method": "PATCH", "path": "/drives/root", "body": {
        "drive_id": "root", "path_on_host": str(vms.tmp_path / "clone.ext4")}}  # fmt: skip


@pytest.mark.vm
def test_real_firecracker_boot(tmp_path: Path) -> None:
    """The whole boot path with a real Firecracker: only where a firecracker binary
    and a KVM that can run a stock kernel exist (skips with the reason otherwise)."""
    try:
        select.plan("firecracker")
    except errors.FcvmError as exc:
        pytest.skip(exc.line())
    from fcvm.assets import resolve_assets

    try:
        assets = resolve_assets()
    except errors.FcvmError as exc:
        pytest.skip(f"guest assets missing: {exc.line()}")
    workdir = tmp_path / "vm"
    config = VmConfig(
        vm_id="fctest",
        workdir=workdir,
        kernel=assets.vmlinux,
        initrd=assets.initrd,
        vcpus=1,
        mem_mib=512,
        drives=(Drive("root", assets.rootfs, read_only=True, is_root=True),),
        console_log=workdir / "console.log",
    )
    vmm = FirecrackerVmm(config)
    try:
        vmm.start()

        async def connect() -> None:
            _reader, writer = await vmm.open_agent_stream(timeout=60)
            writer.close()

        asyncio.run(connect())
        assert vmm.poll() is None
        assert vmm.instance_info()["state"] == "Running"
    finally:
        vmm.stop(timeout=5)
    assert vmm.poll() is not None
    shutil.rmtree(workdir, ignore_errors=True)
