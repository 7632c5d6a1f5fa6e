"""Which VMM backend runs the guest, and why.

``auto`` takes the first backend of the registry (vmm/registry.py) that says it can
run here: Firecracker when its binary is found and /dev/kvm can run a stock guest
kernel, else QEMU (KVM when usable, else TCG). An explicitly requested backend that
cannot run raises VmmUnavailable with one line saying why. Backends answer for
themselves (`Backend.availability`); this module only asks them in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from fcvm import errors
from fcvm.vmm import registry
from fcvm.vmm.base import Accel, VmConfig, Vmm
from fcvm.vmm.kvm import kvm_status


@dataclass(frozen=True)
class Choice:
    """The outcome of backend selection: which backend, how accelerated, and why."""

    backend: str
    accel: Accel
    reason: str


def requested_names() -> tuple[str, ...]:
    """What --vmm accepts."""
    return ("auto", *registry.names())


def plan(requested: str = "auto") -> Choice:
    """Decide the backend for `requested` (auto or a registry name) or raise."""
    req = (requested or "auto").strip().lower()
    if req not in requested_names():
        raise errors.UsageError(
            f"unknown VMM {requested!r} (expected one of: {', '.join(requested_names())})"
        )
    kvm = kvm_status()
    if req != "auto":
        avail = registry.load(req).availability(kvm)
        if not avail.usable:
            raise errors.VmmUnavailable(f"{req} cannot run here: {avail.reason}")
        return Choice(req, avail.accel, f"{req} requested; {avail.reason}")
    passed: list[str] = []
    for name in registry.names():
        avail = registry.load(name).availability(kvm)
        if avail.usable:
            return Choice(name, avail.accel, "; ".join([*passed, avail.reason]))
        passed.append(f"not {name}: {avail.reason}")
    raise errors.VmmUnavailable(f"no usable VMM: {'; '.join(passed)}")


def instantiate(choice: Choice, config: VmConfig) -> Vmm:
    """A Vmm of an already made choice (decide early, build once the config exists)."""
    return registry.load(choice.backend).create(config, choice.accel)


def create_vmm(requested: str, config: VmConfig) -> Vmm:
    return instantiate(plan(requested), config)


def describe(requested: str = "auto") -> str:
    """One line explaining what `requested` resolves to here (never raises)."""
    try:
        choice = plan(requested)
    except errors.FcvmError as exc:
        return f"unavailable: {exc.line()}"
    return f"{choice.backend} ({choice.accel.upper()}): {choice.reason}"
