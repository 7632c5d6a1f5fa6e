"""Helpers for the networking host tests (no tests here; importable without pytest).

A TAP with no VM attached has no carrier, so nothing can stand behind it. The tests
put a *stand-in guest* where the VM would be instead: a second network namespace
(created inside the VM's user namespace when there is one) whose eth0 is a veth
whose peer is a port of the VM namespace's bridge br0, exactly where tap0 is, with
the address, route and MAC the guest agent would give eth0. Servers "in the guest"
run in that namespace. Traffic from the host therefore takes the same path a VM's
would (slirp4netns or the veth/iptables path, then br0), only the last hop is a veth
instead of the TAP.

Run as a script (`python3 test_net_support.py rootless-scenario`) it does one
rootless round trip and prints JSON: the unprivileged-user test runs it that way
under setpriv with the system Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from fcvm.agent.system import network_commands  # noqa: E402
from fcvm.net import NetHandle  # noqa: E402

_HOLD = "echo ready; exec cat >/dev/null"

# Server run inside a namespace: for each connection, read until EOF and answer
# "<name> <sha256 of what it read>". Prints "up" once listening.
SERVER = r"""
import hashlib, socket, sys, threading
name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
l = socket.socket(fam); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((host, port)); l.listen(16); print("up", flush=True)
def serve(c):
    h = hashlib.sha256()
    while True:
        b = c.recv(1 << 20)
        if not b: break
        h.update(b)
    c.sendall(f"{name} {h.hexdigest()}".encode()); c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=10)
