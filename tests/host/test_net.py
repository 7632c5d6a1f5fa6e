"""Both network layouts for real: namespaces, slirp4netns, veth, iptables, sockets.

No VM here. Where the guest would be, a stand-in network namespace hangs off the VM
namespace's bridge in place of the TAP (see test_net_support.py for why and how);
servers run there and the tests reach them through published ports from the host,
and reach servers on the host's loopback from there via 10.0.2.2 / fd00::2.
Traffic goes only to loopback and to namespaces the tests made. Needs root (the
unprivileged case runs a scenario under setpriv as `nobody`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fcvm.errors import EXIT_FCVM, FcvmError
from fcvm.net import iptables, netns, parse_publish, rootless, setup_network, teardown_from_record
from fcvm.net.proc import start_time
from tests.host.test_net_support import (
    FakeGuest,
    client_in,
    expect,
    host_server,
    ns_inode,
    procs_in_netns,
    roundtrip,
    tap_attach_check,
)

pytestmark = [
    pytest.mark.host,
    pytest.mark.usefixtures("base"),
    pytest.mark.skipif(os.geteuid() != 0, reason="host network tests run as root"),
    pytest.mark.timeout(120),
]

SUPPORT = Path(__file__).with_name("test_net_support.py")
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    w = tmp_path / "vm"
    w.mkdir()
    return w


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def leases(base: Path) -> dict[str, Any]:
    p = base / "net" / "leases.json"
    return json.loads(p.read_text())["leases"] if p.exists() else {}


def fcvm_chains() -> list[str]:
    out = []
    for table in ("nat", "filter"):
        r = subprocess.run(["iptables", "-w", "-t", table, "-S"], capture_output=True, text=True)
        out += [line for line in r.stdout.splitlines() if "FCVM-" in line]
    return out


def assert_gone(rec: dict[str, Any], inode: int | None = None, timeout: float = 3.0) -> None:
    """Nothing of this VM's network remains: processes, links, rules, lease, socket."""
    deadline = time.monotonic() + timeout
    while True:
        problems = []
        for key in ("holder", "slirp"):
            v = rec.get(key)
            if v and start_time(v[0]) == v[1]:
                problems.append(f"{key} pid {v[0]} alive")
        if rec.get("veth") and Path(f"/sys/class/net/{rec['veth']}").exists():
            problems.append(f"link {rec['veth']} exists")
        if inode is not None and procs_in_netns(inode):
            problems.append(f"processes in the VM netns: {procs_in_netns(inode)}")
        if iptables.rules_tagged(rec["tag"]):
            problems.append(f"rules left: {iptables.rules_tagged(rec['tag'])}")
        if rec["vm_id"] in leases(Path(rec["net_dir"]).parent):
            problems.append("lease left")
        if rec.get("api_socket") and Path(rec["api_socket"]).exists():
            problems.append("api socket left")
        if not problems:
            return
        if time.monotonic() > deadline:
            raise AssertionError("; ".join(problems))
        time.sleep(0.05)


def test_ip_netns_untouched(workdir: Path) -> None:
    """We never create named namespaces (nothing under /run/netns can be left)."""
    before = subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
    h = setup_network("nsl", "rootless", [], workdir=workdir)
    try:
        assert subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout == before
    finally:
        h.teardown()


# ---------------------------------------------------------------- rootless


