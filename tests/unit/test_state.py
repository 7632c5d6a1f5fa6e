"""VM records: unique names among live owners, stale owners, reapers run for them.

Real files in a temporary base directory and real processes as owners (a child that
has exited is a dead owner; pid reuse is covered by the start time).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fcvm import paths, state
from fcvm.errors import StateError
from tests.conftest import dead_pid

pytestmark = pytest.mark.unit

REAPED: list[tuple[str, str]] = []


def reap_first(record: state.VmRecord) -> None:
    REAPED.append(("first", record.name))


def reap_second(record: state.VmRecord) -> None:
    REAPED.append(("second", record.name))


def failing_reaper(record: state.VmRecord) -> None:
    raise RuntimeError("gone already")


@pytest.fixture(autouse=True)
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FCVM_BASE_DIR", str(tmp_path))
    REAPED.clear()
    return tmp_path


def make(name: str) -> state.VmRecord:
    return state.create(state.VmRecord(vm_id=state.new_vm_id(), name=name))


def orphan(record: state.VmRecord) -> None:
    """Make record's owner a process that no longer exists."""
    record.pid = dead_pid()
    state.write_record(record)


def test_names_are_unique_among_live_vms_only() -> None:
    a = make("web")
    assert state.find(name="web").vm_id == a.vm_id
    assert state.find(pid=os.getpid()).vm_id == a.vm_id
    with pytest.raises(StateError, match="already running"):
        make("web")
    orphan(a)
    assert state.list_live() == []  # a dead owner's VM is never shown
    with pytest.raises(StateError, match="no running VM named 'web'"):
        state.find(name="web")
    b = make("web")  # the name is free again
    assert [r.vm_id for r in state.list_live()] == [b.vm_id]


def test_a_pid_that_owns_several_vms_must_say_which() -> None:
    """A program using the Python API owns all its VMs: --pid alone picked the first."""
    make("pyA")
    make("pyB")
    with pytest.raises(StateError, match=r"pid \d+ owns 2 VMs \(pyA, pyB\)"):
        state.find(pid=os.getpid())
    assert state.find(name="pyB").name == "pyB"


def test_a_recycled_pid_is_not_the_owner() -> None:
    a = make("x")
    a.pid_start -= 1  # same pid, another process start: not the owner
    state.write_record(a)
    assert state.list_live() == []


def test_update_is_atomic_and_read_back() -> None:
    a = make("u")
    state.update(a, status="running", health="healthy", network={"host_ip": "127.77.0.2"})
    back = state.read_record(a.vm_id)
    assert back is not None and (back.status, back.health) == ("running", "healthy")
    assert back.network == {"host_ip": "127.77.0.2"}
    assert not [p for p in paths.vm_dir(a.vm_id).iterdir() if p.name.endswith(".tmp")]


def test_reaping_runs_each_reaper_once_in_reverse_order_then_removes_the_dir() -> None:
    a = make("gone")
    state.add_reaper(a, reap_first)
    state.add_reaper(a, failing_reaper)  # one failing reaper does not stop the others
    state.add_reaper(a, reap_second)
    state.add_reaper(a, reap_second)  # registered once
    (paths.vm_dir(a.vm_id) / "console.log").write_text("x")
    live = make("alive")
    state.add_reaper(live, reap_first)
    orphan(a)
    reaped = state.reap_stale()
    assert [r.vm_id for r in reaped] == [a.vm_id]
    assert REAPED == [("second", "gone"), ("first", "gone")]
    assert not paths.vm_dir(a.vm_id).exists()
    assert paths.vm_dir(live.vm_id).exists()
    assert state.reap_stale() == []  # nothing twice


def test_reapers_are_named_functions_and_records_import_nothing_foreign(base: Path) -> None:
    a = make("r")
    with pytest.raises(ValueError, match="module-level function"):
        state.add_reaper(a, lambda rec: None)
    # A record naming something outside fcvm is not trusted to import it.
    data = json.loads((paths.vm_dir(a.vm_id) / "vm.json").read_text())
    data["reapers"] = ["antigravity:fly"]  # not imported here, not fcvm's: never imported
    (paths.vm_dir(a.vm_id) / "vm.json").write_text(json.dumps(data))
    rec = state.read_record(a.vm_id)
    assert rec is not None
    orphan(rec)
    assert [r.name for r in state.reap_stale()] == ["r"]
    import sys

    assert "antigravity" not in sys.modules


def test_unreadable_records_are_skipped(base: Path) -> None:
    (paths.vms_dir() / "junk").mkdir(parents=True)
    (paths.vms_dir() / "junk" / "vm.json").write_text("{not json")
    make("ok")
    assert [r.name for r in state.list_live()] == ["ok"]
