"""Faults of real VMs: a network helper killed (slirp4netns restarted, the namespace
holder not needed: the VM keeps serving its published port), the VMM killed, the guest
kernel panicking and the guest agent (PID 1) crashing (one line each, exit 125), and
bench/faults.py's short form (nothing left behind).

The agent is made to crash the way an interpreter crash would: from `fcvm exec --vm`,
ptrace attaches to PID 1 and points its instruction pointer at 0, so it takes a real
SIGSEGV (a signal *sent* to PID 1 is ignored by the kernel, even SIGKILL). A Python
exception inside the agent ("agent failed" + traceback) has no such way in yet; its
classification is tested on recorded text in tests/unit/test_vmm_logs.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, fcvm
from tests.vm.runs import start_run as _start
from tests.vm.runs import wait_healthy

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300), pytest.mark.usefixtures("no_leftovers")]

# PID 1 made to fault: ptrace attach, instruction pointer to 0, detach.
SEGV_PID1 = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long
names = ("r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags "
         "rsp ss fs_base gs_base ds es fs gs").split()
class Regs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_ulonglong) for n in names]
if libc.ptrace(16, 1, None, None) != 0:  # PTRACE_ATTACH
    raise OSError(ctypes.get_errno(), "ptrace attach")
os.waitpid(1, 0x40000000)  # __WALL
r = Regs()
libc.ptrace(12, 1, None, ctypes.byref(r))  # PTRACE_GETREGS
r.rip = 0
r.orig_rax = ctypes.c_ulonglong(-1).value  # no system call to restart
libc.ptrace(13, 1, None, ctypes.byref(r))  # PTRACE_SETREGS
libc.ptrace(17, 1, None, None)  # PTRACE_DETACH
"""




