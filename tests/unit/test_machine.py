"""The machine layer's ownership of a VM's resources, with fake parts.

Each part (record, network, VMM, session, control socket) is a fake that logs what is
made and undone, and can be told to fail. What must hold on every path: each undo
runs exactly once, in the reverse order of creation, whatever step fails (or is
cancelled), and a VMM that dies is reported as the cause.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from fcvm import state
from fcvm.errors import GuestError, StateError
from fcvm.machine import Machine, MachineSpec, Parts, Phase
from fcvm.machine.spec import DriveSpec
from fcvm.net.publish import PortForward
from fcvm.vmm.base import Capabilities, SnapshotFiles
from fcvm.vmm.select import Choice
from fcvm.volumes.spec import VolumeMap
from tests.unit.aio import arun

pytestmark = pytest.mark.unit

STEPS = ("record", "network", "vmm", "session", "volumes", "control")


class Boom(Exception):
    pass


class Log:
    def __init__(self, fail_at: str | None = None, hang_at: str | None = None) -> None:
        self.events: list[str] = []
        self.fail_at = fail_at
        self.hang_at = hang_at

    async def make(self, step: str) -> None:
        if step == self.hang_at:
            self.events.append(f"+{step}?")
            await asyncio.Event().wait()
        if step == self.fail_at:
            raise Boom(step)
        self.events.append(f"+{step}")

    def make_now(self, step: str) -> None:
        if step == self.fail_at:
            raise Boom(step)
        self.events.append(f"+{step}")

    def undo(self, step: str) -> None:
        self.events.append(f"-{step}")


class FakeRecords:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.updates: list[dict[str, Any]] = []
        self.reapers: list[str] = []

    def create(self, record: state.VmRecord) -> None:
        self.log.make_now("record")

    def update(self, record: state.VmRecord, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(record, key, value)
        self.updates.append(changes)

    def add_reaper(self, record: state.VmRecord, reaper: state.Reaper) -> None:
        self.reapers.append(reaper.__name__)

    def remove(self, vm_id: str) -> None:
        self.log.undo("record")


class FakeNet:
    netns_exec = ("nsenter", "--target=1", "--")
    host_ip = "127.77.0.9"
    guest_ip = "10.0.2.100"

    mac = "02:fc:00:00:00:01"

    def __init__(self, log: Log, forwards: list[PortForward]) -> None:
        self.log = log
        self.forwards = forwards
        self.dead: str | None = None

    def record(self) -> dict[str, Any]:
        return {"host_ip": self.host_ip}

    def guest_cmdline(self) -> list[str]:
        return ["fcvm.ip=10.0.2.100/24"]

    def vmm_net(self) -> Any:
        return None

    def proxy_env(self) -> dict[str, str]:
        return {}

    def teardown(self) -> None:
        self.log.undo("network")

    def check(self) -> str | None:
        return self.dead


class FakeVmm:
    name = "fake"
    pid = 4242

    def __init__(self, log: Log, config: Any) -> None:
        self.log = log
        self.config = config
        self.exit_code: int | None = None

    def start(self) -> None:
        self.log.make_now("vmm")

    def poll(self) -> int | None:
        return self.exit_code

    def stop(self, timeout: float = 5.0) -> None:
        self.log.undo("vmm")

    def failure_detail(self) -> str:
        return "Kernel panic - not syncing: test"


class FakeSession:
    def __init__(self, log: Log) -> None:
        self.log = log

    async def close(self) -> None:
        self.log.undo("session")


class FakeControl:
    def __init__(self, log: Log) -> None:
        self.log = log

    def close(self) -> None:
        self.log.undo("control")


class FakeVolumes:
    def __init__(self, log: Log, maps: tuple[VolumeMap, ...]) -> None:
        log.make_now("volumes")
        self.log = log
        self.maps = maps

    def stop(self) -> None:
        self.log.undo("volumes")


def fake_parts(log: Log) -> tuple[Parts, dict[str, Any]]:
    made: dict[str, Any] = {}

    def setup_network(vm_id: str, mode: str, publish: list[PortForward], workdir: Path) -> Any:
        log.make_now("network")
        made["net"] = FakeNet(log, publish)
        return made["net"]

    def make_vmm(choice: Choice, config: Any) -> Any:
        made["vmm"] = FakeVmm(log, config)
        return made["vmm"]

    async def open_session(vmm: Any, timeout: float, resume: bool = False, mark: Any = None
                           ) -> Any:  # fmt: skip
        await log.make("session")
        return FakeSession(log)

    async def start_control(path: Path, session: Any, on_request: Any = None) -> Any:
        assert callable(session) and callable(on_request)
        await log.make("control")
        return FakeControl(log)

    def reaper() -> state.Reaper:
        def reap_net(record: state.VmRecord) -> None: ...

        return reap_net

    records = FakeRecords(log)
    made["records"] = records
    def serve_volumes(maps: tuple[VolumeMap, ...], vmm: Any) -> Any:
        made["volumes"] = FakeVolumes(log, maps)
        return made["volumes"]

    parts = Parts(records=records, setup_network=setup_network, network_reaper=reaper,
                  make_vmm=make_vmm, open_session=open_session,
                  start_control=start_control, serve_volumes=serve_volumes)  # fmt: skip
    return parts, made


def spec(tmp_path: Path, **kw: Any) -> MachineSpec:
    base: dict[str, Any] = dict(
        name="t-vm", backend=Choice("qemu", "tcg", "test"), kernel=tmp_path / "k",
        initrd=tmp_path / "i", rootfs=tmp_path / "r",
        maps=(VolumeMap(tmp_path, "/data"),),
    )  # fmt: skip
    base.update(kw)
    return MachineSpec(**base)


def test_start_makes_everything_in_order_and_stop_undoes_in_reverse(tmp_path: Path) -> None:
    log = Log()
    parts, made = fake_parts(log)

    async def main() -> None:
        m = Machine(spec(tmp_path, publish=(PortForward("", 8080, 80, "tcp"),)), parts=parts)
        async with m:
            assert m.phase is Phase.RUNNING
            assert log.events == [f"+{s}" for s in STEPS]
            assert m.record.status == "running" and m.record.vmm_pid == 4242
            assert made["records"].reapers == ["reap_net"]
            assert made["net"].forwards == [PortForward("", 8080, 80, "tcp")]
            assert made["volumes"].maps == (VolumeMap(tmp_path, "/data"),)
        assert m.phase is Phase.STOPPED
        await m.stop()  # idempotent

    arun(main())
    assert log.events == [f"+{s}" for s in STEPS] + [f"-{s}" for s in reversed(STEPS)]


@pytest.mark.parametrize("failing", STEPS)
def test_a_failure_at_any_step_undoes_exactly_what_was_made(tmp_path: Path, failing: str) -> None:
    log = Log(fail_at=failing)
    parts, _ = fake_parts(log)

    async def main() -> None:
        with pytest.raises(Boom):
            await Machine(spec(tmp_path), parts=parts).start()

    arun(main())
    made = list(STEPS[: STEPS.index(failing)])
    # The VMM's stop is registered before its start: a VMM that failed to start may
    # have left a process, so it is stopped too.
    undone = [*made, "vmm"] if failing == "vmm" else made
    assert log.events == [f"+{s}" for s in made] + [f"-{s}" for s in reversed(undone)]


@pytest.mark.parametrize("hanging", ["session", "control"])
def test_cancelled_while_starting_undoes_everything(tmp_path: Path, hanging: str) -> None:
    log = Log(hang_at=hanging)
    parts, _ = fake_parts(log)

    async def main() -> None:
        task = asyncio.create_task(Machine(spec(tmp_path), parts=parts).start())
        while f"+{hanging}?" not in log.events:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    arun(main())
    made = [s for s in STEPS[: STEPS.index(hanging)]]
    assert log.events == [*(f"+{s}" for s in made), f"+{hanging}?",
                          *(f"-{s}" for s in reversed(made))]  # fmt: skip


def test_a_second_cancel_does_not_cut_the_teardown_short(tmp_path: Path) -> None:
    log = Log()
    parts, _ = fake_parts(log)
    slow_close = asyncio.Event()

    class SlowSession(FakeSession):
        async def close(self) -> None:
            await slow_close.wait()
            await super().close()

    async def open_session(vmm: Any, timeout: float, resume: bool = False, mark: Any = None
                           ) -> Any:  # fmt: skip
        return SlowSession(log)

    parts = Parts(**{**parts.__dict__, "open_session": open_session})

    async def main() -> None:
        m = Machine(spec(tmp_path), parts=parts)
        await m.start()
        stopping = asyncio.create_task(m.stop())
        await asyncio.sleep(0.01)
        stopping.cancel()  # e.g. a second Ctrl-C during teardown
        await asyncio.sleep(0.01)
        slow_close.set()
        with pytest.raises(asyncio.CancelledError):
            await stopping

    arun(main())
    assert log.events[-6:] == ["-control", "-volumes", "-session", "-vmm", "-network", "-record"]


def test_start_twice_is_refused(tmp_path: Path) -> None:
    log = Log()
    parts, _ = fake_parts(log)

    async def main() -> None:
        m = Machine(spec(tmp_path), parts=parts)
        async with m:
            with pytest.raises(StateError, match="cannot start again"):
                await m.start()

    arun(main())


def test_supervise_reports_a_dead_vmm_as_the_cause(tmp_path: Path) -> None:
    log = Log()
    parts, made = fake_parts(log)

    async def main() -> None:
        async with Machine(spec(tmp_path), parts=parts) as m:
            assert await m.supervise(asyncio.sleep(0, result=5)) == 5

            async def work() -> None:
                made["vmm"].exit_code = 137
                await asyncio.sleep(30)

            with pytest.raises(GuestError) as info:
                await m.supervise(work())
            assert "qemu" not in str(info.value)  # the fake's name, not a guess
            assert "fake exited with 137" in str(info.value)
            assert "Kernel panic" in info.value.line()

            async def lost() -> None:  # the session dies first, then the VMM is seen dead
                made["vmm"].exit_code = 1
                raise ConnectionResetError("lost")

            with pytest.raises(GuestError, match="fake exited with 1"):
                await m.supervise(lost())

    arun(main())


def test_drives_get_their_devices_in_one_place(tmp_path: Path) -> None:
    s = spec(tmp_path, drives=(DriveSpec("storage", read_only=False, blank_size=1 << 30),
                               DriveSpec("images", tmp_path / "s")))  # fmt: skip
    assert [s.device(n) for n in ("root", "storage", "images")] == [
        "/dev/vda", "/dev/vdb", "/dev/vdc"
    ]  # fmt: skip
    private = {"storage": tmp_path / "vm" / "disk-storage"}
    drives = s.vmm_drives(private)
    assert [(d.drive_id, d.path, d.is_root, d.read_only) for d in drives] == [
        ("root", tmp_path / "r", True, True),
        ("storage", private["storage"], False, False),  # the VM's own copy, never the image
        ("images", tmp_path / "s", False, True),
    ]  # fmt: skip
    with pytest.raises(KeyError):
        s.device("nope")
    from fcvm.errors import UsageError

    with pytest.raises(UsageError, match="no private copy"):
        s.vmm_drives()
    with pytest.raises(UsageError, match="needs an image or a size"):
        DriveSpec("scratch", read_only=False)


def test_writable_drives_are_private_and_blank_ones_are_made_fast(tmp_path: Path) -> None:
    import time

    from fcvm.machine import disks

    blank = tmp_path / "blank"
    t0 = time.monotonic()
    disks.make_blank(blank, 100 << 30)  # 100 GiB, sparse
    assert time.monotonic() - t0 < 5  # (bench/ times it; this says "not a real write")
    assert blank.stat().st_size == 100 << 30 and blank.stat().st_blocks * 512 < 64 << 20
    copy = tmp_path / "copy"
    disks.private_copy(blank, copy)
    assert copy.stat().st_size == blank.stat().st_size
    with open(copy, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"mine")
    with open(blank, "rb") as f:
        f.seek(1 << 20)
        assert f.read(4) != b"mine"


def test_supervise_reports_a_dead_network_helper(tmp_path: Path) -> None:
    log = Log()
    parts, made = fake_parts(log)

    async def main() -> None:
        async with Machine(spec(tmp_path), parts=parts) as m:

            async def work() -> None:
                made["net"].dead = "slirp4netns (pid 7) died"
                await asyncio.sleep(30)

            with pytest.raises(GuestError, match=r"lost its network: slirp4netns \(pid 7\)"):
                await m.supervise(work())

    arun(main())


@pytest.mark.parametrize(("code", "detail", "line"), [
    (0, "Kernel panic - not syncing: test",
     "the VM stopped unexpectedly (fake exited with 0) (Kernel panic - not syncing: test)"),
    (-9, "fake was killed by SIGKILL", "the VM stopped unexpectedly (fake was killed by SIGKILL)"),
    (-7, "", "the VM stopped unexpectedly (fake was killed by SIGBUS) (a memory file could "
             "not give the VM a page: is the disk under BASE full?)"),
])  # fmt: skip
def test_a_dead_vmm_is_named_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int,
                                  detail: str, line: str) -> None:  # fmt: skip
    """How the VMM ended, once (it said "exited with -9 (... killed by SIGKILL)"); a
    SIGBUS is most likely a full disk under a memory file mapped from it."""
    monkeypatch.setenv("FCVM_BASE_DIR", str(tmp_path / "base"))
    log = Log()
    parts, made = fake_parts(log)

    async def main() -> None:
        async with Machine(spec(tmp_path), parts=parts) as m:
            made["vmm"].exit_code = code
            monkeypatch.setattr(made["vmm"], "failure_detail", lambda: detail)
            failure = m.failure()
            assert failure is not None
            assert failure.line() == line.replace("BASE", str(tmp_path / "base"))

    arun(main())


class SnapVmm:
    """A VMM whose snapshot steps are logged; the save sleeps in its worker thread."""

    name = "fake"
    capabilities = Capabilities(accel="tcg", snapshot=True, restore=True)

    def __init__(self, events: list[str], save_seconds: float) -> None:
        self.events, self.save_seconds = events, save_seconds

    def pause(self) -> None:
        self.events.append("pause")

    def resume(self) -> None:
        self.events.append("resume-vm")

    def save_snapshot(self, files: SnapshotFiles, *, base: Any = None) -> None:
        self.events.append(f"save {files.memory.name} begins")
        time.sleep(self.save_seconds)  # in a worker thread, as the real save
        self.events.append(f"save {files.memory.name} ends")


class QuiescingSession:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def quiesce(self) -> None:
        self.events.append("quiesce")
        await asyncio.sleep(0.01)

    async def resume(self) -> None:
        self.events.append("release")


def snapshotting_machine(tmp_path: Path, events: list[str], save_seconds: float) -> Machine:
    m = Machine(spec(tmp_path), parts=fake_parts(Log())[0])
    m.vmm = SnapVmm(events, save_seconds)  # type: ignore[assignment]
    m._session = QuiescingSession(events)  # type: ignore[assignment]
    m.phase = Phase.RUNNING
    return m


def test_snapshots_of_one_machine_never_overlap(tmp_path: Path) -> None:
    """A startup snapshot and a `snapshot create` asked for at once: the second waits,
    else its quiesce/resume would interleave with the first's and the agent would be
    released while the first is still being saved."""
    from fcvm.machine.snapshots import snapshot

    events: list[str] = []

    async def main() -> None:
        m = snapshotting_machine(tmp_path, events, 0.05)
        await asyncio.gather(
            snapshot(m, SnapshotFiles(tmp_path / "a", tmp_path / "a.state")),
            snapshot(m, SnapshotFiles(tmp_path / "b", tmp_path / "b.state")),
        )

    arun(main())
    one = ["quiesce", "pause", "save {} begins", "save {} ends", "resume-vm", "release"]
    assert events in ([e.format("a") for e in one] + [e.format("b") for e in one],
                      [e.format("b") for e in one] + [e.format("a") for e in one])  # fmt: skip


def test_a_snapshot_cancelled_while_saving_still_resumes_the_vm_after_the_save(
    tmp_path: Path,
) -> None:
    """`fcvm snapshot create` interrupted (its client gone, so the owner's handler is
    cancelled) while the VMM saves: the save runs to its end, then the VM and the
    session resume, then the cancellation goes on. Resuming while the save thread still
    ran left the VM paused for good (QEMU pauses again when its migration completes)."""
    from fcvm.machine.snapshots import snapshot

    events: list[str] = []

    async def main() -> None:
        m = snapshotting_machine(tmp_path, events, 0.2)
        task = asyncio.ensure_future(snapshot(m, SnapshotFiles(tmp_path / "a", tmp_path / "s")))
        while "save a begins" not in events:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    arun(main())
    assert events == ["quiesce", "pause", "save a begins", "save a ends", "resume-vm",
                      "release"]  # fmt: skip

