"""Every request fcvm's Firecracker backend can send, checked against Firecracker's
own API contract (Swagger 2.0, shared/firecracker/firecracker-api.yaml, 1.17-dev).

For each request the operation is looked up by path *and* method in the document
(so a wrong endpoint or method fails), and the body is validated with jsonschema
against that operation's `in: body` parameter schema, resolving the Swagger
`#/definitions/X` references against the whole document.

Stricter than the document: Firecracker deserialises request bodies with serde's
`deny_unknown_fields`, so a misspelt optional field is a 400 there; the Swagger
definitions do not say `additionalProperties: false`, so these tests add it to
every object definition to catch such typos here.
"""

from __future__ import annotations

import copy
import inspect
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from fcvm.vmm import fc_api
from fcvm.vmm.base import Drive, NetIface, VmConfig
from fcvm.vmm.fc_api import ApiRequest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SHARED_SPEC = REPO.parent / "shared" / "firecracker" / "firecracker-api.yaml"
SPEC_URI = "urn:fcvm:firecracker-api"


def load_spec(strict: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(fc_api.SPEC_FILE.read_text())
    if strict:
        doc = copy.deepcopy(doc)
        for definition in doc["definitions"].values():
            if definition.get("type") == "object" and "properties" in definition:
                definition.setdefault("additionalProperties", False)
    return doc


SPEC = load_spec()
REGISTRY: Registry = Registry().with_resource(SPEC_URI, Resource(SPEC, specification=DRAFT4))


def _match_path(template: str, path: str) -> bool:
    pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
    return re.match(pattern, path) is not None


def find_operation(method: str, path: str) -> tuple[str, dict[str, Any]]:
    """(path template, operation) for a concrete path; AssertionError if none."""
    for template, item in SPEC["paths"].items():
        if _match_path(template, path):
            op = item.get(method.lower())
            assert op is not None, f"{method} {path}: {template} has no {method.lower()}"
            return template, op
    raise AssertionError(f"no path in the Firecracker API matches {path}")


def validate(req: ApiRequest) -> None:
    template, op = find_operation(req.method, req.path)
    params = op.get("parameters", [])
    body_params = [p for p in params if p.get("in") == "body"]
    if req.body is None:
        assert not any(p.get("required") for p in body_params), f"{template} needs a body"
        return
    assert body_params, f"{req.method} {template} takes no body"
    (schema,) = [p["schema"] for p in body_params]
    # Resolve `#/definitions/...` against the whole document.
    root = {"$ref": SPEC_URI + schema["$ref"]} if "$ref" in schema else schema
    validator = jsonschema.Draft4Validator(root, registry=REGISTRY)
    errs = sorted(validator.iter_errors(req.body), key=str)
    assert not errs, f"{req.method} {req.path}: " + "; ".join(e.message for e in errs)
    # Path parameters that name the resource must agree with the body's id.
    for p in params:
        if p.get("in") == "path" and p["name"] in req.body:
            assert req.path.rsplit("/", 1)[1] == req.body[p["name"]]


def make_config(
    tmp: Path = Path("/run/fcvm/vms/ab12"),
    *,
    net: bool = False,
    console: bool = False,
    drives: tuple[Drive, ...] | None = None,
) -> VmConfig:
    return VmConfig(
        vm_id="ab12",
        workdir=tmp,
        kernel=Path("/var/lib/fcvm/assets/k/vmlinux"),
        initrd=Path("/var/lib/fcvm/assets/i/initrd.img"),
        vcpus=2,
        mem_mib=1024,
        drives=drives
        or (
            Drive("image", Path("/tmp/img.tar"), read_only=True),
            Drive("root", Path("/var/lib/fcvm/assets/r/rootfs.ext4"), is_root=True),
            Drive("scratch", Path("/tmp/scratch.raw"), read_only=False),
        ),
        cmdline_extra=("fcvm.hostname=web", "quiet"),
        net=NetIface("tap-ab12", "06:00:ac:10:00:02") if net else None,
        console_log=tmp / "console.log" if console else None,
    )


P = Path
CASES: dict[str, ApiRequest] = {
    "boot-source": fc_api.boot_source_request(P("/k/vmlinux"), "console=ttyS0", P("/k/initrd")),
    "boot-source-no-initrd": fc_api.boot_source_request(P("/k/vmlinux"), "console=ttyS0"),
    "machine-config": fc_api.machine_config_request(make_config()),
    "machine-config-dirty": fc_api.machine_config_request(make_config(), track_dirty_pages=True),
    "drive-root-ro": fc_api.drive_request(Drive("root", P("/r.ext4"), True, is_root=True)),
    "drive-root-rw": fc_api.drive_request(Drive("root", P("/r.ext4"), False, is_root=True)),
    "drive-data-ro": fc_api.drive_request(Drive("image", P("/i.tar"), read_only=True)),
    "drive-data-rw": fc_api.drive_request(Drive("scratch", P("/s.raw"), read_only=False)),
    "drive-update": fc_api.drive_update_request("root", P("/clone/r.ext4")),
    "network-interface": fc_api.network_interface_request(NetIface("tap0", "06:00:00:00:00:01")),
    "vsock": fc_api.vsock_request(P("/run/v.sock")),
    "entropy": fc_api.entropy_request(),
    "serial": fc_api.serial_request(P("/run/console.log")),
    "logger": fc_api.logger_request(P("/run/fc.log")),
    "logger-debug": fc_api.logger_request(P("/run/fc.log"), "Debug"),
    "instance-start": fc_api.instance_start_request(),
    "pause": fc_api.vm_state_request("Paused"),
    "resume": fc_api.vm_state_request("Resumed"),
    "snapshot-create-full": fc_api.snapshot_create_request(P("/s/mem"), P("/s/vmstate")),
    "snapshot-create-diff": fc_api.snapshot_create_request(P("/s/mem"), P("/s/vmstate"), "Diff"),
    "snapshot-load-file": fc_api.snapshot_load_request(P("/s/vmstate"), P("/s/mem")),
    "snapshot-load-uffd": fc_api.snapshot_load_request(
        P("/s/vmstate"), P("/run/fcvm/serve/ps.sock"), mem_backend_type="Uffd", resume_vm=True
    ),
    "snapshot-load-overrides": fc_api.snapshot_load_request(
        P("/s/vmstate"),
        P("/s/mem"),
        resume_vm=True,
        track_dirty_pages=True,
        network_overrides={"eth0": "tap-clone1"},
        vsock_override=P("/run/clone1/v.sock"),
    ),
    "snapshot-load-uffd-overrides": fc_api.snapshot_load_request(
        P("/s/vmstate"),
        P("/run/ps.sock"),
        mem_backend_type="Uffd",
        network_overrides={"eth0": "tap-c2", "eth1": "tap-c2b"},
        vsock_override=P("/run/c2/v.sock"),
    ),
    "snapshot-load-restore-file": fc_api.snapshot_load_request(
        P("/s/vmstate"),
        P("/s/memory"),
        resume_vm=False,
        track_dirty_pages=True,
        network_overrides={"eth0": "tap-r1"},
        vsock_override=P("/run/r1/v.sock"),
        clock_realtime=True,
    ),
    "snapshot-load-restore-uffd": fc_api.snapshot_load_request(
        P("/s/vmstate"),
        P("/var/lib/fcvm/serve/snap.sock"),
        mem_backend_type="Uffd",
        resume_vm=False,
        track_dirty_pages=True,
        vsock_override=P("/run/r2/v.sock"),
        clock_realtime=True,
    ),
    "instance-info": fc_api.instance_info_request(),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_request_matches_firecracker_api(name: str) -> None:
    validate(CASES[name])


@pytest.mark.parametrize(
    "net,console", [(False, False), (True, False), (False, True), (True, True)]
)
def test_every_boot_request_matches_firecracker_api(net: bool, console: bool) -> None:
    config = make_config(net=net, console=console)
    reqs = fc_api.boot_requests(
        config,
        vsock_path=config.workdir / "v.sock",
        vsock_port=1024,
        log_path=config.workdir / "fc.log",
    )
    for req in reqs:
        validate(req)
    paths = [r.path for r in reqs]
    assert paths[-1] == "/actions" and reqs[-1].body == {"action_type": "InstanceStart"}
    assert ("/network-interfaces/eth0" in paths) == net
    assert ("/serial" in paths) == console
    drives = [r.body["drive_id"] for r in reqs if r.path.startswith("/drives/") and r.body]
    assert drives == ["root", "image", "scratch"]  # root first, then in order
    rw = {r.body["drive_id"]: r.body["is_read_only"] for r in reqs if r.path.startswith("/dri")}
    assert rw == {"root": True, "image": True, "scratch": False}


@pytest.mark.parametrize("backend", ["File", "Uffd"])
@pytest.mark.parametrize("resume_vm", [False, True])
@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("clock", [False, True])
@pytest.mark.parametrize("nets", [0, 1, 2])
@pytest.mark.parametrize("vsock", [False, True])
def test_every_snapshot_load_option_matches_firecracker_api(
    backend: fc_api.MemBackendType, resume_vm: bool, track: bool, clock: bool, nets: int,
    vsock: bool,
) -> None:  # fmt: skip
    """Every combination of snapshot_load_request's options is a valid body, and each
    option appears in it exactly as set."""
    overrides = {f"eth{i}": f"tap-x{i}" for i in range(nets)}
    req = fc_api.snapshot_load_request(
        P("/s/vmstate"),
        P("/s/mem"),
        mem_backend_type=backend,
        resume_vm=resume_vm,
        track_dirty_pages=track,
        network_overrides=overrides,
        vsock_override=P("/run/v.sock") if vsock else None,
        clock_realtime=clock,
    )
    validate(req)
    body = req.body or {}
    assert body["mem_backend"] == {"backend_type": backend, "backend_path": "/s/mem"}
    assert "mem_file_path" not in body  # deprecated, and exclusive with mem_backend
    assert body["resume_vm"] is resume_vm
    assert body.get("track_dirty_pages", False) is track
    assert "enable_diff_snapshots" not in body  # the deprecated name of the same thing
    assert body.get("clock_realtime", False) is clock
    assert body.get("network_overrides", []) == [
        {"iface_id": i, "host_dev_name": t} for i, t in overrides.items()
    ]
    assert ("vsock_override" in body) is vsock


@pytest.mark.parametrize("kind", ["Full", "Diff"])
def test_snapshot_create_matches_firecracker_api(kind: fc_api.SnapshotType) -> None:
    req = fc_api.snapshot_create_request(P("/s/m"), P("/s/v"), kind)
    validate(req)
    assert req.body == {"snapshot_type": kind, "snapshot_path": "/s/v", "mem_file_path": "/s/m"}


def test_every_builder_is_covered() -> None:
    """Each endpoint builder appears in CASES, so nothing is sent unvalidated."""
    covered = {
        fc_api.boot_source_request: "/boot-source",
        fc_api.machine_config_request: "/machine-config",
        fc_api.drive_request: "PUT /drives/",
        fc_api.drive_update_request: "PATCH /drives/",
        fc_api.network_interface_request: "/network-interfaces/",
        fc_api.vsock_request: "/vsock",
        fc_api.entropy_request: "/entropy",
        fc_api.serial_request: "/serial",
        fc_api.logger_request: "/logger",
        fc_api.instance_start_request: "/actions",
        fc_api.vm_state_request: "PATCH /vm",
        fc_api.snapshot_create_request: "/snapshot/create",
        fc_api.snapshot_load_request: "/snapshot/load",
        fc_api.instance_info_request: "GET /",
    }
    assert set(fc_api.ENDPOINT_BUILDERS) == set(covered)
    sent = [f"{r.method} {r.path}" for r in CASES.values()]
    for builder, needle in covered.items():
        assert any(needle in s for s in sent), f"{builder.__name__} not exercised"
    # And no other public *_request builder escaped the list.
    public = {
        f
        for n, f in inspect.getmembers(fc_api, inspect.isfunction)
        if n.endswith("_request") and f.__module__ == fc_api.__name__
    }
    assert public == set(fc_api.ENDPOINT_BUILDERS)


def test_boot_args() -> None:
    args = fc_api.boot_args(make_config(), 1024).split()
    assert args[:4] == ["console=ttyS0", "reboot=k", "panic=1", "pci=off"]
    assert "fcvm.hostname=web" in args and "quiet" in args
    assert args[-2:] == ["fcvm.transport=vsock", "fcvm.port=1024"]


@pytest.mark.parametrize(
    "req,fragment",
    [
        (ApiRequest("PATCH", "/boot-source", {"kernel_image_path": "/k"}), "no patch"),
        (ApiRequest("PUT", "/vm", {"state": "Paused"}), "no put"),
        (ApiRequest("PUT", "/snapshots/create", {}), "no path"),
        (ApiRequest("PUT", "/vm/config", {}), "no put"),
        (ApiRequest("PATCH", "/vm", {"state": "Running"}), "is not one of"),
        (ApiRequest("PUT", "/boot-source", {"kernel_path": "/k"}), "required"),
        (ApiRequest("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 1}), "minimum"),
        (
            ApiRequest("PUT", "/boot-source", {"kernel_image_path": "/k", "initrd": "/i"}),
            "Additional properties",
        ),
        (
            ApiRequest(
                "PUT",
                "/snapshot/load",
                {
                    "snapshot_path": "/s",
                    "mem_backend": {"backend_type": "Mmap", "backend_path": "/m"},
                },
            ),
            "is not one of",
        ),
        (ApiRequest("PUT", "/drives/root", {"drive_id": "other", "is_root_device": True}), ""),
        (ApiRequest("GET", "/", {"x": 1}), "takes no body"),
        (
            ApiRequest("PUT", "/snapshot/load", {"snapshot_path": "/s", "clock_real_time": True}),
            "Additional properties",
        ),
        (ApiRequest("PUT", "/snapshot/load", {"snapshot_path": "/s", "resume_vm": "no"}), "bool"),
        (
            ApiRequest(
                "PUT",
                "/snapshot/create",
                {"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Incremental"},
            ),
            "is not one of",
        ),
    ],
)
def test_validator_rejects_wrong_requests(req: ApiRequest, fragment: str) -> None:
    """The checker itself must fail on wrong endpoints, methods and bodies."""
    with pytest.raises(AssertionError) as info:
        validate(req)
    assert fragment in str(info.value)


def test_packaged_spec_is_the_shared_contract() -> None:
    if not SHARED_SPEC.exists():
        pytest.skip(f"{SHARED_SPEC} not present (checkout without ../shared)")
    assert fc_api.SPEC_FILE.read_bytes() == SHARED_SPEC.read_bytes()
