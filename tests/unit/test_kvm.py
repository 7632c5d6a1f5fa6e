"""kvm_status(): overrides, presence checks, the per-boot verdict cache (kvm.py), and
the forked probe's timeout/crash handling (kvm_probe.py). The real probe on this host
is exercised in tests/host/test_kvm_probe.py; here the probe itself is replaced where
noted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fcvm.vmm import kvm, kvm_probe
from fcvm.vmm.kvm import KvmStatus

pytestmark = pytest.mark.unit


@pytest.fixture
def fake_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake /dev/kvm node and boot id, a private base dir, and no FCVM_KVM."""
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    boot = tmp_path / "boot_id"
    boot.write_text("11111111-2222-3333-4444-555555555555\n")
    monkeypatch.setattr(kvm, "KVM_DEVICE", str(dev))
    monkeypatch.setattr(kvm, "BOOT_ID_FILE", str(boot))
    monkeypatch.setenv("FCVM_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("FCVM_KVM", raising=False)
    return tmp_path


class CountingProbe:
    def __init__(self, status: KvmStatus, definitive: bool = True) -> None:
        self.status = status
        self.definitive = definitive
        self.calls = 0

    def __call__(self, timeout: float = kvm.PROBE_TIMEOUT) -> tuple[KvmStatus, bool]:
        self.calls += 1
        return self.status, self.definitive


def no_probe(timeout: float = 0) -> tuple[KvmStatus, bool]:
    raise AssertionError("the probe must not run")


@pytest.mark.parametrize("value", ["off", "OFF", "0"])
def test_override_off(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FCVM_KVM", value)
    monkeypatch.setattr(kvm, "run_probe", no_probe)
    st = kvm.kvm_status()
    assert st == KvmStatus(False, "KVM disabled by FCVM_KVM=off")


def test_override_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FCVM_KVM", "on")
    monkeypatch.setattr(kvm, "run_probe", no_probe)
    monkeypatch.setattr(kvm, "KVM_DEVICE", "/nonexistent/kvm")
    st = kvm.kvm_status()
    assert st.usable and "FCVM_KVM=on" in st.reason


def test_missing_device(fake_host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvm, "KVM_DEVICE", str(fake_host / "absent"))
    monkeypatch.setattr(kvm, "run_probe", no_probe)
    st = kvm.kvm_status()
    assert not st.usable and "does not exist" in st.reason and "absent" in st.reason


def test_no_permission(fake_host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root passes os.access() on any mode, so the permission answer is simulated.
    monkeypatch.setattr(kvm.os, "access", lambda path, mode: False)
    monkeypatch.setattr(kvm, "run_probe", no_probe)
    st = kvm.kvm_status()
    assert not st.usable and "no read/write permission" in st.reason


def test_verdict_cached_per_boot(fake_host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = CountingProbe(KvmStatus(False, "/dev/kvm is PVM-backed (test)"))
    monkeypatch.setattr(kvm, "run_probe", probe)
    first = kvm.kvm_status()
    assert probe.calls == 1 and first == probe.status
    cached = json.loads(kvm.cache_path().read_text())
    assert cached["usable"] is False and cached["key"].startswith("11111111-2222")
    assert kvm.kvm_status() == first and probe.calls == 1  # from the cache
    assert kvm.kvm_status(use_cache=False) == first and probe.calls == 2
    # A new boot invalidates the verdict.
    Path(kvm.BOOT_ID_FILE).write_text("99999999-2222-3333-4444-555555555555\n")
    probe.status = KvmStatus(True, "works now")
    assert kvm.kvm_status() == KvmStatus(True, "works now") and probe.calls == 3
    assert kvm.kvm_status().usable and probe.calls == 3


def test_cache_is_cheap(fake_host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvm, "run_probe", CountingProbe(KvmStatus(True, "ok")))
    kvm.kvm_status()
    t0 = time.perf_counter()
    for _ in range(20):
        kvm.kvm_status()
    assert (time.perf_counter() - t0) / 20 < 0.05


def test_non_definitive_verdict_not_cached(
    fake_host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = CountingProbe(KvmStatus(False, "KVM probe did not finish"), definitive=False)
    monkeypatch.setattr(kvm, "run_probe", probe)
    kvm.kvm_status()
    kvm.kvm_status()
    assert probe.calls == 2 and not kvm.cache_path().exists()


@pytest.mark.parametrize("content", ["not json", "[]", '{"key": 1}', ""])
def test_corrupt_cache_reprobes(
    fake_host: Path, monkeypatch: pytest.MonkeyPatch, content: str
) -> None:
    probe = CountingProbe(KvmStatus(True, "ok"))
    monkeypatch.setattr(kvm, "run_probe", probe)
    kvm.cache_path().parent.mkdir(parents=True)
    kvm.cache_path().write_text(content)
    assert kvm.kvm_status().usable and probe.calls == 1


def test_unwritable_cache_is_not_an_error(fake_host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (fake_host / "file").write_text("")
    monkeypatch.setenv("FCVM_BASE_DIR", str(fake_host / "file" / "sub"))
    monkeypatch.setattr(kvm, "run_probe", CountingProbe(KvmStatus(True, "ok")))
    assert kvm.kvm_status().usable


def test_wedged_probe_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forked child hangs (as in a stuck ioctl): the parent gives up in time,
    kills it, and the verdict is not treated as definitive."""

    def hang() -> str:
        time.sleep(30)
        return "unreachable"

    monkeypatch.setattr(kvm_probe, "_probe_in_child", hang)
    t0 = time.monotonic()
    st, definitive = kvm_probe.run_probe(timeout=0.2)
    assert time.monotonic() - t0 < 1.0
    assert not st.usable and "did not finish within 0.2 s" in st.reason
    assert not definitive


def test_probe_failure_reason_passes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> str:
        raise kvm_probe._ProbeFailure("/dev/kvm lacks KVM_CAP_IRQCHIP")

    monkeypatch.setattr(kvm_probe, "_probe_in_child", fail)
    assert kvm_probe.run_probe() == (KvmStatus(False, "/dev/kvm lacks KVM_CAP_IRQCHIP"), True)


def test_probe_crash_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash() -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(kvm_probe, "_probe_in_child", crash)
    st, _ = kvm_probe.run_probe()
    assert not st.usable and "crashed" in st.reason and "boom" in st.reason


def test_probe_guest_code_shape() -> None:
    """The 64-bit probe guest really contains lock cmpxchg16b [rdi] before its
    final out/hlt (the instruction PVM's emulator cannot run)."""
    code = kvm_probe.LONG_MODE_CODE
    assert bytes.fromhex("f0480fc70f") in code
    assert code.endswith(bytes([0xB0, 0x03, 0xE6, kvm_probe.PROBE_PORT, 0xF4]))
    assert kvm_probe.REAL_MODE_CODE.endswith(b"\xf4")
    assert kvm_probe.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert kvm_probe.KVM_GET_SREGS == 0x8138AE83 and kvm_probe.KVM_SET_REGS == 0x4090AE82
