"""The VMM backends fcvm knows, in the order `--vmm auto` prefers them.

Each entry names a module that exports ``BACKEND`` (a `fcvm.vmm.base.Backend`).
Adding a backend (Cloud Hypervisor, say) is one new module plus one line here: the
CLI's choices, selection and error messages all come from this list. Modules are
imported only when a backend is chosen, so `fcvm --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fcvm import errors

if TYPE_CHECKING:  # (names() must stay cheap: the CLI's parser lists them)
    from fcvm.vmm.base import Backend

BACKENDS: tuple[tuple[str, str], ...] = (
    ("firecracker", "fcvm.vmm.firecracker"),  # production: KVM, snapshots, uffd clones
    ("qemu", "fcvm.vmm.qemu"),  # anywhere: KVM when usable, else TCG emulation
)


def names() -> tuple[str, ...]:
    return tuple(name for name, _module in BACKENDS)


def load(name: str) -> Backend:
    """The backend called `name` (UsageError if there is none)."""
    module_name = dict(BACKENDS).get(name)
    if module_name is None:
        raise errors.UsageError(
            f"unknown VMM {name!r} (expected one of: auto, {', '.join(names())})"
        )
    from fcvm.vmm.base import Backend

    try:
        backend = importlib.import_module(module_name).BACKEND
    except (ImportError, AttributeError) as exc:
        raise errors.VmmUnavailable(f"{name} backend is not available: {exc}") from exc
    if not isinstance(backend, Backend):
        raise errors.VmmUnavailable(f"{module_name}.BACKEND is not a fcvm Backend")
    return backend
