"""`--publish [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]` parsing.

Values are comma-separated and the flag is repeatable. Port ranges of equal length
(`8000-8002:9000-9002`) expand into one forward per port, as podman does. An IPv6
host address is written in brackets: `[::1]:8080:80`. A missing host address is kept
as "" here and resolved per network mode by setup_network (rootless: the VM's own
loopback address; bridged: 0.0.0.0, every host address).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fcvm.errors import UsageError

PROTOS = ("tcp", "udp")
_FORMAT = "expected [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]"


@dataclass(frozen=True)
class PortForward:
    host_ip: str  # "" = the network mode's default
    host_port: int
    guest_port: int
    proto: str = "tcp"  # "tcp" | "udp"

    def spec(self) -> str:
        host = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip
        prefix = f"{host}:" if host else ""
        return f"{prefix}{self.host_port}:{self.guest_port}/{self.proto}"

    def to_json(self) -> dict[str, object]:
        return {
            "host_ip": self.host_ip,
            "host_port": self.host_port,
            "guest_port": self.guest_port,
            "proto": self.proto,
        }

    def bind_error(self) -> OSError | None:
        """Why host_ip:host_port/proto cannot be bound now (in use, no right), or None."""
        import socket

        family = socket.AF_INET6 if ":" in self.host_ip else socket.AF_INET
        kind = socket.SOCK_STREAM if self.proto == "tcp" else socket.SOCK_DGRAM
        with socket.socket(family, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.host_ip, self.host_port))
            except OSError as e:
                return e
        return None

    @classmethod
    def from_json(cls, d: dict[str, object]) -> PortForward:
        return cls(
            host_ip=str(d["host_ip"]),
            host_port=int(str(d["host_port"])),
            guest_port=int(str(d["guest_port"])),
            proto=str(d["proto"]),
        )


def _ports(text: str, item: str) -> list[int]:
    lo_s, sep, hi_s = text.partition("-")
    try:
        lo = int(lo_s, 10)
        hi = int(hi_s, 10) if sep else lo
    except ValueError:
        raise UsageError(f"invalid --publish {item!r}: bad port {text!r} ({_FORMAT})") from None
    if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
        raise UsageError(f"invalid --publish {item!r}: port {text!r} out of range 1-65535")
    if hi < lo:
        raise UsageError(f"invalid --publish {item!r}: empty port range {text!r}")
    return list(range(lo, hi + 1))


def _parse_one(item: str) -> list[PortForward]:
    body, slash, proto = item.partition("/")
    proto = proto.lower() if slash else "tcp"
    if proto not in PROTOS:
        raise UsageError(f"invalid --publish {item!r}: protocol must be tcp or udp")
    host_ip = ""
    if body.startswith("["):
        end = body.find("]:")
        if end < 0:
            raise UsageError(f"invalid --publish {item!r}: unterminated [IPv6 address]")
        host_ip, body = body[1:end], body[end + 2 :]
    parts = body.split(":")
    if len(parts) == 3 and not host_ip:
        host_ip, *parts = parts
        if not host_ip:
            raise UsageError(f"invalid --publish {item!r}: empty host address ({_FORMAT})")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise UsageError(f"invalid --publish {item!r}: {_FORMAT}")
    if host_ip:
        try:
            host_ip = str(ipaddress.ip_address(host_ip))
        except ValueError:
            raise UsageError(
                f"invalid --publish {item!r}: {host_ip!r} is not an IP address"
            ) from None
    hosts, guests = _ports(parts[0], item), _ports(parts[1], item)
    if len(hosts) != len(guests):
        raise UsageError(f"invalid --publish {item!r}: port ranges differ in length")
    return [PortForward(host_ip, h, g, proto) for h, g in zip(hosts, guests, strict=True)]


def parse_publish(values: list[str]) -> list[PortForward]:
    """Parse every --publish value; raises UsageError (exit 125) on bad input."""
    out: list[PortForward] = []
    seen: dict[tuple[str, int, str], str] = {}
    for value in values:
        for raw in value.split(","):
            item = raw.strip()
            if not item:
                raise UsageError(f"invalid --publish {value!r}: empty entry ({_FORMAT})")
            for fwd in _parse_one(item):
                key = (fwd.host_ip, fwd.host_port, fwd.proto)
                if key in seen:
                    raise UsageError(
                        f"--publish {item!r}: host port {fwd.host_port}/{fwd.proto} "
                        f"already published by {seen[key]!r}"
                    )
                seen[key] = item
                out.append(fwd)
    return out
