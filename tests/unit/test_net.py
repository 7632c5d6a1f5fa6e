"""Networking logic without privileges: --publish parsing, allocation, leases, proxy env."""

from __future__ import annotations

import ipaddress
import json
import multiprocessing
from pathlib import Path

import pytest

from fcvm.errors import EXIT_FCVM, FcvmError, UsageError
from fcvm.net import NetHandle, PortForward, parse_publish, proxy_env
from fcvm.net.alloc import (
    LOOPBACK_POOL,
    Leases,
    pick_loopback,
    pick_subnet,
    port_conflict,
)
from fcvm.net.iptables import vm_rules

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- parse_publish


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("8080:80", [PortForward("", 8080, 80, "tcp")]),
        ("8080:80/udp", [PortForward("", 8080, 80, "udp")]),
        ("8080:80/TCP", [PortForward("", 8080, 80, "tcp")]),
        ("127.0.0.1:8080:80", [PortForward("127.0.0.1", 8080, 80, "tcp")]),
        ("0.0.0.0:53:53/udp", [PortForward("0.0.0.0", 53, 53, "udp")]),
        ("[::1]:8080:80", [PortForward("::1", 8080, 80, "tcp")]),
        ("1:65535", [PortForward("", 1, 65535, "tcp")]),
        (
            "8000-8002:9000-9002",
            [PortForward("", 8000 + i, 9000 + i, "tcp") for i in range(3)],
        ),
        (
            "8080:80, 8443:443/tcp",
            [PortForward("", 8080, 80, "tcp"), PortForward("", 8443, 443, "tcp")],
        ),
    ],
)
def test_parse_publish_good(value: str, expected: list[PortForward]) -> None:
    assert parse_publish([value]) == expected


def test_parse_publish_repeatable_and_same_port_two_protos() -> None:
    got = parse_publish(["53:53/udp", "53:53/tcp,80:8080"])
    assert got == [
        PortForward("", 53, 53, "udp"),
        PortForward("", 53, 53, "tcp"),
        PortForward("", 80, 8080, "tcp"),
    ]
    assert parse_publish([]) == []


@pytest.mark.parametrize(
    "value",
    [
        "",
        "80",
        "8080:",
        ":80",
        "a:80",
        "8080:80/sctp",
        "0:80",
        "8080:65536",
        "300.1.1.1:8080:80",
        "host:8080:80",
        ":8080:80",
        "1.2.3.4:5:6:7",
        "8080-8081:80",
        "8081-8080:80-79",
        "[::1:8080:80",
        "8080:80,",
        "8080:80,,9090:90",
        "-1:80",
    ],
)
def test_parse_publish_bad(value: str) -> None:
    with pytest.raises(UsageError) as ei:
        parse_publish([value])
    assert ei.value.exit_code == EXIT_FCVM
    assert "\n" not in ei.value.line()


def test_parse_publish_duplicate_host_port() -> None:
    with pytest.raises(UsageError, match="already published"):
        parse_publish(["8080:80", "8080:81"])
    with pytest.raises(UsageError, match="already published"):
        parse_publish(["8000-8002:80-82,8002:90"])


def test_portforward_json_roundtrip_and_spec() -> None:
    for f in parse_publish(["[::1]:1:2/udp", "3:4", "10.0.0.1:5:6"]):
        assert PortForward.from_json(json.loads(json.dumps(f.to_json()))) == f
        assert parse_publish([f.spec()]) == [f]


# ---------------------------------------------------------------- allocation


def test_pick_loopback_lowest_free_in_127() -> None:
    first = pick_loopback([])
    assert ipaddress.ip_address(first) in LOOPBACK_POOL
    assert ipaddress.ip_address(first).is_loopback
    second = pick_loopback([first])
    assert second != first
    assert pick_loopback([second]) == first  # freed addresses are reused
    # skips .0 and .255 of every /24
    pool = ipaddress.IPv4Network("127.9.0.0/23")
    used = [str(a) for a in pool.hosts() if not str(a).endswith(".255")][:254]
    assert pick_loopback(used, pool) == "127.9.1.1"


def test_pick_loopback_exhausted() -> None:
    pool = ipaddress.IPv4Network("127.9.0.0/30")
    with pytest.raises(FcvmError, match="no free loopback"):
        pick_loopback([str(a) for a in pool.hosts()], pool)


def test_pick_subnet_skips_used_and_host_routes() -> None:
    pool = ipaddress.IPv4Network("10.213.0.0/16")
    i, n = pick_subnet(pool, [])
    assert (i, str(n)) == (0, "10.213.0.0/30")
    i, n = pick_subnet(pool, [ipaddress.IPv4Network("10.213.0.0/30")])
    assert (i, str(n)) == (1, "10.213.0.4/30")
    # a host route covering the start of the pool is avoided; a default route is not "overlap"
    i, n = pick_subnet(
        pool,
        [],
        [ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv4Network("10.213.0.0/24")],
    )
    assert str(n) == "10.213.1.0/30" and i == 64
    with pytest.raises(FcvmError, match="no free"):
        pick_subnet(ipaddress.IPv4Network("10.9.9.0/30"), [ipaddress.IPv4Network("10.9.9.0/30")])


