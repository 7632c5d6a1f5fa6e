"""A VM network's helpers dying while it runs (NetHandle.check(), net/watch.py), for real.

No VM: the stand-in guest of test_net_support.py sits where the VM would, so the
traffic takes the VM's path (slirp4netns or veth+DNAT, then br0). The Machine calls
check() every 50 ms; here the tests call it in the same way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fcvm.net import NetHandle, parse_publish, setup_network, teardown_from_record, watch
from fcvm.net.proc import start_time
from tests.host.test_net import assert_gone, free_port, leases
from tests.host.test_net_support import FakeGuest, expect, ns_inode, roundtrip, run_in

pytestmark = [
    pytest.mark.host,
    pytest.mark.usefixtures("base"),
    pytest.mark.skipif(os.geteuid() != 0, reason="host network tests run as root"),
    pytest.mark.timeout(120),
]

SUPPORT = Path(__file__).with_name("net_faults_support.py")
SRC = Path(__file__).resolve().parents[2] / "src"


def checks_until_settled(h: NetHandle, timeout: float = 5.0) -> tuple[str | None, float]:
    """Call check() as the Machine does until no replacement is pending: (its last
    answer, seconds taken)."""
    t0 = time.monotonic()
    while True:
        line = h.check()
        w = h._watch
        if line is not None or (w is not None and not w.pending):
            return line, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError("a replacement never settled")
        time.sleep(0.05)


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2
    while start_time(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.005)  # dead (a zombie until check() reaps it)


def not_a_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # reaped
    return stat[stat.rfind(")") + 2] != "Z"


def test_slirp4netns_killed_is_restarted_with_its_ports(tmp_path: Path, base: Path) -> None:
    port = free_port()
    h = setup_network("sk1", "rootless", parse_publish([f"{port}:8080"]), workdir=tmp_path / "w")
    first = h.record()
    try:
        with FakeGuest(h) as g:
            g.serve("guest", 8080)
            assert roundtrip(h.host_ip, port, n=1 << 16) == expect("guest", 1 << 16)
            assert h.check() is None  # all well: nothing to do
            old = int(first["slirp"][0])
            kill9(old)
            line, took = checks_until_settled(h)
            assert line is None
            assert took < 2.0, f"restart took {took:.2f} s"  # the issue: "a second or two"
            assert not_a_zombie(old)
            new = h.record()["slirp"]
            assert new[0] != old and start_time(new[0]) == new[1]
            assert leases(base)["sk1"]["slirp"] == new  # the lease names the new one
            # the same port, the same guest: new connections work (old ones broke)
            assert roundtrip(h.host_ip, port) == expect("guest", 1 << 20)
        # teardown from the record as it was before the restart (the VM's state record
        # is such a copy) still ends the new slirp4netns: the lease names it
        teardown_from_record(first)
        assert start_time(new[0]) != new[1]
        assert "sk1" not in leases(base)
    finally:
        h.teardown()
    assert_gone(first)
    assert_gone(h.record())


@pytest.mark.parametrize("mode", ["rootless", "bridged"])
def test_holder_killed_breaks_nothing(mode: str, tmp_path: Path) -> None:
    port = free_port()
    h = setup_network("hk1", mode, parse_publish([f"{port}:8080"]), workdir=tmp_path / "w")
    first = h.record()
    holder = int(first["holder"][0])
    inode = ns_inode(holder)
    host = h.host_ip if mode == "rootless" else "127.0.0.1"
    try:
        with FakeGuest(h) as g:  # (it keeps the namespace's bridge busy, as a VMM would)
            g.serve("guest", 8080)
            kill9(holder)
            assert h.check() is None
            assert not_a_zombie(holder)
            assert h.check() is None and h._watch is not None and not h._watch.pending
            # the way in does not go through the holder: a VMM started now gets in
            assert str(os.getpid()) in " ".join(h.netns_exec)
            assert "br0" in run_in(h.netns_exec, "ip", "-o", "link")
            out = run_in(h.netns_exec, "sh", "-c", "stat -L -c %i /proc/self/ns/net")
            assert int(out) == inode  # the same namespace, alive without its holder
            # traffic never stopped
            assert roundtrip(host, port, n=1 << 16) == expect("guest", 1 << 16)
            if mode == "rootless":  # and slirp4netns can still be restarted
                kill9(int(h.record()["slirp"][0]))
                assert checks_until_settled(h)[0] is None
                assert roundtrip(host, port, n=4096) == expect("guest", 4096)
    finally:
        h.teardown()
    assert_gone(h.record(), inode)


def test_both_helpers_killed_at_once(tmp_path: Path) -> None:
    port = free_port()
    h = setup_network("bk1", "rootless", parse_publish([f"{port}:80"]), workdir=tmp_path / "w")
    try:
        with FakeGuest(h) as g:
            g.serve("guest", 80)
            rec = h.record()
            kill9(int(rec["holder"][0]))
            kill9(int(rec["slirp"][0]))
            assert checks_until_settled(h)[0] is None
            assert roundtrip(h.host_ip, port, n=4096) == expect("guest", 4096)
    finally:
        h.teardown()
    assert_gone(h.record())


@pytest.mark.parametrize("mode", ["rootless", "bridged"])
def test_no_fd_left_after_restarts(mode: str, tmp_path: Path) -> None:
    """Pipes and namespace fds of dead helpers and their replacements are all closed."""
    before = sorted(os.listdir("/proc/self/fd"))
    h = setup_network("fd1", mode, [], workdir=tmp_path / "w")
    try:
        for _ in range(2):
            for key in ("holder", "slirp"):
                v = h.record().get(key)
                if v and start_time(v[0]) == v[1]:
                    kill9(int(v[0]))
            assert checks_until_settled(h)[0] is None
    finally:
        h.teardown()
    assert_gone(h.record())
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_a_helper_that_keeps_dying_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch, "MAX_RESTARTS", 1)
    h = setup_network("kd1", "rootless", [], workdir=tmp_path / "w")
    try:
        kill9(int(h.record()["slirp"][0]))
        assert checks_until_settled(h)[0] is None
        pid = int(h.record()["slirp"][0])
        kill9(pid)
        line = h.check()
        assert line == (
            f"slirp4netns (pid {pid}) was killed by SIGKILL (2 times in 60 s): not restarted again"
        )
        assert not_a_zombie(pid)
    finally:
        h.teardown()
    assert_gone(h.record())


def test_a_replacement_that_cannot_start_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = setup_network("rf1", "rootless", [], workdir=tmp_path / "w")
    try:
        pid = int(h.record()["slirp"][0])
        monkeypatch.setenv("PATH", str(tmp_path))  # no slirp4netns to start any more
        kill9(pid)
        line = h.check()
        assert line is not None
        assert line.startswith(f"slirp4netns (pid {pid}) was killed by SIGKILL and could not")
        assert "slirp4netns not found" in line
    finally:
        monkeypatch.undo()
        h.teardown()
    assert_gone(h.record())


def test_bridged_veth_deleted_is_reported(tmp_path: Path) -> None:
    h = setup_network("vd1", "bridged", [], workdir=tmp_path / "w")
    try:
        veth = h.record()["veth"]
        subprocess.run(["ip", "link", "del", veth], check=True)
        assert h.check() == f"its host link {veth} was deleted"
    finally:
        h.teardown()
    assert_gone(h.record())


def test_unprivileged_slirp4netns_restart(tmp_path: Path) -> None:
    """Rootless as a normal user: the restart enters the user namespace by fcvm's fd."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="fcvm-net-faults-"))
    d.chmod(0o777)
    tun = os.stat("/dev/net/tun").st_mode & 0o7777
    try:
        os.chmod("/dev/net/tun", 0o666)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(d),
               "FCVM_BASE_DIR": str(d / "base"), "PYTHONPATH": str(SRC)}  # fmt: skip
        r = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
             str(SUPPORT), str(d / "w")],
            capture_output=True, text=True, env=env, timeout=90,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        out: dict[str, Any] = json.loads(r.stdout)
        assert out["userns"] is True
        assert out["check"] is None
        assert out["restarted"] and out["answer_after"] == out["expected"]
        assert out["leases_left"] == [] and not out["alive_after_teardown"]
    finally:
        os.chmod("/dev/net/tun", tun)
        shutil.rmtree(d, ignore_errors=True)


