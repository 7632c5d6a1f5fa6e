"""Phase marks of one run: logged at info, written as JSON to $FCVM_TIMINGS (bench/)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from fcvm import log

logger = log.get("timings")


class Timings:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.marks: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        elapsed = time.monotonic() - self.t0
        self.marks.append((name, elapsed))
        logger.info("%7.3fs %s", elapsed, name)

    def dump(self) -> None:
        out = os.environ.get("FCVM_TIMINGS")
        if out:
            Path(out).write_text(json.dumps(dict(self.marks)))