def test_rootless_publish_and_host_loopback(workdir: Path, base: Path) -> None:
    port = free_port()
    h = setup_network("rl1", "rootless", parse_publish([f"{port}:8080"]), workdir=workdir)
    rec = h.record()
    inode = ns_inode(h.holder_pid or 0)
    links_before = set(os.listdir("/sys/class/net"))
    try:
        assert h.host_ip.startswith("127.77.")
        assert h.forwards[0].host_ip == h.host_ip
        assert (h.guest_ip, h.prefix_len, h.gateway) == ("10.0.2.100", 24, "10.0.2.2")
        assert h.dns[0] == "10.0.2.3"
        assert "fcvm.ip=10.0.2.100/24" in h.guest_cmdline()
        links = json.loads(
            subprocess.run([*h.netns_exec, "ip", "-j", "link"], capture_output=True).stdout
        )
        names = {link["ifname"]: link for link in links}
        assert {"lo", "br0", "tap0", "slirp0"} <= set(names)
        assert names["tap0"].get("master") == "br0"
        assert ns_inode(os.getpid()) != inode
        # the VMM runs via netns_exec and attaches to the TAP like this
        assert tap_attach_check(h.netns_exec, h.tap)
        assert (
            "tap0"
            in subprocess.run(
                [*h.netns_exec, "cat", "/proc/net/dev"], capture_output=True, text=True
            ).stdout
        )
        srv, hport = host_server("hostlo", "127.0.0.1")
        srv6 = None
        try:
            with FakeGuest(h) as g:
                g.serve("guest", 8080)
                assert roundtrip(h.host_ip, port) == expect("guest", 1 << 20)
                # not published on the other loopback addresses
                with pytest.raises(OSError):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                assert client_in(g.exec, "10.0.2.2", hport) == expect("hostlo", 1 << 16)
                if h.guest_ip6:
                    srv6, hport6 = host_server("hostlo6", "::1")
                    assert client_in(g.exec, "fd00::2", hport6) == expect("hostlo6", 1 << 16)
        finally:
            for s in (srv, srv6):
                if s:
                    s.kill()
                    s.wait()
        assert set(os.listdir("/sys/class/net")) == links_before  # nothing on the host side
    finally:
        h.teardown()
    h.teardown()  # idempotent
    assert_gone(rec, inode)
    with socket.socket() as s:  # the port is free again
        s.bind((h.host_ip, port))


def test_rootless_two_vms_same_host_and_guest_port(tmp_path: Path) -> None:
    port = free_port()
    a = setup_network("rla", "rootless", parse_publish([f"{port}:80"]), workdir=tmp_path / "a")
    b = setup_network("rlb", "rootless", parse_publish([f"{port}:80"]), workdir=tmp_path / "b")
    try:
        assert a.host_ip != b.host_ip
        with FakeGuest(a) as ga, FakeGuest(b) as gb:
            ga.serve("A", 80)
            gb.serve("B", 80)
            assert roundtrip(a.host_ip, port) == expect("A", 1 << 20)
            assert roundtrip(b.host_ip, port) == expect("B", 1 << 20)
            a.teardown()
            assert roundtrip(b.host_ip, port, n=4096) == expect("B", 4096)
    finally:
        a.teardown()
        b.teardown()


def test_rootless_moves_past_an_address_another_base_directory_uses(tmp_path: Path) -> None:
    """Leases are per base directory: another one's VM (another user's) may hold our port
    on the loopback address we would pick. The VM takes the next address instead of
    failing with 'host port already in use'."""
    from fcvm.net.alloc import pick_loopback

    taken = pick_loopback([])
    with socket.socket() as other:
        other.bind((taken, 0))
        other.listen()
        port = other.getsockname()[1]
        h = setup_network("rlo", "rootless", parse_publish([f"{port}:80"]), workdir=tmp_path)
        try:
            assert h.host_ip != taken
            with FakeGuest(h) as guest:
                guest.serve("A", 80)
                assert roundtrip(h.host_ip, port, n=4096) == expect("A", 4096)
        finally:
            h.teardown()


def test_rootless_udp_publish(workdir: Path) -> None:
    port = free_port()
    h = setup_network("rlu", "rootless", parse_publish([f"{port}:5353/udp"]), workdir=workdir)
    try:
        with FakeGuest(h) as g:
            echo = (
                "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                "s.bind(('0.0.0.0',5353)); print('up', flush=True)\n"
                "while True:\n d,a=s.recvfrom(2048); s.sendto(b'udp:'+d,a)\n"
            )
            p = subprocess.Popen(
                [*g.exec, sys.executable, "-c", echo], stdout=subprocess.PIPE, text=True
            )
            g.servers.append(p)
            assert p.stdout and p.stdout.readline().strip() == "up"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.settimeout(0.5)
                for _ in range(20):
                    c.sendto(b"hi", (h.host_ip, port))
                    try:
                        assert c.recv(100) == b"udp:hi"
                        break
                    except TimeoutError:
                        continue
                else:
                    raise AssertionError("no UDP answer through the published port")
    finally:
        h.teardown()


# ---------------------------------------------------------------- bridged


