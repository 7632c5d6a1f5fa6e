"""One error family for fcvm, carrying the exit codes podman users know.

125: fcvm itself failed (bad input, setup missing, VMM trouble).
126: the command exists but cannot be run.
127: the command was not found.
Anything else is the container's own exit code and is not an error of ours.
"""

from __future__ import annotations

EXIT_FCVM = 125
EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127


class FcvmError(Exception):
    """A failure fcvm reports in one line and turns into an exit code."""

    exit_code = EXIT_FCVM

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def line(self) -> str:
        msg = str(self)
        return f"{msg} ({self.hint})" if self.hint else msg


class UsageError(FcvmError):
    """Malformed flags or arguments."""


class NotSetUp(FcvmError):
    """Guest assets are missing; `fcvm setup` fixes it."""


class VmmUnavailable(FcvmError):
    """No VMM can run a guest on this host (or the requested one cannot)."""


class ImageError(FcvmError):
    """The container image cannot be found or read."""


class StateError(FcvmError):
    """VM records: duplicate names, unknown names, lock trouble."""


class GuestError(FcvmError):
    """The guest or its agent failed or stopped answering."""


class ProtocolError(FcvmError):
    """A peer broke the session protocol; ends that session only."""
