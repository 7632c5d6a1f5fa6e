"""`fcvm snapshots`: list, remove and prune snapshots (the image cache's and named ones)."""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = """\
Snapshots live in the base directory: the image cache's (kind prestart: an image's
VM with its container created; kind startup: a service running and healthy, from
--health-check) and named ones (fcvm snapshot create). A snapshot in use by a running
VM is never removed."""


def add_list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="a JSON array (for scripts)")


def _json_flag(p: argparse.ArgumentParser, what: str) -> None:
    """--json on a subcommand; `fcvm snapshots --json SUBCOMMAND` means the same (the
    subcommand's own default must not overwrite the parent's flag: SUPPRESS)."""
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=what)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("snapshots", help="list, remove and prune snapshots",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_list_arguments(p)
    p.set_defaults(func=cmd_list)
    ssub = p.add_subparsers(dest="snapshots_command", metavar="SUBCOMMAND")
    ls = ssub.add_parser("ls", help="list snapshots (the default)", description="List snapshots.")
    add_list_arguments(ls)
    ls.set_defaults(func=cmd_list)
    rm = ssub.add_parser("rm", help="remove snapshots by name",
                         description="Remove snapshots (never one in use).")  # fmt: skip
    rm.add_argument("names", nargs="+", metavar="NAME")
    _json_flag(rm, "print the removed names as JSON")
    rm.set_defaults(func=cmd_rm)
    pr = ssub.add_parser(
        "prune",
        help="remove cached snapshots by age or total size",
        description="Remove image-cache snapshots not used for --older-than, then the least "
        "recently used until the cache fits in --max-size (default: the configured bound, "
        "$FCVM_SNAPSHOT_CACHE_MAX or snapshot_cache_max in config.toml, else 10G). Named "
        "snapshots are only removed by `fcvm snapshots rm`; none in use is ever removed.",
    )
    pr.add_argument("--older-than", metavar="DURATION", help="e.g. 30m, 12h, 7d")
    pr.add_argument("--max-size", metavar="SIZE", help="e.g. 2G (0: remove all unused)")
    _json_flag(pr, "print the removed names as JSON")
    pr.set_defaults(func=cmd_prune)


def _human(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}G"


def _when(t: float | None) -> str:
    import time

    if not t:
        return "-"
    secs = max(0, int(time.time() - t))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit} ago"
    return f"{secs}s ago"


def cmd_list(args: argparse.Namespace) -> int:
    import json

    from fcvm.snapshot import cache

    rows = [e.to_json() for e in cache.listing()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ("NAME", "KIND", "SIZE", "CREATED", "LAST USED", "IN USE", "IMAGE")
    table = [(r["name"], r["kind"], _human(r["size_bytes"]), _when(r["created"]),
              _when(r["last_used"]), "yes" if r["in_use"] else "", r["image"])
             for r in rows]  # fmt: skip
    widths = [max([len(c), *(len(row[i]) for row in table)]) for i, c in enumerate(cols)]
    for row in (cols, *table):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    import sys

    from fcvm.errors import FcvmError
    from fcvm.snapshot import cache, store
    from fcvm.snapshot.layout import validate_name

    names = [validate_name(name) for name in args.names]
    failed = 0
    removed = []
    as_json = getattr(args, "json", False)
    for name in names:  # each one it can (as podman rm): one missing or in use stops none
        try:
            store.remove(name)
        except store.SnapshotInUse as exc:  # (by a VM, or a page server: name it)
            server = cache.page_servers().get(name)
            line = exc.line() if server is None else (
                f"snapshot {name!r} is being served by pid {server} (fcvm snapshot serve)")
            print(f"fcvm: {line}", file=sys.stderr)
            failed = exc.exit_code
            continue
        except FcvmError as exc:
            print(f"fcvm: {exc.line()}", file=sys.stderr)
            failed = exc.exit_code
            continue
        removed.append(name)
        if not as_json:
            print(f"removed {name}")  # (as prune says it; podman rm names what it removed)
    if as_json:
        import json

        print(json.dumps(removed))
    return failed


def parse_duration(value: str) -> float:
    import re

    from fcvm.errors import UsageError

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value.lower())
    if not m:
        raise UsageError(f"malformed duration {value!r}: expected e.g. 30m, 12h or 7d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def cmd_prune(args: argparse.Namespace) -> int:
    import json

    from fcvm.snapshot import cache

    older = parse_duration(args.older_than) if args.older_than else None
    limit = cache.parse_size(args.max_size) if args.max_size else None
    if older is None and limit is None:
        limit = cache.limit_bytes()
    removed = cache.prune(max_bytes=limit, older_than=older)
    if getattr(args, "json", False):
        print(json.dumps(removed))
    else:
        for name in removed:
            print(f"removed {name}")
    return 0
