"""fcvm as a Python library, on real VMs: the README's example as written, and the API.

One started VM is shared by the exec tests (booting under TCG costs seconds).
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import time
import warnings
from collections.abc import Iterator

import pytest

import fcvm
from tests.conftest import REPO
from tests.conftest import fcvm as fcvm_cli

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md's Python API section has no python block"
    return match.group(1)


@pytest.mark.usefixtures("no_leftovers")
def test_the_readme_example_runs_as_written(test_image: str) -> None:
    exec(compile(readme_example(), "README.md", "exec"), {})


@pytest.fixture(scope="module")
def vm(test_image: str) -> Iterator[fcvm.VM]:
    with fcvm.start(test_image, "echo started; exec sleep 3600", name="t-api",
                    publish=["18080:80"], env={"FROM_START": "yes"}) as machine:  # fmt: skip
        yield machine
    assert not machine.running


def test_exec_captures_output_and_exit_code(vm: fcvm.VM) -> None:
    r = vm.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.exit_code, r.stdout, r.stderr, r.ok) == (7, b"out\n", b"err\n", False)
    assert r.args == ("sh", "-c", "echo out; echo err >&2; exit 7")
    assert vm.exec("echo $FROM_START").stdout_text == "yes\n"  # the container's env
    assert vm.exec("pwd; id -u", cwd="/tmp", user="65534").stdout_text == "/tmp\n65534\n"
    assert vm.exec("echo $X", env={"X": "1"}).stdout == b"1\n"


def test_exec_stdin_bytes(vm: fcvm.VM) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    r = vm.exec(["md5sum"], input=data, check=True)
    import hashlib

    assert r.stdout_text.split()[0] == hashlib.md5(data).hexdigest()
    assert vm.exec("cat", input=bytearray(b"ba")).stdout == b"ba"  # (any bytes-like)
    with pytest.raises(TimeoutError, match=r"its container did not exit within 0.1 s"):
        vm.wait(0.1)  # (the message was empty)
    assert vm.exec("true").exit_code == 0  # it goes on


def test_exec_in_the_guest_os(vm: fcvm.VM) -> None:
    probe = "test -x /usr/bin/podman && echo guest || echo container"
    assert vm.exec(probe, vm=True).stdout == b"guest\n"
    assert vm.exec(probe).stdout == b"container\n"


def test_a_command_that_cannot_start_is_a_result(vm: fcvm.VM, test_image: str) -> None:
    """As the CLI: 127 (not found) and 126 with the reason on stderr (it raised)."""
    missing = vm.exec(["no-such-command"])
    assert missing.exit_code == 127 and b"no-such-command" in missing.stderr
    assert vm.exec(["/etc"]).exit_code == 126
    with pytest.raises(fcvm.ProcessFailed):
        vm.exec(["no-such-command"], check=True)
    done = fcvm.run(test_image, ["no-such-command"], name="t-api-127")
    assert done.exit_code == 127 and b"no-such-command" in done.stderr


def test_check_raises_with_the_result_attached(vm: fcvm.VM) -> None:
    with pytest.raises(fcvm.ProcessFailed) as info:
        vm.exec("echo partial; exit 3", check=True)
    assert info.value.result.exit_code == 3 and info.value.result.stdout == b"partial\n"
    assert info.value.exit_code == 3


def test_timeout_really_stops_the_command(vm: fcvm.VM) -> None:
    with pytest.raises(fcvm.ExecTimeout) as info:
        vm.exec("echo before; exec sleep 123", vm=True, timeout=1.5)
    assert info.value.result.stdout == b"before\n" and info.value.result.exit_code == 137
    assert isinstance(info.value, TimeoutError)
    left = vm.exec("ps -eo args | grep '^sleep 123' || true", vm=True).stdout
    assert left == b""


def test_published_ports_and_addresses(vm: fcvm.VM) -> None:
    (port,) = vm.ports
    assert (port.guest_port, port.host_port, port.proto) == (80, 18080, "tcp")
    assert vm.address(80) == (port.host_ip, 18080)
    assert port.host_ip.startswith("127.")
    assert vm.guest_ip == "10.0.2.100"
    with pytest.raises(fcvm.UsageError, match="not published"):
        vm.address(81)
    listed = {r["name"]: r for r in json.loads(fcvm_cli("ls", "--json", check=True).stdout)}
    assert listed["t-api"]["network"]["host_ip"] == port.host_ip  # the CLI sees it too


def test_output_of_the_started_container(vm: fcvm.VM) -> None:
    assert vm.output()[0] == b"started\n"


def test_async_api_has_the_same_names(test_image: str) -> None:
    async def main() -> tuple[int, bytes, bytes]:
        async with await fcvm.aio.start(test_image, ["sleep", "600"], name="t-aio") as avm:
            r1, r2 = await asyncio.gather(avm.exec("echo one"), avm.exec("echo two"))
            waiting = asyncio.create_task(avm.wait())
            await asyncio.sleep(0.1)
        with pytest.raises(fcvm.StateError, match="stopped before"):  # waiting meanwhile
            await waiting
        with pytest.raises(fcvm.StateError, match="stopped before"):  # and afterwards
            await avm.wait()
        done = await fcvm.aio.run(test_image, "cat", input="piped")
        return done.exit_code, r1.stdout + r2.stdout, done.stdout

    code, both, piped = asyncio.run(main())
    assert (code, both, piped) == (0, b"one\ntwo\n", b"piped")


@pytest.mark.usefixtures("no_leftovers")
def test_one_shot_run_and_its_errors(test_image: str) -> None:
    done = fcvm.run(test_image, ["sh", "-c", "cat; exit 5"], input=b"x", name="t-api-run")
    assert (done.exit_code, done.stdout, done.stderr) == (5, b"x", b"")
    with pytest.raises(fcvm.ProcessFailed):
        fcvm.run(test_image, "exit 1", check=True, name="t-api-run")
    # Bad input: the CLI's one-line messages, before any VM.
    with pytest.raises(fcvm.UsageError, match=r"--cpu 0: must be between"):
        fcvm.run(test_image, "true", cpus=0)
    with pytest.raises(fcvm.UsageError, match="unknown option 'cpu'"):
        fcvm.run(test_image, "true", cpu=2)  # type: ignore[call-arg]
    with pytest.raises(fcvm.ImageError, match="not found"):
        fcvm.run("no-such-image-here", "true")
    # A lone string where a list belongs was read letter by letter ('invalid --publish
    # '8''); a timeout of 0 or below timed out at once.
    with pytest.raises(fcvm.UsageError, match="publish is a list of strings"):
        fcvm.run(test_image, "true", publish="8080:80")  # type: ignore[arg-type]
    with pytest.raises(fcvm.UsageError, match="env is a mapping or a list"):
        fcvm.run(test_image, "true", env="A=1")
    # Wrong types are UsageErrors, not AttributeErrors, and a wrong stdin type hung.
    with pytest.raises(fcvm.UsageError, match="input is bytes or str, not int"):
        fcvm.run(test_image, "cat", input=5)  # type: ignore[arg-type]
    with pytest.raises(fcvm.UsageError, match="image is a string"):
        fcvm.run(None, "true")  # type: ignore[arg-type]
    with pytest.raises(fcvm.UsageError, match="name is a string, not int"):
        fcvm.run(test_image, "true", name=5)  # type: ignore[typeddict-item]
    for bad in (0, -1):
        with pytest.raises(fcvm.UsageError, match="timeout"):
            fcvm.run(test_image, "true", timeout=bad)
    with fcvm.start(test_image, "sleep 600", name="t-api-dup") as dup, pytest.raises(
        fcvm.StateError, match="already running"
    ):
        fcvm.run(test_image, "true", name="t-api-dup")
    with pytest.raises(fcvm.UsageError, match="timeout"):
        dup.exec("true", timeout=0)
    with pytest.raises(fcvm.UsageError, match="input is bytes or str"):
        dup.exec("cat", input=[1])  # type: ignore[arg-type]
    # Stopped (leaving `with`) before its container exited: wait() says so (it raised
    # a bare CancelledError).
    with pytest.raises(fcvm.StateError, match="stopped before its container exited"):
        dup.wait()


@pytest.mark.usefixtures("no_leftovers")
def test_stop_while_another_thread_execs(test_image: str) -> None:
    """The exec's caller learns that the VM was stopped (a StateError), not that it
    died unexpectedly (a GuestError naming QEMU's exit)."""
    import threading

    vm = fcvm.start(test_image, "sleep 600", name="t-api-race")
    got: list[BaseException] = []

    def run() -> None:
        try:
            vm.exec("echo begin; sleep 60")
        except BaseException as exc:  # (what it was is the point)
            got.append(exc)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.0)
    vm.stop()
    t.join(60)
    assert len(got) == 1 and isinstance(got[0], fcvm.StateError), got
    assert "was stopped while the command ran" in str(got[0])


@pytest.mark.usefixtures("no_leftovers")
def test_a_forgotten_vm_warns_and_is_stopped(test_image: str) -> None:
    vm = fcvm.start(test_image, "sleep 600", name="t-api-gc")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del vm
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = [r["name"] for r in json.loads(fcvm_cli("ls", "--json", check=True).stdout)]
        if "t-api-gc" not in names:
            break
        time.sleep(0.2)
    assert "t-api-gc" not in names
    time.sleep(0.5)  # the teardown ends just after the record goes
