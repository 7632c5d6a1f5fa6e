"""fcvm's own messages go to stderr only when FCVM_LOG asks for them.

Container output owns stdout/stderr; fcvm stays quiet unless FCVM_LOG=info or
debug is set (errors are still printed as one line by the CLI).
"""

from __future__ import annotations

import logging
import os
import sys

_configured = False


def setup_logging() -> None:
    global _configured
    if _configured:
        return
    _configured = True
    level_name = os.environ.get("FCVM_LOG", "warning").upper()
    level = getattr(logging, level_name, logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    if level < logging.WARNING:  # asked for: which module said what
        handler.setFormatter(logging.Formatter("fcvm %(levelname)s %(name)s: %(message)s"))
    else:  # a user's warning reads like the CLI's own lines ("fcvm: warning: ...")
        handler.setFormatter(_Plain())
    root = logging.getLogger("fcvm")
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def get(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("fcvm") else f"fcvm.{name}")


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"fcvm: {record.levelname.lower()}: {record.getMessage()}"
