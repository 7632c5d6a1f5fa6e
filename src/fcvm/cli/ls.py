"""`fcvm ls`: the running VMs (and page servers)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fcvm.state import VmRecord

COLUMNS = ("NAME", "PID", "VMM", "IMAGE", "STATUS", "CREATED", "CPU", "MEM")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ls = sub.add_parser("ls", help="list running VMs", description="List running VMs.")
    ls.add_argument("--json", action="store_true", help="print a JSON array (for scripts)")
    ls.add_argument("--pid", type=int, metavar="PID", help="only the VM owned by fcvm process PID")
    ls.set_defaults(func=cmd_ls)


def _age(created: float) -> str:
    import time

    secs = max(0, int(time.time() - created))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit} ago"
    return f"{secs}s ago"


def _status(r: VmRecord) -> str:
    """running (healthy|unhealthy) with a --health-check, as podman ps says of one, and
    plain running without one; running (starting) while its container has not started
    yet, or its health check has not passed yet (fcvm exec refuses it until then)."""
    if r.health == "healthy" and r.extra.get("health_check") == "":
        return r.status  # (started; there is no health check to name)
    if r.health:
        return f"{r.status} ({r.health})"
    if r.status == "running" and r.kind == "vm":
        return "running (starting)"
    return r.status


def cmd_ls(args: argparse.Namespace) -> int:
    import json

    from fcvm import state

    state.reap_stale()
    records = state.list_live()
    if args.pid is not None:
        records = [r for r in records if r.pid == args.pid]
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2))
        return 0
    rows = [(r.name, str(r.pid), r.vmm, r.image, _status(r), _age(r.created), str(r.cpus),
             f"{r.mem_mib}M") for r in records]  # fmt: skip
    widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(COLUMNS)]
    for row in (COLUMNS, *rows):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0
