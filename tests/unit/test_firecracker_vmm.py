"""FirecrackerVmm against a stand-in for Firecracker's API server.

There is no Firecracker binary on these machines, so Firecracker's side of the
contract is played by `Standin`, a real HTTP/1.1 server on a Unix socket that
follows Firecracker's documented behaviour where fcvm depends on it (pre-boot-only
resources, InstanceStart needing a boot source, PATCH /vm only after boot,
snapshot/create only while paused, snapshot/load only on a fresh process, errors
as `{"fault_message": ...}`, the vsock `CONNECT <port>` / `OK <n>` handshake).
These tests check fcvm's side of the contract: what it launches, what it sends
and in which order, and how it reports failures. They do not test Firecracker.

The same module is the stand-in "firecracker" executable: run as a script
(``python test_firecracker_vmm.py --api-sock S --id ID``) it serves the stand-in
until SIGTERM, appending every request to $FCVM_STANDIN_RECORD as JSON lines.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path
from typing import Any

# --- the stand-in (stdlib only: it also runs as a separate process) --------------

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
NOT_PAUSED = "Create snapshot error: Cannot save the microVM state: The microVM is not paused."
LOAD_AFTER_CONFIG = (
    "Loading a microVM snapshot not allowed after configuring boot-specific resources."
)


def fault(message: str, status: int = 400) -> tuple[int, dict[str, Any]]:
    return status, {"fault_message": message}


class Standin:
    """What the API server of one Firecracker process remembers."""

    def __init__(self, vm_id: str, record: Path | None, faults: dict[str, list[Any]]) -> None:
        self.vm_id = vm_id
        self.record = record
        self.faults = faults
        self.state = NOT_STARTED
        self.configured: list[str] = []
        self.vsock_uds: str | None = None
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, dict[str, Any] | None]:
        with self.lock:
            try:
                body = json.loads(raw) if raw else None
            except ValueError as exc:
                return fault(f"An error occurred when deserializing the json body: {exc}.")
            entry = {"method": method, "path": path, "body": body}
            self.requests.append(entry)
            if self.record is not None:
                with self.record.open("a") as f:
                    f.write(json.dumps(entry) + "\n")
            injected = self.faults.get(f"{method} {path}")
            if injected is not None:
                return fault(str(injected[1]), int(injected[0]))
            return self._dispatch(method, path, body)

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
            if path == "/vsock":
                self.vsock_uds = body["uds_path"]
            self.configured.append(path)
            return 204, None
        if method == "PUT" and path == "/actions":
            action = (body or {}).get("action_type")
            if action != "InstanceStart":
                return 400, {"fault_message": f"unsupported action {action}"}
            if self.state != NOT_STARTED:
                return fault(AFTER_START)
            if "/boot-source" not in self.configured:
                return fault(NO_KERNEL)
            self.state = RUNNING
            self._serve_vsock()
            return 204, None
        if method == "PATCH" and path == "/vm":
            if self.state == NOT_STARTED:
                return fault(BEFORE_START)
            self.state = PAUSED if body["state"] == "Paused" else RUNNING
            return 204, None
        if method == "PUT" and path == "/snapshot/create":
            if self.state != PAUSED:
                return fault(NOT_PAUSED)
            Path(body["snapshot_path"]).write_bytes(b"vmstate")
            Path(body["mem_file_path"]).write_bytes(b"memory")
            return 204, None
        if method == "PATCH" and path.startswith("/drives/"):
            if self.state == NOT_STARTED:
                return fault(BEFORE_START)
            return 204, None
        return 400, {"fault_message": f"Invalid request method and/or path: {method} {path}."}

    def _load(self, body: Any) -> tuple[int, dict[str, Any] | None]:
        if [c for c in self.configured if c != "/logger"]:
            return fault(LOAD_AFTER_CONFIG)
        self.vsock_uds = (body.get("vsock_override") or {}).get("uds_path")
        self.state = RUNNING if body.get("resume_vm") else PAUSED
        self._serve_vsock()
        return 204, None

    def _serve_vsock(self) -> None:
        """Host-initiated vsock: `CONNECT <port>\\n` -> `OK <host port>\\n`, then the
        "guest" echoes bytes back."""
        if self.vsock_uds is None:
            return
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(self.vsock_uds)
        srv.listen(4)

        def conn(c: socket.socket) -> None:
            with c:
                f = c.makefile("rb")
                line = f.readline()
                if not line.startswith(b"CONNECT "):
                    return
                c.sendall(b"OK 1073741824\n")
                while data := c.recv(65536):
                    c.sendall(data)

        def accept() -> None:
            while True:
                c, _ = srv.accept()
                threading.Thread(target=conn, args=(c,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()


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
    faults = json.loads(os.environ.get("FCVM_STANDIN_FAULTS") or "{}")
    print(f"stand-in firecracker {vm_id} pid {os.getpid()} argv {argv}", flush=True)
    if os.environ.get("FCVM_STANDIN_NOSOCKET"):
        time.sleep(3600)
    time.sleep(float(os.environ.get("FCVM_STANDIN_DELAY") or 0))
    standin = Standin(vm_id, Path(record) if record else None, faults)
    UnixHTTPServer(api_sock, make_handler(standin)).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)


# --- the tests --------------------------------------------------------------------

import pytest  # noqa: E402

from fcvm import errors  # noqa: E402
from fcvm.vmm import fc_api, select  # noqa: E402
from fcvm.vmm.base import Drive, NetIface, VmConfig  # noqa: E402
from fcvm.vmm.fc_api import ApiClient, ApiRequest, FirecrackerApiError  # noqa: E402
from fcvm.vmm.firecracker import FirecrackerVmm  # noqa: E402

from .test_firecracker_api import validate as validate_against_spec  # noqa: E402


def fake_firecracker(tmp_path: Path) -> Path:
    exe = tmp_path / "firecracker"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} "$@"\n')
    exe.chmod(0o755)
    return exe


def config_for(tmp_path: Path, *, net: bool = True, console: bool = True) -> VmConfig:
    workdir = tmp_path / "vm"
    return VmConfig(
        vm_id="t1",
        workdir=workdir,
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd",
        vcpus=1,
        mem_mib=256,
        drives=(
            Drive("image", tmp_path / "image.tar"),
            Drive("root", tmp_path / "rootfs.ext4", is_root=True),
        ),
        net=NetIface("tap-t1", "06:00:0a:00:00:02") if net else None,
        console_log=workdir / "console.log" if console else None,
    )


def recorded(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def standin_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    record = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FCVM_STANDIN_RECORD", str(record))
    monkeypatch.delenv("FCVM_STANDIN_FAULTS", raising=False)
    monkeypatch.delenv("FCVM_STANDIN_NOSOCKET", raising=False)
    monkeypatch.setenv("FCVM_STANDIN_DELAY", "0.1")  # the socket appears a little late
    return record


@pytest.mark.unit
def test_boot_sends_configuration_then_instance_start(tmp_path: Path, standin_env: Path) -> None:
    """Stand-in for Firecracker's API (not Firecracker): a boot launches the VMM with
    --api-sock/--id, configures everything, and sends InstanceStart last."""
    vmm = FirecrackerVmm(config_for(tmp_path), binary=fake_firecracker(tmp_path))
    try:
        vmm.start()
        assert vmm.pid is not None and vmm.poll() is None
        reqs = recorded(standin_env)
        calls = [f"{r['method']} {r['path']}" for r in reqs]
        assert calls == [
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
        assert reqs[6]["body"] == {"guest_cid": 3, "uds_path": str(tmp_path / "vm" / "v.sock")}
        assert reqs[5]["body"]["host_dev_name"] == "tap-t1"
        for r in reqs:  # what went over the wire matches the contract
            validate_against_spec(ApiRequest(r["method"], r["path"], r["body"]))
        log = (tmp_path / "vm" / "firecracker.log").read_text()
        assert "--api-sock" in log and str(tmp_path / "vm" / "fc.sock") in log and "'t1'" in log
        assert (tmp_path / "vm" / "console.log").exists()  # created for serial_out_path
        assert vmm.instance_info()["state"] == "Running"
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
    assert "PUT /actions" not in [f"{r['method']} {r['path']}" for r in recorded(standin_env)]


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
def test_pause_snapshot_resume_patch_drive(tmp_path: Path, standin_env: Path) -> None:
    """Stand-in for Firecracker's API (not Firecracker): the snapshot calls and their
    bodies; snapshot/create while running is refused and reported."""
    vmm = FirecrackerVmm(config_for(tmp_path), binary=fake_firecracker(tmp_path))
    try:
        vmm.start()
        with pytest.raises(FirecrackerApiError, match="not paused"):
            vmm.snapshot_create(tmp_path / "mem", tmp_path / "state")
        vmm.pause()
        vmm.snapshot_create(tmp_path / "mem", tmp_path / "state", "Diff")
        vmm.update_drive("root", tmp_path / "clone.ext4")
        vmm.resume()
    finally:
        vmm.stop(timeout=2)
    reqs = recorded(standin_env)
    tail = [(r["method"], r["path"], r["body"]) for r in reqs[-5:]]
    assert tail == [
        ("PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": str(tmp_path / "state"), "mem_file_path": str(tmp_path / "mem")}),  # noqa: E501
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PUT", "/snapshot/create", {"snapshot_type": "Diff", "snapshot_path": str(tmp_path / "state"), "mem_file_path": str(tmp_path / "mem")}),  # noqa: E501
        ("PATCH", "/drives/root", {"drive_id": "root", "path_on_host": str(tmp_path / "clone.ext4")}),  # noqa: E501
        ("PATCH", "/vm", {"state": "Resumed"}),
    ]  # fmt: skip
    assert (tmp_path / "mem").read_bytes() == b"memory"


@pytest.mark.unit
@pytest.mark.parametrize("backend", ["File", "Uffd"])
def test_snapshot_load_on_fresh_process(tmp_path: Path, standin_env: Path, backend: str) -> None:
    """Stand-in for Firecracker's API (not Firecracker): a clone loads the snapshot
    on a fresh process with its own TAP and vsock socket as overrides, and its
    agent stream works through the overridden vsock socket."""
    vmm = FirecrackerVmm(config_for(tmp_path), binary=fake_firecracker(tmp_path))
    mem = tmp_path / ("mem" if backend == "File" else "pageserver.sock")
    try:
        vmm.snapshot_load(tmp_path / "state", mem, mem_backend_type=backend)  # type: ignore[arg-type]
        assert vmm.instance_info()["state"] == "Running"

        async def echo() -> bytes:
            reader, writer = await vmm.open_agent_stream(timeout=5)
            writer.write(b"hello agent")
            await writer.drain()
            data = await reader.readexactly(11)
            writer.close()
            return data

        assert asyncio.run(echo()) == b"hello agent"
    finally:
        vmm.stop(timeout=2)
    reqs = recorded(standin_env)
    assert [r["path"] for r in reqs] == ["/logger", "/snapshot/load", "/"]
    assert reqs[1]["body"] == {
        "snapshot_path": str(tmp_path / "state"),
        "mem_backend": {"backend_type": backend, "backend_path": str(mem)},
        "resume_vm": True,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap-t1"}],
        "vsock_override": {"uds_path": str(tmp_path / "vm" / "v.sock")},
    }


@pytest.mark.unit
def test_agent_stream_after_boot(tmp_path: Path, standin_env: Path) -> None:
    """Stand-in for Firecracker's vsock (not Firecracker): open_agent_stream does the
    CONNECT handshake on <workdir>/v.sock and yields a working byte stream."""
    vmm = FirecrackerVmm(config_for(tmp_path), binary=fake_firecracker(tmp_path))

    async def echo() -> bytes:
        reader, writer = await vmm.open_agent_stream(timeout=5)
        writer.write(b"ping")
        await writer.drain()
        data = await reader.readexactly(4)
        writer.close()
        return data

    try:
        vmm.start()
        assert asyncio.run(echo()) == b"ping"
    finally:
        vmm.stop(timeout=2)


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