def test_port_conflict() -> None:
    leases = {
        "a": {"forwards": [PortForward("127.77.0.1", 8080, 80, "tcp").to_json()]},
        "b": {"forwards": [PortForward("0.0.0.0", 9090, 80, "tcp").to_json()]},
    }
    assert port_conflict([PortForward("127.77.0.2", 8080, 80, "tcp")], leases) is None
    assert port_conflict([PortForward("127.77.0.1", 8080, 80, "udp")], leases) is None
    assert "VM a" in (port_conflict([PortForward("127.77.0.1", 8080, 1, "tcp")], leases) or "")
    assert "VM a" in (port_conflict([PortForward("0.0.0.0", 8080, 1, "tcp")], leases) or "")
    assert "VM b" in (port_conflict([PortForward("127.0.0.1", 9090, 1, "tcp")], leases) or "")
    assert port_conflict([PortForward("127.77.0.1", 8080, 1, "tcp")], leases, me="a") is None


def _allocate_in_child(args: tuple[str, int]) -> str:
    net_dir, i = args
    with Leases(Path(net_dir)) as leases:
        used = [ipaddress.IPv4Network(r["subnet"]) for r in leases.leases.values()]
        _, subnet = pick_subnet(ipaddress.IPv4Network("10.213.0.0/16"), used)
        leases.put(f"vm{i}", {"subnet": str(subnet), "host_ip": pick_loopback([])})
    return str(subnet)


def test_concurrent_allocation_never_collides(tmp_path: Path) -> None:
    """Many processes allocating at once under the flock get distinct subnets."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(8) as pool:
        got = pool.map(_allocate_in_child, [(str(tmp_path), i) for i in range(40)])
    assert len(set(got)) == 40
    data = json.loads((tmp_path / "leases.json").read_text())
    assert len(data["leases"]) == 40


def test_leases_survive_garbage(tmp_path: Path) -> None:
    (tmp_path / "leases.json").write_text("{not json")
    with Leases(tmp_path) as leases:
        assert leases.leases == {}
        leases.put("x", {"a": 1})
    with Leases(tmp_path) as leases:
        assert leases.leases == {"x": {"a": 1}}
        leases.drop("x")
    assert json.loads((tmp_path / "leases.json").read_text())["leases"] == {}


# ---------------------------------------------------------------- guest side, proxy, rules


def _handle(mode: str = "rootless", **kw: object) -> NetHandle:
    base: dict[str, object] = dict(
        vm_id="v1",
        mode=mode,
        tap="tap0",
        mac="02:fc:00:00:00:02",
        guest_ip="10.0.2.100",
        prefix_len=24,
        gateway="10.0.2.2",
        dns=["10.0.2.3"],
        host_ip="127.77.0.1",
        netns_exec=(),
        forwards=[],
    )
    base.update(kw)
    return NetHandle(**base)  # type: ignore[arg-type]


def test_guest_cmdline() -> None:
    h = _handle()
    assert h.guest_cmdline() == [
        "fcvm.ip=10.0.2.100/24",
        "fcvm.gw=10.0.2.2",
        "fcvm.mtu=1500",
        "fcvm.dns=10.0.2.3",
    ]
    h6 = _handle(
        dns=["10.0.2.3", "fd00::3"], guest_ip6="fd00::100", prefix_len6=64, gateway6="fd00::2"
    )
    assert h6.guest_cmdline()[-3:] == [
        "fcvm.dns=10.0.2.3,fd00::3",
        "fcvm.ip6=fd00::100/64",
        "fcvm.gw6=fd00::2",
    ]
    assert all(" " not in a for a in h6.guest_cmdline())


def test_proxy_env() -> None:
    env = {
        "HTTP_PROXY": "http://127.0.0.1:3128",
        "https_proxy": "http://user:pw@localhost:3129/",
        "no_proxy": "localhost,.internal",
        "PATH": "/bin",
    }
    assert proxy_env(env) == {
        "http_proxy": "http://127.0.0.1:3128",
        "HTTP_PROXY": "http://127.0.0.1:3128",
        "https_proxy": "http://user:pw@localhost:3129/",
        "HTTPS_PROXY": "http://user:pw@localhost:3129/",
        "no_proxy": "localhost,.internal",
        "NO_PROXY": "localhost,.internal",
    }
    guest = _handle().proxy_env(env)
    assert guest["http_proxy"] == "http://10.0.2.2:3128"
    assert guest["https_proxy"] == "http://user:pw@10.0.2.2:3129/"
    assert guest["no_proxy"] == "localhost,.internal"
    assert _handle("bridged").proxy_env(env)["http_proxy"] == "http://127.0.0.1:3128"
    assert proxy_env({"http_proxy": "http://proxy.example:80"}, host_alias="10.0.2.2") == {
        "http_proxy": "http://proxy.example:80",
        "HTTP_PROXY": "http://proxy.example:80",
    }
    assert proxy_env({}) == {}


def test_iptables_rules_tagged_per_vm() -> None:
    rules = vm_rules(
        "fcvm:v1",
        "fcvmb3",
        "10.213.0.12/30",
        "10.213.0.14",
        [PortForward("0.0.0.0", 8080, 80, "tcp"), PortForward("127.0.0.2", 53, 53, "udp")],
    )
    every = rules["nat"] + rules["filter"]
    assert all("--comment fcvm:v1" in r for r in every)
    assert any("-j MASQUERADE" in r and "-s 10.213.0.12/30 ! -o fcvmb3" in r for r in every)
    dnat = [r for r in rules["nat"] if "DNAT" in r]
    assert len(dnat) == 4  # PREROUTING + OUTPUT per forward
    assert any(" -d " not in r and "--dport 8080" in r and "10.213.0.14:80" in r for r in dnat)
    assert any("-d 127.0.0.2/32 -p udp --dport 53" in r for r in dnat)