def test_bridged_publish_nat_and_teardown(workdir: Path) -> None:
    chains_before = fcvm_chains()
    port = free_port()
    h = setup_network("br1", "bridged", parse_publish([f"{port}:8080"]), workdir=workdir)
    rec = h.record()
    inode = ns_inode(h.holder_pid or 0)
    try:
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
        veth = rec["veth"]
        assert Path(f"/sys/class/net/{veth}").exists()
        assert tap_attach_check(h.netns_exec, h.tap)
        assert h.host_ip == h.gateway and h.prefix_len == 30
        rules = iptables.rules_tagged(rec["tag"])
        assert any("MASQUERADE" in r and rec["subnet"] in r for r in rules)
        assert sum("-j DNAT" in r for r in rules) == 2
        with FakeGuest(h) as g:
            g.serve("guest", 8080)
            assert roundtrip("127.0.0.1", port) == expect("guest", 1 << 20)  # OUTPUT DNAT
            assert roundtrip(h.host_ip, port, n=4096) == expect("guest", 4096)
            assert roundtrip(h.guest_ip, 8080, n=4096) == expect("guest", 4096)  # routed directly
            # guest -> host via the gateway (the host's veth end)
            srv, hport = host_server("hostgw", "0.0.0.0")
            try:
                assert client_in(g.exec, h.gateway, hport) == expect("hostgw", 1 << 16)
            finally:
                srv.kill()
                srv.wait()
    finally:
        h.teardown()
    assert_gone(rec, inode)
    assert fcvm_chains() == chains_before  # chains and jumps go with the last rule


def test_bridged_two_vms_same_guest_port(tmp_path: Path) -> None:
    p1, p2, p3 = free_port(), free_port(), free_port()
    a = setup_network(
        "bra", "bridged", parse_publish([f"{p1}:80", f"127.0.0.2:{p3}:80"]), workdir=tmp_path / "a"
    )
    b = setup_network(
        "brb", "bridged", parse_publish([f"{p2}:80", f"127.0.0.3:{p3}:80"]), workdir=tmp_path / "b"
    )
    try:
        ra, rb = a.record(), b.record()
        assert ra["subnet"] != rb["subnet"] and ra["veth"] != rb["veth"]
        with FakeGuest(a) as ga, FakeGuest(b) as gb:
            ga.serve("A", 80)
            gb.serve("B", 80)
            assert roundtrip("127.0.0.1", p1) == expect("A", 1 << 20)
            assert roundtrip("127.0.0.1", p2) == expect("B", 1 << 20)
            assert roundtrip("127.0.0.2", p3, n=4096) == expect("A", 4096)
            assert roundtrip("127.0.0.3", p3, n=4096) == expect("B", 4096)
            rules_b = iptables.rules_tagged(rb["tag"])
            a.teardown()
            assert iptables.rules_tagged(ra["tag"]) == []
            assert iptables.rules_tagged(rb["tag"]) == rules_b  # untouched
            assert roundtrip("127.0.0.1", p2, n=4096) == expect("B", 4096)
    finally:
        a.teardown()
        b.teardown()
    assert_gone(ra)
    assert_gone(rb)


def test_bridged_concurrent_setups_get_distinct_subnets(tmp_path: Path) -> None:
    """Several fcvm processes starting bridged VMs at once: no collisions, all clean."""
    code = (
        "import json,sys,time; from pathlib import Path\n"
        "from fcvm.net import setup_network\n"
        "h = setup_network(sys.argv[1], 'bridged', [], workdir=Path(sys.argv[2]))\n"
        "print(json.dumps(h.record()), flush=True); sys.stdin.read(); h.teardown()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, f"cc{i}", str(tmp_path / f"w{i}")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(6)
    ]
    recs = [json.loads(p.stdout.readline()) for p in procs if p.stdout]
    try:
        assert len({r["subnet"] for r in recs}) == 6
        assert len({r["veth"] for r in recs}) == 6
        assert all(Path(f"/sys/class/net/{r['veth']}").exists() for r in recs)
    finally:
        for p in procs:
            p.communicate("", timeout=30)
    for r in recs:
        assert_gone(r)


# ---------------------------------------------------------------- kill -9 of fcvm

_KILLED = (
    "import json,sys,time; from pathlib import Path\n"
    "from fcvm.net import setup_network, parse_publish\n"
    "h = setup_network(sys.argv[1], sys.argv[2], parse_publish([sys.argv[3]]),"
    " workdir=Path(sys.argv[4]))\n"
    "print(json.dumps(h.record()), flush=True); time.sleep(600)\n"
)


