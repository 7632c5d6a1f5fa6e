"""Backend selection: auto/firecracker/qemu against a controlled PATH and KVM verdict.

PATH is a temp dir holding dummy executables (only for these tests) and the KVM
verdict is fixed with FCVM_KVM=on|off, so the results do not depend on the host."""

from __future__ import annotations

from pathlib import Path

import pytest

from fcvm import errors
from fcvm.vmm import registry, select
from fcvm.vmm.base import Drive, VmConfig
from fcvm.vmm.firecracker import firecracker_binary

pytestmark = pytest.mark.unit


def dummy(bin_dir: Path, name: str) -> Path:
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return exe


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH = an empty temp dir; no FCVM_FIRECRACKER; KVM usable unless a test says."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("FCVM_FIRECRACKER", raising=False)
    monkeypatch.setenv("FCVM_KVM", "on")
    return bin_dir


def test_auto_picks_firecracker_when_found_and_kvm_usable(host: Path) -> None:
    dummy(host, "firecracker")
    dummy(host, "qemu-system-x86_64")
    choice = select.plan("auto")
    assert (choice.backend, choice.accel) == ("firecracker", "kvm")
    assert str(host / "firecracker") in choice.reason


def test_auto_without_firecracker_uses_qemu_kvm(host: Path) -> None:
    dummy(host, "qemu-system-x86_64")
    choice = select.plan("auto")
    assert (choice.backend, choice.accel) == ("qemu", "kvm")
    assert "no firecracker binary" in choice.reason


def test_auto_with_firecracker_but_no_kvm_uses_qemu_tcg(
    host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dummy(host, "firecracker")
    dummy(host, "qemu-system-x86_64")
    monkeypatch.setenv("FCVM_KVM", "off")
    choice = select.plan("auto")
    assert (choice.backend, choice.accel) == ("qemu", "tcg")
    assert "FCVM_KVM=off" in choice.reason
    assert select.describe("auto").startswith("qemu (TCG): ")


def test_explicit_firecracker_without_binary(host: Path) -> None:
    dummy(host, "qemu-system-x86_64")
    with pytest.raises(errors.VmmUnavailable) as info:
        select.plan("firecracker")
    line = info.value.line()
    assert line.startswith("firecracker cannot run here: ") and "no firecracker binary" in line
    assert "\n" not in line


def test_explicit_firecracker_without_kvm(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dummy(host, "firecracker")
    monkeypatch.setenv("FCVM_KVM", "off")
    with pytest.raises(errors.VmmUnavailable, match=r"cannot run here: KVM disabled by FCVM_KVM"):
        select.plan("firecracker")
    assert select.describe("firecracker").startswith("unavailable: firecracker cannot run")


def test_explicit_firecracker_gives_every_reason(
    host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FCVM_KVM", "off")
    with pytest.raises(errors.VmmUnavailable) as info:
        select.plan("firecracker")
    assert "no firecracker binary" in str(info.value) and "FCVM_KVM=off" in str(info.value)


def test_fcvm_firecracker_env(host: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = dummy(tmp_path / "opt", "fc-custom")
    monkeypatch.setenv("FCVM_FIRECRACKER", str(elsewhere))
    assert firecracker_binary() == elsewhere
    assert select.plan("firecracker").backend == "firecracker"
    not_exec = tmp_path / "opt" / "plain"
    not_exec.write_text("")
    monkeypatch.setenv("FCVM_FIRECRACKER", str(not_exec))
    dummy(host, "firecracker")  # PATH is not consulted when the variable is set
    with pytest.raises(errors.VmmUnavailable, match=r"FCVM_FIRECRACKER=.*plain is not an exec"):
        select.plan("firecracker")


def test_nothing_usable(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FCVM_KVM", "off")
    with pytest.raises(errors.VmmUnavailable, match="no usable VMM") as info:
        select.plan("auto")
    assert "qemu-system-x86_64 is not on PATH" in str(info.value)
    assert "not firecracker: no firecracker binary" in str(info.value)
    with pytest.raises(errors.VmmUnavailable, match="qemu cannot run here"):
        select.plan("qemu")
    assert select.describe("auto").startswith("unavailable: no usable VMM")


def test_explicit_qemu(host: Path) -> None:
    dummy(host, "firecracker")
    dummy(host, "qemu-system-x86_64")
    assert select.plan("qemu").backend == "qemu"
    assert select.plan("QEMU").accel == "kvm"


def test_unknown_backend(host: Path) -> None:
    with pytest.raises(errors.UsageError, match="unknown VMM 'xen'"):
        select.plan("xen")


def test_create_vmm_passes_accel_to_qemu(
    host: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dummy(host, "qemu-system-x86_64")
    monkeypatch.setenv("FCVM_KVM", "off")
    config = VmConfig(
        vm_id="s1",
        workdir=tmp_path / "vm",
        kernel=tmp_path / "k",
        initrd=tmp_path / "i",
        vcpus=1,
        mem_mib=128,
        drives=(Drive("root", tmp_path / "r", is_root=True),),
    )
    vmm = select.create_vmm("auto", config)
    assert vmm.name == "qemu" and getattr(vmm, "accel", None) == "tcg"
    dummy(host, "firecracker")
    monkeypatch.setenv("FCVM_KVM", "on")
    assert select.create_vmm("auto", config).name == "firecracker"


def test_a_new_backend_is_one_module_and_one_registry_line(
    host: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A third backend plugs in through the registry alone: selection, the accepted
    names and the reasons all come from there."""
    import sys
    import textwrap

    pkg = tmp_path / "plug"
    pkg.mkdir()
    (pkg / "fake_hv.py").write_text(textwrap.dedent('''
        from fcvm.vmm.base import Availability, Backend
        from fcvm.vmm.qemu import QemuVmm

        class FakeVmm(QemuVmm):
            name = "fakehv"

        BACKEND = Backend(
            name="fakehv",
            availability=lambda kvm: Availability(True, "fake hypervisor found", "kvm"),
            create=FakeVmm,
        )
    '''))
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setattr(registry, "BACKENDS", (("fakehv", "fake_hv"), *registry.BACKENDS))
    try:
        assert "fakehv" in select.requested_names()
        choice = select.plan("auto")
        assert (choice.backend, choice.reason) == ("fakehv", "fake hypervisor found")
        config = VmConfig(vm_id="s2", workdir=tmp_path / "vm", kernel=tmp_path / "k",
                          initrd=tmp_path / "i", vcpus=1, mem_mib=128,
                          drives=(Drive("root", tmp_path / "r", is_root=True),))  # fmt: skip
        assert select.instantiate(choice, config).name == "fakehv"
    finally:
        sys.modules.pop("fake_hv", None)
