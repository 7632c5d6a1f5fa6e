"""/proc/PID/stat, read the one safe way; shared by the host and the guest agent
(stdlib only: it is among the files copied into the guest)."""

from __future__ import annotations


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat from the state (field 3 overall) on, or None if the
    process is gone. comm (field 2) may hold spaces and parentheses: the split is made
    after the last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split() or None