def _setup_then_kill9(vm_id: str, mode: str, publish: str, workdir: Path) -> dict[str, Any]:
    p = subprocess.Popen(
        [sys.executable, "-c", _KILLED, vm_id, mode, publish, str(workdir)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert p.stdout is not None
    rec: dict[str, Any] = json.loads(p.stdout.readline())
    p.send_signal(signal.SIGKILL)
    p.wait()
    return rec


@pytest.mark.parametrize("mode", ["rootless", "bridged"])
def test_killed_fcvm_then_teardown_from_record(mode: str, workdir: Path, base: Path) -> None:
    port = free_port()
    rec = _setup_then_kill9("k1", mode, f"{port}:80", workdir)
    inode = None
    # helpers die with fcvm by themselves (EOF on their pipes): the namespace goes too
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if all(start_time(rec[k][0]) != rec[k][1] for k in ("holder", "slirp") if rec.get(k)):
            break
        time.sleep(0.05)
    for k in ("holder", "slirp"):
        if rec.get(k):
            assert start_time(rec[k][0]) != rec[k][1], f"{k} outlived fcvm"
    # what cannot die with a process is still there until someone reaps it
    assert "k1" in leases(base)
    if mode == "bridged":
        assert iptables.rules_tagged(rec["tag"])
    teardown_from_record(rec)
    teardown_from_record(rec)  # idempotent
    assert_gone(rec, inode)
    with socket.socket() as s:
        s.bind((rec["forwards"][0]["host_ip"], port))


def test_stale_lease_reaped_by_next_setup(tmp_path: Path, base: Path) -> None:
    port = free_port()
    rec = _setup_then_kill9("st1", "bridged", f"{port}:80", tmp_path / "a")
    assert iptables.rules_tagged(rec["tag"])
    # the next VM may even take the same host port: the dead VM's lease is reaped first
    h = setup_network("st2", "bridged", parse_publish([f"{port}:80"]), workdir=tmp_path / "b")
    try:
        assert iptables.rules_tagged(rec["tag"]) == []
        assert set(leases(base)) == {"st2"}
        assert h.record()["subnet"] == rec["subnet"]  # its subnet was freed
    finally:
        h.teardown()
    assert_gone(rec)


# ---------------------------------------------------------------- errors


def _assert_clean_failure(e: FcvmError, base: Path, match: str) -> None:
    assert e.exit_code == EXIT_FCVM
    assert "\n" not in e.line()
    assert match in e.line(), e.line()
    assert leases(base) == {}


def test_error_host_port_in_use_rootless(workdir: Path, base: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        before = subprocess.run(["pgrep", "-x", "slirp4netns"], capture_output=True).stdout
        with pytest.raises(FcvmError) as ei:
            setup_network(
                "e1", "rootless", parse_publish([f"127.0.0.1:{port}:80"]), workdir=workdir
            )
        _assert_clean_failure(ei.value, base, "already in use")
        assert subprocess.run(["pgrep", "-x", "slirp4netns"], capture_output=True).stdout == before


def test_error_host_port_in_use_bridged(workdir: Path, base: Path) -> None:
    chains_before = fcvm_chains()
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(FcvmError) as ei:
            setup_network("e2", "bridged", parse_publish([f"{port}:80"]), workdir=workdir)
        _assert_clean_failure(ei.value, base, "already in use")
    assert fcvm_chains() == chains_before
    assert not any(n.startswith("fcvmb") for n in os.listdir("/sys/class/net"))


@pytest.mark.parametrize("mode", ["rootless", "bridged"])
def test_error_ipv6_host_address(mode: str, workdir: Path, base: Path) -> None:
    with pytest.raises(FcvmError) as ei:
        setup_network("e6", mode, parse_publish(["[::1]:8080:80"]), workdir=workdir)
    _assert_clean_failure(ei.value, base, "only IPv4 host addresses")


def test_error_port_published_by_another_vm(tmp_path: Path, base: Path) -> None:
    port = free_port()
    a = setup_network("pa", "bridged", parse_publish([f"{port}:80"]), workdir=tmp_path / "a")
    try:
        with pytest.raises(FcvmError, match="already published by VM pa"):
            setup_network("pb", "bridged", parse_publish([f"{port}:81"]), workdir=tmp_path / "b")
        assert set(leases(base)) == {"pa"}
        # The holder is named as its user knows it when it has a VM record.
        from fcvm import state

        state.write_record(state.VmRecord(vm_id="pa", name="web", pid=os.getpid()))
        with pytest.raises(FcvmError, match="already published by VM 'web'"):
            setup_network("pb", "bridged", parse_publish([f"{port}:81"]), workdir=tmp_path / "b")
    finally:
        a.teardown()


@pytest.mark.parametrize(("mode", "tool"), [("rootless", "slirp4netns"), ("bridged", "iptables")])
def test_error_missing_tool(
    mode: str, tool: str, tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("ip", "unshare", "nsenter", "slirp4netns", "iptables", "iptables-restore"):
        found = shutil.which(name)
        if found and name != tool:
            (bin_dir / name).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(FcvmError) as ei:
        setup_network("mt", mode, [], workdir=tmp_path / "w")
    _assert_clean_failure(ei.value, base, f"{tool} not found")
    assert "apt-get install" in ei.value.line()


def test_error_midway_undoes_everything(
    workdir: Path, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """slirp4netns refusing a forward after namespace and helpers exist: all undone."""
    made: list[dict[str, Any]] = []
    real_start = netns.start_holder

    def spy(h: Any, userns: bool) -> Any:
        p = real_start(h, userns)
        made.append(h._rec)
        return p

    monkeypatch.setattr(netns, "start_holder", spy)
    monkeypatch.setattr(
        rootless, "_slirp_api", lambda *a, **k: {"error": {"desc": "bind failed (simulated)"}}
    )
    with pytest.raises(FcvmError) as ei:
        setup_network("mid", "rootless", parse_publish([f"{free_port()}:80"]), workdir=workdir)
    _assert_clean_failure(ei.value, base, "bind failed (simulated)")
    assert made and made[0]["slirp"]
    assert_gone(made[0])


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A scratch directory `nobody` can use (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="fcvm-net-test-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _as_nobody(args: list[str], tmp_path: Path) -> dict[str, Any]:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(tmp_path),
        "FCVM_BASE_DIR": str(tmp_path / "nbase"),
        "PYTHONPATH": str(SRC),
    }
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
         str(SUPPORT), *args],
        capture_output=True, text=True, env=env, timeout=90,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def test_error_bridged_needs_root(nobody_dir: Path) -> None:
    out = _as_nobody(["error", str(nobody_dir / "w"), "bridged"], nobody_dir)
    assert out["exit_code"] == EXIT_FCVM
    assert "bridged needs root" in out["error"]


@pytest.fixture
def tun_mode() -> Iterator[None]:
    """/dev/net/tun is 0600 on these machines (udev normally makes it 0666)."""
    old = os.stat("/dev/net/tun").st_mode & 0o7777
    yield
    os.chmod("/dev/net/tun", old)


def test_error_unprivileged_without_tun_access(nobody_dir: Path, tun_mode: None) -> None:
    os.chmod("/dev/net/tun", 0o600)
    out = _as_nobody(["error", str(nobody_dir / "w"), "rootless"], nobody_dir)
    assert out["exit_code"] == EXIT_FCVM
    assert "/dev/net/tun" in out["error"] and "chmod 0666" in out["error"]


def test_rootless_as_unprivileged_user(nobody_dir: Path, tun_mode: None) -> None:
    maxns = Path("/proc/sys/user/max_user_namespaces").read_text().strip()
    if maxns == "0":
        pytest.skip("user.max_user_namespaces=0: unprivileged user namespaces are off")
    os.chmod("/dev/net/tun", 0o666)
    out = _as_nobody(["rootless-scenario", str(nobody_dir / "w")], nobody_dir)
    assert out["uid"] == 65534
    assert out["record"]["userns"] is True
    assert out["holder_uid_map"] == ["0", "65534", "1"]  # root inside = nobody outside
    assert out["vmm_can_attach_tap"] is True
    assert out["published"] is True
    assert out["to_host_loopback"] is True
    assert out["procs_left"] == []
    assert not out["holder_alive"] and not out["slirp_alive"]
    assert out["leases_left"] == []
