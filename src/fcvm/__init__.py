"""fcvm: run Podman containers inside microVMs, one VM per container.

As a library (see fcvm.api and README.md):

    import fcvm
    print(fcvm.run("localhost/fcvm-busybox", ["echo", "hi"]).stdout)

`import fcvm` stays light: the API is loaded on first use of one of its names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fcvm.api import (
        VM,
        AsyncVM,
        Completed,
        ExecTimeout,
        Port,
        ProcessFailed,
        VmOptions,
        run,
        start,
    )
    from fcvm.errors import FcvmError, GuestError, ImageError, NotSetUp, StateError, UsageError

_API = ("VM", "AsyncVM", "Completed", "ExecTimeout", "Port", "ProcessFailed", "VmOptions",
        "run", "start")  # fmt: skip
_ERRORS = ("FcvmError", "GuestError", "ImageError", "NotSetUp", "StateError", "UsageError")
__all__ = [
    "VM", "AsyncVM", "Completed", "ExecTimeout", "FcvmError", "GuestError", "ImageError",
    "NotSetUp", "Port", "ProcessFailed", "StateError", "UsageError", "VmOptions", "aio",
    "run", "start",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    import importlib

    if name in _API:
        return getattr(importlib.import_module("fcvm.api"), name)
    if name in _ERRORS:
        return getattr(importlib.import_module("fcvm.errors"), name)
    if name == "aio":
        return importlib.import_module("fcvm.aio")
    raise AttributeError(f"module 'fcvm' has no attribute {name!r}")
