"""Firecracker's REST API, fcvm's side: one request builder per endpoint, one client.

Every request fcvm sends to Firecracker is built by exactly one function below
(listed in ENDPOINT_BUILDERS), each returning an `ApiRequest` (method, path,
JSON body). The unit tests validate every body these builders can produce against
the operation's body schema in Firecracker's own Swagger document
(`vmm/data/firecracker-api.yaml`, a copy of shared/firecracker/firecracker-api.yaml,
Firecracker 1.17-dev).

`ApiClient` speaks HTTP over Firecracker's API Unix socket with httpx. Any non-2xx
answer becomes a `FirecrackerApiError` carrying Firecracker's `fault_message`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fcvm import errors
from fcvm.vmm.base import Drive, NetIface, VmConfig

SPEC_FILE = Path(__file__).parent / "data" / "firecracker-api.yaml"

# (cryptomgr.notests: no boot-time crypto self-tests, see qemu.BASE_CMDLINE)
BASE_BOOT_ARGS = ("console=ttyS0", "reboot=k", "panic=1", "pci=off", "cryptomgr.notests")
GUEST_CID = 3
DEFAULT_IFACE_ID = "eth0"

SnapshotType = Literal["Full", "Diff"]
MemBackendType = Literal["File", "Uffd"]
LogLevel = Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"]


@dataclass(frozen=True)
class ApiRequest:
    method: Literal["GET", "PUT", "PATCH"]
    path: str
    body: dict[str, Any] | None = field(default=None)

    def describe(self) -> str:
        return f"{self.method} {self.path}"


class FirecrackerApiError(errors.VmmUnavailable):
    """Firecracker answered a request with a non-2xx status."""

    def __init__(self, request: ApiRequest, status: int, fault_message: str) -> None:
        super().__init__(
            f"Firecracker rejected {request.describe()} (HTTP {status}): {fault_message}"
        )
        self.request = request
        self.status = status
        self.fault_message = fault_message


# --- request builders: one per endpoint -------------------------------------------


def boot_args(config: VmConfig, vsock_port: int) -> str:
    """Kernel command line: Firecracker basics, the caller's extras, the agent transport."""
    args = list(BASE_BOOT_ARGS)
    args.extend(config.cmdline_extra)
    if not any(a.startswith("fcvm.transport=") for a in config.cmdline_extra):
        args.append("fcvm.transport=vsock")
    if not any(a.startswith("fcvm.port=") for a in config.cmdline_extra):
        args.append(f"fcvm.port={vsock_port}")
    return " ".join(args)


def boot_source_request(kernel: Path, boot_args: str, initrd: Path | None = None) -> ApiRequest:
    body: dict[str, Any] = {"kernel_image_path": str(kernel), "boot_args": boot_args}
    if initrd is not None:
        body["initrd_path"] = str(initrd)
    return ApiRequest("PUT", "/boot-source", body)


def machine_config_request(config: VmConfig, *, track_dirty_pages: bool = False) -> ApiRequest:
    body: dict[str, Any] = {"vcpu_count": config.vcpus, "mem_size_mib": config.mem_mib}
    if track_dirty_pages:
        body["track_dirty_pages"] = True
    return ApiRequest("PUT", "/machine-config", body)


def drive_request(drive: Drive) -> ApiRequest:
    body = {
        "drive_id": drive.drive_id,
        "path_on_host": str(drive.path),
        "is_root_device": drive.is_root,
        "is_read_only": drive.read_only,
    }
    return ApiRequest("PUT", f"/drives/{drive.drive_id}", body)


def drive_update_request(drive_id: str, path: Path) -> ApiRequest:
    """Post-boot (or post-restore): point a drive at another backing file."""
    return ApiRequest(
        "PATCH", f"/drives/{drive_id}", {"drive_id": drive_id, "path_on_host": str(path)}
    )


def network_interface_request(net: NetIface, iface_id: str = DEFAULT_IFACE_ID) -> ApiRequest:
    body = {"iface_id": iface_id, "host_dev_name": net.tap, "guest_mac": net.mac}
    return ApiRequest("PUT", f"/network-interfaces/{iface_id}", body)


def vsock_request(uds_path: Path, guest_cid: int = GUEST_CID) -> ApiRequest:
    return ApiRequest("PUT", "/vsock", {"guest_cid": guest_cid, "uds_path": str(uds_path)})


def entropy_request() -> ApiRequest:
    return ApiRequest("PUT", "/entropy", {})


def serial_request(serial_out_path: Path) -> ApiRequest:
    return ApiRequest("PUT", "/serial", {"serial_out_path": str(serial_out_path)})


def logger_request(log_path: Path, level: LogLevel = "Warning") -> ApiRequest:
    body = {"log_path": str(log_path), "level": level, "show_level": True}
    return ApiRequest("PUT", "/logger", body)


def instance_start_request() -> ApiRequest:
    return ApiRequest("PUT", "/actions", {"action_type": "InstanceStart"})


def vm_state_request(state: Literal["Paused", "Resumed"]) -> ApiRequest:
    return ApiRequest("PATCH", "/vm", {"state": state})


