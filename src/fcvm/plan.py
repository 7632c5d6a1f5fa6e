"""The run plan: every flag of `fcvm podman run`, validated, in one immutable value.

(The image cache's keys are built from it and what it resolves to: imagecache.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from fcvm.errors import UsageError
from fcvm.volumes.spec import VolumeMap

# (matched with fullmatch: "$" would also match before a final newline)
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_CPUS = 64
MIN_MEM_MIB, MAX_MEM_MIB = 128, 1024 * 1024


@dataclass(frozen=True)
class ImageSpec:
    """Where the container image comes from."""

    kind: str  # "host" (host podman storage), "oci-archive", "docker-archive", "registry"
    ref: str  # image reference, or the archive path


@dataclass(frozen=True)
class RunPlan:
    name: str
    image: ImageSpec
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cpus: int = 1
    mem_mib: int = 1024
    vmm: str = "auto"
    network: str = "rootless"
    publish: tuple[str, ...] = ()
    interactive: bool = False
    tty: bool = False
    privileged: bool = False
    health_check: str | None = None
    health_timeout: float = 60.0
    stop_timeout: float = 10.0  # after a forwarded signal, seconds until the VM is stopped
    disk_size: int = 8 << 30  # the container storage disk, bytes (0: in guest RAM)
    snapshot: bool = True
    maps: tuple[VolumeMap, ...] = ()  # --map HOST:GUEST[:ro] (volumes/spec.py)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # The command and env as the guest will be sent them, checked before any VM
        # starts (a SpecError is a usage error: one line, exit 125).
        from fcvm.agent.protocol import MODE_CONTAINER
        from fcvm.agent.spec import ProcessSpec

        ProcessSpec(mode=MODE_CONTAINER, argv=self.command, env=self.env)

    def canonical_json(self) -> str:
        data = asdict(self)
        data.pop("name")  # the name does not change what the VM holds
        data.pop("extra")
        return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)

    def cache_key(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]


def parse_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid name {name!r}: use letters, digits, '_', '.', '-' "
            "(at most 63, starting with a letter or digit)"
        )
    return name


def split_env(value: str) -> list[str]:
    """One --env value's entries: a comma-separated piece that does not begin with
    KEY= belongs to the value of the entry before it, if that one has a value."""
    items: list[str] = []
    for piece in value.split(","):
        key = piece.partition("=")[0]
        starts_entry = "=" in piece and ENV_KEY_RE.fullmatch(key) is not None
        if items and "=" in items[-1] and not starts_entry:
            items[-1] += "," + piece
        elif not piece:
            raise UsageError(f"malformed --env {value!r}: empty entry")
        else:
            items.append(piece)
    return items


def parse_env(values: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """--env K=V[,K=V...], repeatable. A bare K takes the value from fcvm's environment,
    and is left out when it is not set there (as podman does: the image's value stays).
    A comma starts a new variable only where KEY= (or, after a bare KEY, another KEY)
    follows; any other comma is the value's: NO_PROXY=localhost,127.0.0.1 is one."""
    out: list[tuple[str, str]] = []
    for value in values:
        for item in split_env(value):
            key, eq, val = item.partition("=")
            if not ENV_KEY_RE.fullmatch(key):
                raise UsageError(f"malformed --env {item!r}: expected KEY=VALUE")
            if not eq:
                if key not in os.environ:
                    continue
                val = os.environ[key]
            out.append((key, val))
    return tuple(out)


def parse_cpus(value: str) -> int:
    try:
        cpus = int(value)
    except ValueError:
        raise UsageError(f"malformed --cpu {value!r}: expected a whole number of vCPUs") from None
    if not 1 <= cpus <= MAX_CPUS:
        raise UsageError(f"--cpu {cpus}: must be between 1 and {MAX_CPUS}")
    # More vCPUs than the host can run at once gain nothing, and under emulation (a
    # thread per vCPU) such a guest does not even boot in time; podman refuses more
    # CPUs than there are, too.
    host = len(os.sched_getaffinity(0))
    if cpus > host:
        raise UsageError(f"--cpu {cpus}: this host has {host} CPU{'s' if host > 1 else ''} "
                         "for fcvm to use")  # fmt: skip
    return cpus


def parse_mem(value: str) -> int:
    """--mem in MiB; a trailing M/MiB, G/GiB or T/TiB is accepted."""
    m = re.fullmatch(r"(\d+)\s*(m|mib|mb|g|gib|gb|t|tib|tb)?", value.strip().lower())
    if not m:
        raise UsageError(f"malformed --mem {value!r}: expected MiB, e.g. 512 or 2G")
    mib = int(m.group(1)) * {"m": 1, "g": 1024, "t": 1 << 20}[(m.group(2) or "m")[0]]
    if not MIN_MEM_MIB <= mib <= MAX_MEM_MIB:
        raise UsageError(f"--mem {value}: must be between {MIN_MEM_MIB} MiB and 1 TiB")
    return mib


MIN_DISK, MAX_DISK = 256 << 20, 64 << 40


def parse_disk_size(value: str) -> int:
    """--disk-size: the container storage disk (sparse: costs what is written), e.g. 8G;
    0 or "ram" keeps container storage in guest memory instead."""
    text = value.strip().lower()
    if text in ("0", "ram"):
        return 0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?", text)
    if not m:
        raise UsageError(f"malformed --disk-size {value!r}: expected e.g. 8G, 500M, or ram")
    size = int(float(m.group(1)) * {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30,
                                     "t": 1 << 40}[m.group(2)])  # fmt: skip
    if not MIN_DISK <= size <= MAX_DISK:
        raise UsageError(f"--disk-size {value}: must be between 256M and 64T (or ram)")
    return size


def parse_image(value: str) -> ImageSpec:
    for kind in ("oci-archive", "docker-archive"):
        if value.startswith(kind + ":"):
            path = value[len(kind) + 1 :]
            if not path:
                raise UsageError(f"{kind}: needs a path, e.g. {kind}:/tmp/image.tar")
            return ImageSpec(kind, path)
    if not value or value.startswith("-") or any(c.isspace() for c in value):
        raise UsageError(f"invalid image reference {value!r}")
    return ImageSpec("host", value)


def parse_health_check(url: str | None) -> str | None:
    """An http(s) URL the guest can ask: a host, a port if any in 1-65535, no blanks
    (urllib refuses those only when the check runs, in the guest)."""
    if url is None:
        return None
    from urllib.parse import urlsplit

    bad = f"malformed --health-check {url!r}: expected an http:// or https:// URL"
    if any(c.isspace() for c in url):
        raise UsageError(f"{bad} (no blanks)")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed [IPv6 address
        raise UsageError(f"{bad} ({exc})") from None
    try:
        port = parts.port
    except ValueError:
        port = 0
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(bad)
    if port == 0:
        raise UsageError(f"{bad} (a port is a number from 1 to 65535)")
    return url


def parse_seconds(flag: str, value: str, *, zero: bool = False) -> float:
    """A duration in seconds, up to a day; 0 only where it means something (zero)."""
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError(f"malformed {flag} {value!r}: expected seconds") from None
    enough = seconds >= 0 if zero else seconds > 0
    if not enough or seconds > 24 * 3600:
        least = "0" if zero else "more than 0"
        raise UsageError(f"{flag} {value}: must be {least} and at most 86400 seconds")
    return seconds


def parse_command(cmd: str | None, args: list[str]) -> tuple[str, ...]:
    """`--cmd 'CMD ARGS'` (shell words) or the arguments after the image."""
    if cmd and args:
        raise UsageError("give the command either with --cmd or after the image, not both")
    if cmd:
        try:
            return tuple(shlex.split(cmd))
        except ValueError as exc:
            raise UsageError(f"malformed --cmd: {exc}") from None
    return tuple(args)
