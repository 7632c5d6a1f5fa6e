"""Which VMM backend runs the guest, and why.

``auto`` picks Firecracker when a ``firecracker`` binary is found
($FCVM_FIRECRACKER, else PATH) *and* /dev/kvm can run a stock guest kernel
(`fcvm.vmm.kvm.kvm_status`); otherwise QEMU (``qemu-system-x86_64`` on PATH),
accelerated by KVM when usable and by TCG otherwise. An explicitly requested
backend that cannot run raises VmmUnavailable with one line saying why.

Backend classes are imported lazily by name so that ``fcvm --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fcvm import errors
from fcvm.vmm.base import VmConfig, Vmm
from fcvm.vmm.kvm import KvmStatus, kvm_status

BACKENDS = ("auto", "firecracker", "qemu")
QEMU_BINARY = "qemu-system-x86_64"
FIRECRACKER_ENV = "FCVM_FIRECRACKER"

_CLASSES = {
    "firecracker": ("fcvm.vmm.firecracker", "FirecrackerVmm"),
    "qemu": ("fcvm.vmm.qemu", "QemuVmm"),
}


@dataclass(frozen=True)
class Choice:
    """The outcome of backend selection: which backend, how accelerated, and why."""

    backend: Literal["firecracker", "qemu"]
    accel: Literal["kvm", "tcg"]
    reason: str


def firecracker_binary() -> Path | None:
    """$FCVM_FIRECRACKER if set (and executable), else `firecracker` on PATH."""
    env = os.environ.get(FIRECRACKER_ENV)
    if env:
        p = Path(env)
        return p if p.is_file() and os.access(p, os.X_OK) else None
    found = shutil.which("firecracker")
    return Path(found) if found else None


def _firecracker_missing_reason() -> str:
    env = os.environ.get(FIRECRACKER_ENV)
    if env:
        return f"{FIRECRACKER_ENV}={env} is not an executable file"
    return f"no firecracker binary (set {FIRECRACKER_ENV} or put it on PATH)"


def qemu_binary() -> Path | None:
    found = shutil.which(QEMU_BINARY)
    return Path(found) if found else None


def qemu_accel() -> Literal["kvm", "tcg"]:
    """KVM when /dev/kvm can run a stock guest kernel, else TCG."""
    return "kvm" if kvm_status().usable else "tcg"


def plan(requested: str = "auto") -> Choice:
    """Decide the backend for `requested` (auto|firecracker|qemu) or raise."""
    req = (requested or "auto").strip().lower()
    if req not in BACKENDS:
        raise errors.UsageError(
            f"unknown VMM {requested!r} (expected one of: {', '.join(BACKENDS)})"
        )
    kvm = kvm_status()
    if req == "firecracker":
        problems = []
        if firecracker_binary() is None:
            problems.append(_firecracker_missing_reason())
        if not kvm.usable:
            problems.append(kvm.reason)
        if problems:
            raise errors.VmmUnavailable(f"firecracker cannot run here: {'; '.join(problems)}")
        return Choice("firecracker", "kvm", f"firecracker requested; {kvm.reason}")
    if req == "qemu":
        return _qemu_choice(kvm, "qemu requested")

    fc = firecracker_binary()
    if fc is not None and kvm.usable:
        return Choice("firecracker", "kvm", f"firecracker at {fc}; {kvm.reason}")
    why_not_fc = _firecracker_missing_reason() if fc is None else kvm.reason
    return _qemu_choice(kvm, f"not firecracker: {why_not_fc}")


def _qemu_choice(kvm: KvmStatus, why: str) -> Choice:
    if qemu_binary() is None:
        raise errors.VmmUnavailable(
            f"no usable VMM: {why}; and {QEMU_BINARY} is not on PATH "
            "(install Debian's qemu-system-x86)"
        )
    if kvm.usable:
        return Choice("qemu", "kvm", f"{why}; QEMU with KVM")
    return Choice("qemu", "tcg", f"{why}; QEMU with TCG because {kvm.reason}")


def backend_class(name: Literal["firecracker", "qemu"]) -> type[Vmm]:
    module_name, class_name = _CLASSES[name]
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise errors.VmmUnavailable(f"{name} backend is not available: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Vmm)):
        raise errors.VmmUnavailable(f"{module_name}.{class_name} is not a Vmm backend")
    return cls


def choose_backend(requested: str = "auto") -> type[Vmm]:
    """The backend class for `requested`; raises VmmUnavailable/UsageError."""
    return backend_class(plan(requested).backend)


def create_vmm(requested: str, config: VmConfig) -> Vmm:
    """An instance of the chosen backend for `config` (QEMU gets its accelerator)."""
    return instantiate(plan(requested), config)


def instantiate(choice: Choice, config: VmConfig) -> Vmm:
    """An instance of an already made choice (decide early, build once the config exists)."""
    cls = backend_class(choice.backend)
    if choice.backend == "qemu":
        return cls(config, accel=choice.accel)  # type: ignore[call-arg]
    return cls(config)


def describe(requested: str = "auto") -> str:
    """One line explaining what `requested` resolves to here (never raises)."""
    try:
        choice = plan(requested)
    except errors.FcvmError as exc:
        return f"unavailable: {exc.line()}"
    accel = "" if choice.backend == "firecracker" else f" ({choice.accel.upper()})"
    return f"{choice.backend}{accel}: {choice.reason}"
