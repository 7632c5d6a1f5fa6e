"""Why a VM died, from its logs (vmm/process.py's explain): recorded console text.

The files under data/console/ are real: console.log and qemu.log of VMs fcvm ran
under QEMU/TCG here (normal boot; `echo c > /proc/sysrq-trigger`; the agent, PID 1,
made to segfault through ptrace; sysrq power-off; sysrq reboot of a restored VM;
QEMU's own line on SIGTERM), except agent-failed.log: the agent's real logging
formatter printing a real exception raised inside serve() (no way to make the
running agent raise exists yet; see tests/vm/test_faults.py), its frames' paths
rewritten to the guest's.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from fcvm.vmm.process import explain, guest_cause, informative_tail, read_tail, vmm_cause

DATA = Path(__file__).with_name("data") / "console"


def console(name: str) -> str:
    return (DATA / name).read_text()


def test_a_normal_boot_explains_nothing() -> None:
    text = console("normal.log")
    assert "PCI: Fatal" in text  # every microvm boot says it...
    assert guest_cause(text) == ""
    assert informative_tail(text) == ""  # ...so it is never quoted
    assert explain("qemu", None, [""], text) == ""


def test_guest_kernel_panic() -> None:
    text = console("panic-sysrq.log")
    why = explain("qemu", 0, [""], text)
    assert why == "the guest kernel panicked: sysrq triggered crash"


def test_agent_segfault_is_the_agents_death() -> None:
    why = explain("qemu", 0, [""], console("agent-segv.log"))
    assert why == "the guest agent (PID 1) died of SIGSEGV"


def test_agent_failure_quotes_its_exception() -> None:
    why = explain("qemu", 0, [""], console("agent-failed.log"))
    exc = "ConnectionResetError: [Errno 104] Connection reset by peer"
    assert why == f"the guest agent failed: {exc}"


def test_guest_power_off_and_reboot() -> None:
    assert explain("qemu", 0, [""], console("poweroff.log")) == "the guest powered itself off"
    assert (
        explain("qemu", 0, [""], console("restored-reboot.log"))
        == "the guest rebooted, which ends its VM"
    )
    # a still running VM (the agent not answering) has not powered off because of that
    running = explain("qemu", None, [""], console("poweroff.log"))
    assert running == "sysrq: Power Off | reboot: Power down"


def test_vmm_killed_or_stopped_by_a_signal() -> None:
    normal = console("normal.log")
    assert explain("qemu", -signal.SIGKILL, [""], normal) == "qemu was killed by SIGKILL"
    assert explain("qemu", 0, [console("qemu-sigterm.log")], normal) == (
        "qemu was stopped by SIGTERM from pid 27349 (/root/.pyenv/versions/3.11.7/bin/python3)"
    )
    # the guest's own account wins over how the VMM ended afterwards
    assert explain("qemu", -9, [""], console("panic-sysrq.log")).startswith("the guest kernel")


def test_vmm_own_error_and_warnings() -> None:
    log = (
        "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.vmx\n"
        "qemu-system-x86_64: -drive id=root,file=/nope,format=raw,if=none,readonly=on: "
        "Could not open '/nope': No such file or directory\n"
    )
    assert vmm_cause(log).endswith("Could not open '/nope': No such file or directory")
    assert explain("qemu", 1, [log], "") == vmm_cause(log)
    only_warning = log.splitlines()[0]
    assert vmm_cause(only_warning) == ""
    assert explain("qemu", 1, [only_warning], "") == only_warning  # better than nothing


def test_qemu_abort_names_the_assertion_not_the_signal() -> None:
    log = "qemu-system-x86_64: ../../hw/virtio/virtio.c:123: virtqueue_pop: Assertion `x' failed.\n"
    assert explain("qemu", -signal.SIGABRT, [log], console("normal.log")) == log.strip()


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (
            "[ 5.1] BUG: kernel NULL pointer dereference, address: 0000000000000000\n"
            "[ 5.1] #PF: supervisor read access in kernel mode\n"
            "[ 5.1] Oops: 0000 [#1] PREEMPT SMP NOPTI\n"
            "[ 5.1] CPU: 0 PID: 77 Comm: podman Not tainted 6.1.0-57-cloud-amd64 #1\n"
            "[ 5.1] RIP: 0010:0x0\n"
            "[ 5.2] Kernel panic - not syncing: Fatal exception\n",
            "the guest kernel panicked: Fatal exception "
            "(BUG: kernel NULL pointer dereference, address: 0000000000000000)",
        ),
        (
            "[ 3.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n"
            "[ 3.0] CPU: 0 PID: 1 Comm: init Not tainted 6.1.0-57-cloud-amd64 #1\n",
            "the guest's init (PID 1) exited with 1",
        ),
        (
            "Traceback (most recent call last):\n"
            '  File "/usr/sbin/fcvm-agent", line 30, in <module>\n'
            "ModuleNotFoundError: No module named 'fcvm.agent.gone'\n"
            "[ 3.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n"
            "[ 3.0] CPU: 0 PID: 1 Comm: fcvm-agent Not tainted 6.1.0-57-cloud-amd64 #1\n",
            "the guest agent (PID 1) exited with 1 "
            "(ModuleNotFoundError: No module named 'fcvm.agent.gone')",
        ),
        (
            "fcvm-agent: crashed: MemoryError: \n[ 9.0] reboot: Power down\n",
            "the guest agent crashed: MemoryError:",
        ),
        (
            "fcvm-agent: cannot start: SyntaxError: invalid syntax (main.py, line 3)\n",
            "the guest agent could not start: SyntaxError: invalid syntax (main.py, line 3)",
        ),
        (
            "fcvm-init: warning: could not load fuse\nfcvm-init: root device /dev/vda not found\n"
            "[ 11.0] reboot: Power down\n",
            "the guest's init failed: root device /dev/vda not found",
        ),
        (
            '[ 1.0] VFS: Cannot open root device "vda" or unknown-block(0,0): error -6\n'
            "[ 1.0] Kernel panic - not syncing: "
            "VFS: Unable to mount root fs on unknown-block(0,0)\n",
            "the guest kernel panicked: VFS: Unable to mount root fs on unknown-block(0,0)",
        ),
    ],
)
def test_guest_causes(tail: str, expected: str) -> None:
    text = console("normal.log") + tail
    assert explain("qemu", 0, [""], text) == expected


def test_init_debug_lines_are_not_its_failure() -> None:
    text = (
        "fcvm-init: [0.52] modules loaded\n"
        "fcvm-init: fcvm.break=1: initrd shell; exit it to continue\n"
        "fcvm-init: warning: could not load fuse\n" + console("normal.log")
    )
    assert guest_cause(text) == ""


def test_agent_error_line_when_nothing_else() -> None:
    text = console("normal.log") + "fcvm-agent [9.0] ERROR container: podman exited 125\n"
    assert explain("qemu", None, [""], text) == "the guest agent said: container: podman exited 125"


def test_fallback_is_the_last_informative_lines() -> None:
    text = console("normal.log") + (
        "[ 40.0] rcu: INFO: rcu_sched self-detected stall on CPU\n"
        "[ 40.0] RIP: 0010:native_safe_halt+0xb/0x10\n"
        "[ 40.0]  do_idle+0x1f2/0x270\n"
    )
    assert explain("qemu", None, [""], text) == "rcu: INFO: rcu_sched self-detected stall on CPU"


def test_one_line_always() -> None:
    for f in DATA.iterdir():
        for code in (None, 0, -9):
            assert "\n" not in explain("qemu", code, [console(f.name)], console(f.name))


def test_read_tail_is_bounded(tmp_path: Path) -> None:
    p = tmp_path / "console.log"
    p.write_bytes(b"x" * 100 + b"\nfirst\n" + b"y\n" * 10 + b"last\n")
    assert read_tail(p, limit=20).splitlines()[-1] == "last"
    assert "x" not in read_tail(p, limit=20)
    assert read_tail(tmp_path / "missing") == ""
    assert read_tail(None) == ""