def _end(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def _httpd(port: int, text: str) -> tuple[str, ...]:
    return ("sh", "-c", f"mkdir -p /tmp/w && echo {text} > /tmp/w/i.html && "
            f"exec httpd -f -p {port} -h /tmp/w")  # fmt: skip


def _get(url: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(url, timeout=5) as r:
                return r.read().decode().strip()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lease(vm_id: str) -> dict[str, Any]:
    from fcvm import paths

    leases = json.loads((paths.net_dir() / "leases.json").read_text())["leases"]
    return leases[vm_id]  # type: ignore[no-any-return]


def _start_time(pid: int) -> int | None:
    from fcvm.state import process_start_time

    return process_start_time(pid)


def _no_zombie(pid: int, timeout: float = 1.0) -> bool:
    """pid (just sent SIGKILL) is gone for good within timeout: reaped by fcvm's
    watchdog, not left a zombie."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.02)
    return False


def _kill_slirp_and_wait_restarted(vm_id: str, timeout: float = 2.0) -> list[int]:
    """SIGKILL the VM's slirp4netns; the new one's [pid, start] once the lease names
    it (the issue asks for "within a second or two")."""
    old = _lease(vm_id)["slirp"]
    os.kill(old[0], signal.SIGKILL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        new = _lease(vm_id)["slirp"]
        if new != old and _start_time(new[0]) == new[1]:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"slirp4netns was not restarted within {timeout} s")
    assert _no_zombie(old[0]), f"slirp4netns pid {old[0]} left a zombie"
    return list(new)


def _kill_holder(vm_id: str) -> None:
    holder = _lease(vm_id)["holder"][0]
    os.kill(holder, signal.SIGKILL)
    assert _no_zombie(holder), f"the namespace holder pid {holder} left a zombie"


def _ls(name: str) -> dict[str, Any]:
    recs = [r for r in json.loads(fcvm("ls", "--json", check=True).stdout) if r["name"] == name]
    assert len(recs) == 1
    return recs[0]  # type: ignore[no-any-return]


def test_rootless_helpers_killed_the_port_answers_again(test_image: str) -> None:
    port = _free_port()
    p = _start("t-fault-rl", test_image, "-p", f"{port}:80",
               "--health-check", "http://127.0.0.1:80/i.html", cmd=_httpd(80, "rl"))  # fmt: skip
    try:
        rec = wait_healthy("t-fault-rl", p)
        url = f"http://{rec['network']['host_ip']}:{port}/i.html"
        assert _get(url) == "rl"
        _kill_slirp_and_wait_restarted(rec["vm_id"])
        assert _get(url, timeout=2) == "rl"  # the published port answers again
        assert _ls("t-fault-rl")["health"] == "healthy"
        _kill_holder(rec["vm_id"])
        assert _get(url, timeout=2) == "rl"  # (the holder's death breaks nothing)
        slirp = _kill_slirp_and_wait_restarted(rec["vm_id"])  # once more, without a holder
        assert _get(url, timeout=2) == "rl"
        assert p.poll() is None
        p.send_signal(signal.SIGINT)  # (forwarded to httpd, which ignores it)...
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)  # ...a second one stops the VM
        code, err = _end(p)
    finally:
        if p.poll() is None:
            p.kill()
    assert code == 130
    assert err.count("slirp4netns is running again") == 2, err  # a warning line each time
    assert "the namespace holder (pid" in err
    # everything of the VM's network is gone: the replacements too
    assert _start_time(slirp[0]) is None
    from fcvm import paths

    assert rec["vm_id"] not in (paths.net_dir() / "leases.json").read_text()


def test_bridged_holder_killed_then_vmm_killed(test_image: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("bridged networking needs root")
    port = _free_port()
    p = _start("t-fault-br", test_image, "--network", "bridged", "-p", f"{port}:80",
               "--health-check", "http://127.0.0.1:80/i.html", cmd=_httpd(80, "br"))  # fmt: skip
    try:
        rec = wait_healthy("t-fault-br", p)
        _kill_holder(rec["vm_id"])
        assert _get(f"http://127.0.0.1:{port}/i.html", timeout=2) == "br"
        os.kill(int(rec["vmm_pid"]), signal.SIGKILL)
        code, err = _end(p)
    finally:
        if p.poll() is None:
            p.kill()
    assert code == 125
    last = err.strip().splitlines()[-1]
    assert (
        last
        == "fcvm: the VM stopped unexpectedly (qemu was killed by SIGKILL)"
    )
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    assert f"fcvm:{rec['vm_id']}" not in rules


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (
            ["sh", "-c", "echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger"],
            "the guest kernel panicked: sysrq triggered crash",
        ),
        (["python3", "-c", SEGV_PID1], "the guest agent (PID 1) died of SIGSEGV"),
    ],
    ids=["kernel-panic", "agent-crash"],
)
def test_guest_death_is_named_in_one_line(
    test_image: str, script: list[str], expected: str
) -> None:
    name = "t-fault-guest"
    p = _start(name, test_image, cmd=("sleep", "600"))
    try:
        wait_healthy(name, p)
        fcvm("exec", "--name", name, "--vm", "--", *script, timeout=60)
        code, err = _end(p)
    finally:
        if p.poll() is None:
            p.kill()
    assert code == 125
    assert err.strip().splitlines() == [
        f"fcvm: the VM stopped unexpectedly (qemu exited with 0) ({expected})"
    ]


def test_fault_harness_short_form(test_image: str) -> None:
    """bench/faults.py with a few runs: every victim once (the page server's run with
    its named snapshot made and removed, and two clones of it that end normally), both
    modes, nothing left behind."""
    env = {k: v for k, v in os.environ.items() if k != "FCVM_BASE_DIR"}
    if "FCVM_ASSETS_DIR" not in env:
        from fcvm import paths

        env["FCVM_ASSETS_DIR"] = str(paths.assets_dir())
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "faults.py"), "--runs", "6", "--sleep", "2"],
        capture_output=True, text=True, env=env, timeout=280,
    )  # fmt: skip
    assert r.stdout, r.stderr
    out = json.loads(r.stdout)
    assert out["left_behind_total"] == dict.fromkeys(out["left_behind_total"], 0), r.stdout
    assert r.returncode == 0, r.stderr[-2000:]
    assert sum(v["runs"] for v in out["per_victim"].values()) == 6
    assert all(v["runs"] == 1 and v["hung"] == 0 for v in out["per_victim"].values())
    served = out["per_victim"]["pageserver"]["pageserver"]
    assert served["unexpected_clone_exits"] == [], r.stdout
    assert sum(served["clone_exit_codes"].values()) == 2  # (exec and attached)
    named = out["named_snapshot"]
    assert named["ok"] and named["rm_exit_code"] == 0, named