def snapshot_create_request(
    mem_path: Path, state_path: Path, snapshot_type: SnapshotType = "Full"
) -> ApiRequest:
    body = {
        "snapshot_type": snapshot_type,
        "snapshot_path": str(state_path),
        "mem_file_path": str(mem_path),
    }
    return ApiRequest("PUT", "/snapshot/create", body)


def snapshot_load_request(
    state_path: Path,
    mem_backend_path: Path,
    *,
    mem_backend_type: MemBackendType = "File",
    resume_vm: bool = False,
    track_dirty_pages: bool = False,
    network_overrides: Mapping[str, str] | None = None,
    vsock_override: Path | None = None,
    clock_realtime: bool = False,
) -> ApiRequest:
    """mem_backend_path: the memory file (File, mapped privately) or the page server's
    Unix socket (Uffd). resume_vm false leaves the loaded VM paused. track_dirty_pages:
    Diff snapshots can be taken of the loaded VM (it is not saved in a snapshot, so a
    load must ask again). network_overrides: iface_id -> this VM's TAP. clock_realtime
    (x86_64): kvmclock advanced by the wall-clock time since the snapshot."""
    body: dict[str, Any] = {
        "snapshot_path": str(state_path),
        "mem_backend": {"backend_type": mem_backend_type, "backend_path": str(mem_backend_path)},
        "resume_vm": resume_vm,
    }
    if track_dirty_pages:
        body["track_dirty_pages"] = True
    if network_overrides:
        body["network_overrides"] = [
            {"iface_id": iface, "host_dev_name": tap} for iface, tap in network_overrides.items()
        ]
    if vsock_override is not None:
        body["vsock_override"] = {"uds_path": str(vsock_override)}
    if clock_realtime:
        body["clock_realtime"] = True
    return ApiRequest("PUT", "/snapshot/load", body)


def instance_info_request() -> ApiRequest:
    return ApiRequest("GET", "/")


ENDPOINT_BUILDERS: tuple[Callable[..., ApiRequest], ...] = (
    boot_source_request,
    machine_config_request,
    drive_request,
    drive_update_request,
    network_interface_request,
    vsock_request,
    entropy_request,
    serial_request,
    logger_request,
    instance_start_request,
    vm_state_request,
    snapshot_create_request,
    snapshot_load_request,
    instance_info_request,
)


def boot_requests(
    config: VmConfig,
    *,
    vsock_path: Path,
    vsock_port: int,
    log_path: Path | None = None,
    log_level: LogLevel = "Warning",
    track_dirty_pages: bool = False,
) -> list[ApiRequest]:
    """Everything sent for a fresh boot, in order; InstanceStart is last."""
    reqs: list[ApiRequest] = []
    if log_path is not None:
        reqs.append(logger_request(log_path, log_level))
    reqs.append(boot_source_request(config.kernel, boot_args(config, vsock_port), config.initrd))
    reqs.append(machine_config_request(config, track_dirty_pages=track_dirty_pages))
    roots = [d for d in config.drives if d.is_root]
    if len(roots) > 1:
        raise errors.UsageError(f"more than one root drive: {', '.join(d.drive_id for d in roots)}")
    reqs.extend(drive_request(d) for d in drives_in_boot_order(config.drives))
    if config.net is not None:
        reqs.append(network_interface_request(config.net))
    reqs.append(vsock_request(vsock_path))
    reqs.append(entropy_request())
    if config.console_log is not None:
        reqs.append(serial_request(config.console_log))
    reqs.append(instance_start_request())
    return reqs


# --- the client -------------------------------------------------------------------


def fault_message(status: int, text: str) -> str:
    """Firecracker's `fault_message` from an error body, else the raw text."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("fault_message"), str):
        return str(data["fault_message"])
    text = " ".join(text.split())
    return text[:300] if text else f"no error body (HTTP {status})"


class ApiClient:
    """Blocking HTTP client on Firecracker's API socket."""

    def __init__(self, socket_path: Path, timeout: float = 10.0) -> None:
        import httpx  # heavy-ish import, only when a Firecracker VM is driven

        self.socket_path = socket_path
        self._httpx = httpx
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)),
            base_url="http://localhost",
            timeout=timeout,
        )

    def send(self, request: ApiRequest, timeout: float | None = None) -> Any:
        """Send one request; return the decoded JSON body (None when empty)."""
        kwargs: dict[str, Any] = {}
        if request.body is not None:
            kwargs["json"] = request.body
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            resp = self._client.request(request.method, request.path, **kwargs)
        except self._httpx.HTTPError as exc:
            raise errors.VmmUnavailable(
                f"Firecracker API {self.socket_path} did not answer {request.describe()}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not 200 <= resp.status_code < 300:
            raise FirecrackerApiError(
                request, resp.status_code, fault_message(resp.status_code, resp.text)
            )
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            return resp.text

    def close(self) -> None:
        self._client.close()


def overrides_for(net: NetIface | None, iface_id: str = DEFAULT_IFACE_ID) -> dict[str, str]:
    return {iface_id: net.tap} if net is not None else {}


def drives_in_boot_order(drives: Sequence[Drive]) -> list[Drive]:
    return [d for d in drives if d.is_root] + [d for d in drives if not d.is_root]