s.sendall(bytes(range(256)) * (n // 256)); s.shutdown(socket.SHUT_WR)
out = b""
while True:
    b = s.recv(65536)
    if not b: break
    out += b
print(out.decode())
"""


# What a VMM does with the TAP: TUNSETIFF on /dev/net/tun with IFF_TAP|IFF_NO_PI|
# IFF_VNET_HDR (Firecracker's and QEMU's flags). Prints "attached", holds it until EOF.
ATTACH = r"""
import fcntl, os, struct, sys
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", sys.argv[1].encode(), 0x0002 | 0x1000 | 0x4000))
print("attached", flush=True); sys.stdin.read()
"""


def tap_attach_check(netns_exec: tuple[str, ...], tap: str) -> bool:
    """Attach to the TAP as the VMM would (via netns_exec); True if carrier came up."""
    p = subprocess.Popen(
        [*netns_exec, sys.executable, "-c", ATTACH, tap],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdin is not None
    ok = p.stdout.readline().strip() == "attached"
    flags = run_in(netns_exec, "ip", "-o", "link", "show", tap) if ok else ""
    p.stdin.close()
    p.wait(5)
    return ok and "LOWER_UP" in flags and "NO-CARRIER" not in flags


def payload(n: int) -> bytes:
    return bytes(range(256)) * (n // 256)


def expect(name: str, n: int) -> str:
    return f"{name} {hashlib.sha256(payload(n)).hexdigest()}"


def roundtrip(host: str, port: int, n: int = 1 << 20, timeout: float = 10) -> str:
    """Connect from here, send n bytes, return the server's answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=timeout) as s:
                s.sendall(payload(n))
                s.shutdown(socket.SHUT_WR)
                out = b""
                while b := s.recv(65536):
                    out += b
                if out:
                    return out.decode()
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer from {host}:{port}")
        time.sleep(0.05)


def run_in(prefix: tuple[str, ...], *cmd: str, input: str | None = None) -> str:
    r = subprocess.run([*prefix, *cmd], input=input, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd}: {r.stderr.strip()}")
    return r.stdout


def server_in(prefix: tuple[str, ...], name: str, host: str, port: int) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [*prefix, sys.executable, "-c", SERVER, name, host, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    if p.stdout.readline().strip() != "up":
        p.kill()
        raise RuntimeError(f"server {name} did not start")
    return p


def host_server(name: str, host: str) -> tuple[subprocess.Popen[str], int]:
    """A server on the host's loopback (for guest -> 10.0.2.2 / fd00::2)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam) as s:
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    return server_in((), name, host, port), port


def client_in(prefix: tuple[str, ...], host: str, port: int, n: int = 1 << 16) -> str:
    return run_in(prefix, sys.executable, "-c", CLIENT, host, str(port), str(n)).strip()


class FakeGuest:
    """The stand-in guest described in the module docstring."""

    def __init__(self, h: NetHandle, name: str = "gst0") -> None:
        rec = h.record()
        self.userns = bool(rec.get("userns"))
        self.proc = subprocess.Popen(
            [*h.netns_exec, "unshare", "--net", "--", "/bin/sh", "-c", _HOLD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == b"ready"
        pid = self.proc.pid
        run_in(
            h.netns_exec,
            "ip",
            "-batch",
            "-",
            input=f"link add {name} type veth peer name eth0 netns {pid}\n"
            f"link set {name} master br0 up\n",
        )
        self.exec: tuple[str, ...] = ("nsenter", f"--target={pid}", "--net")
        if self.userns:
            self.exec += ("--user", "--preserve-credentials")
        self.exec += ("--",)
        # eth0 as the guest agent configures it, from the kernel parameters the host
        # would pass (the VMM sets the MAC).
        params = dict(a[len("fcvm.") :].partition("=")[::2] for a in h.guest_cmdline())
        cfg = [f"link set eth0 address {h.mac}", *network_commands(params)]
        run_in(self.exec, "ip", "-batch", "-", input="".join(f"{x}\n" for x in cfg))
        self.servers: list[subprocess.Popen[str]] = []

    def serve(self, name: str, port: int, host: str = "0.0.0.0") -> None:
        self.servers.append(server_in(self.exec, name, host, port))

    def close(self) -> None:
        for s in self.servers:
            s.kill()
            s.wait()
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(5)

    def __enter__(self) -> FakeGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def procs_in_netns(inode: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.stat(d / "ns" / "net").st_ino == inode:
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def rootless_scenario(workdir: Path) -> dict[str, Any]:
    """One rootless VM end to end; everything the unprivileged test checks."""
    from fcvm.net import parse_publish, setup_network

    res: dict[str, Any] = {"uid": os.getuid()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    h = setup_network("unpriv1", "rootless", parse_publish([f"{port}:8080"]), workdir=workdir)
    rec = h.record()
    res.update(record=rec, host_ip=h.host_ip)
    res["vmm_can_attach_tap"] = tap_attach_check(h.netns_exec, h.tap)
    srv, hport = host_server("hostlo", "127.0.0.1")
    try:
        with FakeGuest(h) as g:
            g.serve("guest", 8080)
            res["published"] = roundtrip(h.host_ip, port) == expect("guest", 1 << 20)
            res["to_host_loopback"] = client_in(g.exec, "10.0.2.2", hport) == expect(
                "hostlo", 1 << 16
            )
            res["holder_uid_map"] = Path(f"/proc/{rec['holder'][0]}/uid_map").read_text().split()
        inode = ns_inode(int(rec["holder"][0]))
    finally:
        srv.kill()
        srv.wait()
        h.teardown()
    time.sleep(0.1)
    res["procs_left"] = procs_in_netns(inode)
    res["holder_alive"] = Path(f"/proc/{rec['holder'][0]}").exists()
    res["slirp_alive"] = Path(f"/proc/{rec['slirp'][0]}").exists()
    leases = json.loads((Path(rec["net_dir"]) / "leases.json").read_text())["leases"]
    res["leases_left"] = list(leases)
    return res


def error_scenario(mode: str, workdir: Path) -> dict[str, Any]:
    from fcvm.errors import FcvmError
    from fcvm.net import setup_network

    try:
        h = setup_network("unpriv2", mode, [], workdir=workdir)
    except FcvmError as e:
        return {"error": e.line(), "exit_code": e.exit_code}
    h.teardown()
    return {"error": None}


if __name__ == "__main__":
    what, wd = sys.argv[1], Path(sys.argv[2])
    if what == "rootless-scenario":
        print(json.dumps(rootless_scenario(wd)))
    else:
        print(json.dumps(error_scenario(sys.argv[3], wd)))