def test_teardown_while_a_replacement_starts(tmp_path: Path) -> None:
    before = sorted(os.listdir("/proc/self/fd"))
    h = setup_network("tw1", "rootless", [], workdir=tmp_path / "w")
    for key in ("holder", "slirp"):
        kill9(int(h.record()[key][0]))
    assert h.check() is None  # slirp4netns' replacement launched, not yet ready
    assert h._watch is not None and set(h._watch.pending) == {"slirp"}
    h.teardown()
    assert_gone(h.record())
    assert sorted(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("mode", ["rootless", "bridged"])
def test_owner_killed_during_setup_is_reaped_from_the_lease(
    mode: str, tmp_path: Path, base: Path
) -> None:
    """A VM record holds no network yet when its owner dies inside setup_network: the
    reaper finds the lease by the VM's id."""
    from fcvm.net import reap_record
    from fcvm.state import VmRecord
    from tests.host.test_net import _setup_then_kill9

    port = free_port()
    rec = _setup_then_kill9("ks1", mode, f"{port}:80", tmp_path / "w")
    assert "ks1" in leases(base)
    reap_record(VmRecord(vm_id="ks1", name="x"))  # (network: {})
    assert_gone(rec)
    reap_record(VmRecord(vm_id="ks1", name="x"))  # nothing left to do
