"""What the host asks the agent for: `ContainerSetup` (the container, up to its gate)
and `ProcessSpec` (a process: the container's own, an exec, or a guest command).

One type per request for both ends (stdlib only: the guest imports it). The host
builds it, `to_json()` puts it in a channel's metadata, and the agent reads it back
with `from_json()`. Both directions validate every field: anything not exactly right
is refused with a `SpecError` naming the field, never a traceback, and the agent
answers it with an `error` event (code 125) instead of running anything.

Modes of a ProcessSpec (see protocol.py): "container" starts the prepared container's
process (argv is final: the image's entrypoint and command already applied) or, when
it already runs (a VM restored from a startup snapshot), attaches to it; "exec" runs
a command in that container; "vm" runs one in the guest OS.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fcvm.agent import protocol as p
from fcvm.errors import UsageError

MODES = (p.MODE_CONTAINER, p.MODE_EXEC, p.MODE_VM)
MAX_ARGS = 4096
MAX_STRING = 64 * 1024
MAX_TERMINAL = 10_000  # rows/cols
# A spec travels in the metadata of one channel-opening frame (session/frame.py,
# MAX_PAYLOAD = 64 KiB) beside a few small fields: its JSON must fit.
MAX_SPEC_JSON = 60 * 1024

T = TypeVar("T")


class SpecError(UsageError, ValueError):
    """A process spec that cannot be run as given; the message says which field. (On
    the host, where the spec is made of the user's command line, a usage error.)"""


def _string(value: object, name: str, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{name} must be a string, not {type(value).__name__}")
    if not empty and not value:
        raise SpecError(f"{name} must not be empty")
    if len(value) > MAX_STRING:
        raise SpecError(f"{name} is {len(value)} characters long: at most {MAX_STRING}")
    if "\0" in value:
        raise SpecError(f"{name} contains a NUL character")
    return value


def _optional(value: object, name: str, check: Callable[[object, str], T]) -> T | None:
    return None if value is None else check(value, name)


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{name} must be true or false")
    return value


def _int(value: object, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SpecError(f"{name} must be a whole number from {low} to {high}")
    return value


def _number(value: object, name: str, low: float, high: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise SpecError(f"{name} must be a number")
    if not low < float(value) <= high:
        raise SpecError(f"{name} must be above {low} and at most {high}")
    return float(value)


def _strings(value: object, name: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise SpecError(f"{name} must be a list of strings")
    if len(value) > MAX_ARGS:
        raise SpecError(f"{name} has {len(value)} items: at most {MAX_ARGS}")
    return tuple(_string(v, f"{name}[{i}]") for i, v in enumerate(value))


def _env(value: object, name: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list | tuple) or len(value) > MAX_ARGS:
        raise SpecError(f"{name} must be a list of [KEY, VALUE] pairs")
    out = []
    for i, pair in enumerate(value):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise SpecError(f"{name}[{i}] must be a [KEY, VALUE] pair")
        key = _string(pair[0], f"{name}[{i}] key", empty=False)
        if "=" in key:
            raise SpecError(f"{name}[{i}] key {key!r} contains '='")
        out.append((key, _string(pair[1], f"{name}[{i}] value")))
    return tuple(out)


def _mapping(value: object, name: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{name} must be a JSON object")
    return dict(value)


def _no_unknown(data: Mapping[str, Any], known: set[str], what: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"{what}: unknown field {unknown[0]!r}")


@dataclass(frozen=True)
class ImageSource:
    """How the agent makes the container image available (see protocol.py).

    store:  a prebuilt read-only containers-storage disk holding `ref` (an image ID);
    device: an OCI/docker archive disk to `podman load` (fallback after a store, or alone);
    pull:   a registry reference pulled in the guest.
    """

    ref: str = ""
    store: str | None = None
    device: str | None = None
    pull: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _string(self.ref, "image.ref")
        for name in ("store", "device", "pull"):
            _optional(getattr(self, name), f"image.{name}", _string)
        if self.pull is not None:
            if self.store is not None or self.device is not None:
                raise SpecError("image: pull excludes store and device")
        elif self.store is None and self.device is None:
            raise SpecError("image: needs store, device or pull")
        if self.store is not None and not self.ref:
            raise SpecError("image: a store needs the image ID in ref")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_json(cls, data: object) -> ImageSource:
        obj = _mapping(data, "image")
        _no_unknown(obj, {"ref", "store", "device", "pull"}, "image")
        return cls(
            ref=_string(obj.get("ref", ""), "image.ref"),
            store=_optional(obj.get("store"), "image.store", _string),
            device=_optional(obj.get("device"), "image.device", _string),
            pull=_optional(obj.get("pull"), "image.pull", _string),
        )


MAP_CHANNELS = 8  # = vmm/base.py MAP_CHANNELS (the agent cannot import the host side)


@dataclass(frozen=True)
class MapMount:
    """A --map volume as the agent mounts it: extra stream `channel` (protocol.py
    MAP_PORT_NAME / MAP_VSOCK_PORT_BASE) mounted at `guest` in the container."""

    channel: int
    guest: str
    read_only: bool = False

    def __post_init__(self) -> None:
        _int(self.channel, "maps[].channel", 0, MAP_CHANNELS - 1)
        _string(self.guest, "maps[].guest", empty=False)
        parts = self.guest.split("/")
        if not self.guest.startswith("/") or self.guest == "/" or ".." in parts:
            raise SpecError(f"maps[].guest {self.guest!r} must be absolute, not /, without '..'")
        _bool(self.read_only, "maps[].read_only")

    def to_json(self) -> dict[str, Any]:
        return {"channel": self.channel, "guest": self.guest, "read_only": self.read_only}

    @classmethod
    def from_json(cls, data: object) -> MapMount:
        obj = _mapping(data, "maps[]")
        _no_unknown(obj, set(cls.__dataclass_fields__), "maps[]")
        return cls(channel=obj.get("channel"), guest=obj.get("guest"),  # type: ignore[arg-type]
                   read_only=obj.get("read_only", False))  # fmt: skip


def _maps(value: object, name: str) -> tuple[MapMount, ...]:
    if not isinstance(value, list | tuple) or len(value) > MAP_CHANNELS:
        raise SpecError(f"{name} must be a list of at most {MAP_CHANNELS} maps")
    maps = tuple(m if isinstance(m, MapMount) else MapMount.from_json(m) for m in value)
    for what in ("channel", "guest"):
        values = [getattr(m, what) for m in maps]
        if len(set(values)) != len(values):
            raise SpecError(f"{name}: two maps share a {what}")
    return maps


@dataclass(frozen=True)
class ProcessSpec:
    mode: str
    argv: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None
    user: str | None = None  # container modes only
    interactive: bool = False
    tty: bool = False
    rows: int = 24
    cols: int = 80
    # container mode only
    health_check: str | None = None
    health_timeout: float = 60.0
    # --map volumes, mounted in the container before its process starts (or, attaching
    # to a running one or exec'ing in it, before that) where not mounted yet
    maps: tuple[MapMount, ...] = ()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """SpecError unless every field is as the agent needs it."""
        if self.mode not in MODES:
            raise SpecError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        _strings(self.argv, "argv")
        if self.mode != p.MODE_CONTAINER and not self.argv:
            raise SpecError(f"argv must not be empty in {self.mode} mode")
        _env(self.env, "env")
        _optional(self.workdir, "workdir", _string)
        _optional(self.user, "user", _string)
        if self.user is not None and self.mode == p.MODE_VM:
            raise SpecError("user applies to the container; guest commands run as root")
        _bool(self.interactive, "interactive")
        _bool(self.tty, "tty")
        _int(self.rows, "rows", 1, MAX_TERMINAL)
        _int(self.cols, "cols", 1, MAX_TERMINAL)
        _optional(self.health_check, "health_check", _string)
        _number(self.health_timeout, "health_timeout", 0, 86400)
        _maps(self.maps, "maps")
        if self.maps and self.mode == p.MODE_VM:
            raise SpecError("maps are mounted in the container, not for vm mode")
        if self.mode == p.MODE_CONTAINER:
            if self.workdir is not None or self.user is not None:
                raise SpecError("the container's workdir and user are the image's")
        elif self.health_check is not None:
            raise SpecError(f"health_check is for container mode, not {self.mode}")
        size = len(json.dumps(self.to_json()))
        if size > MAX_SPEC_JSON:
            raise SpecError(f"the command and its environment take {size} bytes: at most "
                            f"{MAX_SPEC_JSON} go to the guest in one request")  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "argv": list(self.argv),
            "env": [list(kv) for kv in self.env],
            "interactive": self.interactive,
            "tty": self.tty,
            "rows": self.rows,
            "cols": self.cols,
        }
        for name in ("workdir", "user", "health_check"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.mode == p.MODE_CONTAINER:
            out["health_timeout"] = self.health_timeout
        if self.maps:
            out["maps"] = [m.to_json() for m in self.maps]
        return out

    @classmethod
    def from_json(cls, data: object) -> ProcessSpec:
        """The spec in `data` (a process channel's "spec"), or SpecError."""
        obj = _mapping(data, "spec")
        _no_unknown(obj, set(cls.__dataclass_fields__), "spec")
        return cls(
            mode=_string(obj.get("mode"), "mode"),
            argv=_strings(obj.get("argv", []), "argv"),
            env=_env(obj.get("env", []), "env"),
            workdir=_optional(obj.get("workdir"), "workdir", _string),
            user=_optional(obj.get("user"), "user", _string),
            interactive=_bool(obj.get("interactive", False), "interactive"),
            tty=_bool(obj.get("tty", False), "tty"),
            rows=_int(obj.get("rows", 24), "rows", 1, MAX_TERMINAL),
            cols=_int(obj.get("cols", 80), "cols", 1, MAX_TERMINAL),
            health_check=_optional(obj.get("health_check"), "health_check", _string),
            health_timeout=_number(obj.get("health_timeout", 60.0), "health_timeout", 0, 86400),
            maps=_maps(obj.get("maps", []), "maps"),
        )


@dataclass(frozen=True)
class ContainerSetup:
    """Everything the container is created with, up to its gate (what a snapshot of the
    prepared VM fixes): the image, privileges, and proxies for pulling in the guest."""

    image: ImageSource
    privileged: bool = False
    proxy_env: tuple[tuple[str, str], ...] = field(default=())
    # The image's ENTRYPOINT and CMD, when the host knows them (None: the agent asks
    # podman). The agent applies podman's rule: entrypoint + (command or cmd).
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.image, ImageSource):
            raise SpecError("setup.image must be an image source")
        _bool(self.privileged, "setup.privileged")
        _env(self.proxy_env, "setup.proxy_env")
        _optional(self.entrypoint, "setup.entrypoint", _strings)
        _optional(self.cmd, "setup.cmd", _strings)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image": self.image.to_json(), "privileged": self.privileged,
                               "proxy_env": [list(kv) for kv in self.proxy_env]}  # fmt: skip
        for name in ("entrypoint", "cmd"):
            if getattr(self, name) is not None:
                out[name] = list(getattr(self, name))
        return out

    @classmethod
    def from_json(cls, data: object) -> ContainerSetup:
        obj = _mapping(data, "setup")
        _no_unknown(obj, {"image", "privileged", "proxy_env", "entrypoint", "cmd"}, "setup")
        return cls(
            image=ImageSource.from_json(obj.get("image")),
            privileged=_bool(obj.get("privileged", False), "setup.privileged"),
            proxy_env=_env(obj.get("proxy_env", []), "setup.proxy_env"),
            entrypoint=_optional(obj.get("entrypoint"), "setup.entrypoint", _strings),
            cmd=_optional(obj.get("cmd"), "setup.cmd", _strings),
        )


def command_line(
    entrypoint: tuple[str, ...], cmd: tuple[str, ...], command: tuple[str, ...]
) -> tuple[str, ...]:
    """What the container runs, by podman's (and Docker's) rule: the image's entrypoint,
    then the command given to `run` or, without one, the image's CMD."""
    return (*entrypoint, *(command or cmd))
