"""fcvm snapshot: a command group: serve (the userfaultfd page server). (Listing and
removing snapshots is `fcvm snapshots`, cli/snapshots.py.)"""

from __future__ import annotations

import argparse
from typing import Any

SERVE_HELP = """\
Serve the memory file of snapshot NAME to VMs restored from it with Firecracker's
Uffd memory backend: listens on a Unix socket under the base directory, answers each
first touch of a guest page with the page from the file, serves any number of VMs at
once, and prefetches the working set recorded from earlier VMs. Prints its PID and
socket path; runs until SIGINT/SIGTERM (VMs still attached are first filled in
completely so they keep running; a second signal stops at once)."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "snapshot",
        help="VM snapshots: serve their memory to clones, list them",
        description="Snapshots of VMs and the page server that clones restore from.",
    )
    p.set_defaults(func=lambda args: _group_help(p))
    ssub = p.add_subparsers(dest="snapshot_command", metavar="SUBCOMMAND")

    s = ssub.add_parser("serve", help="serve a snapshot's memory (userfaultfd page server)",
                        description=SERVE_HELP)  # fmt: skip
    s.add_argument("name", metavar="NAME", help="snapshot name")
    s.add_argument(
        "--block-size",
        type=int,
        default=4,
        metavar="KiB",
        help="bytes to copy per fault, in KiB: a power of two >= 4 (default 4: one page)",
    )
    s.add_argument(
        "--no-prefetch",
        action="store_true",
        help="do not copy the recorded working set into VMs when they connect",
    )
    s.add_argument(
        "--no-record", action="store_true", help="do not record VMs' first-touch working sets"
    )
    s.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    s.set_defaults(func=_serve)

    from fcvm.cli.snapshots import add_list_arguments, cmd_list

    ls = ssub.add_parser("ls", help="list snapshots (as fcvm snapshots)",
                         description="List snapshots: the same as `fcvm snapshots`.")  # fmt: skip
    add_list_arguments(ls)
    ls.set_defaults(func=cmd_list)


def _group_help(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 0


def _serve(args: argparse.Namespace) -> int:
    import json
    import sys

    from fcvm.errors import UsageError
    from fcvm.snapshot.serving import serve_snapshot

    kib = args.block_size
    if kib < 4 or kib & (kib - 1) or kib > 1 << 20:
        raise UsageError(f"--block-size must be a power of two between 4 and 1048576 KiB: {kib}")

    def ready(info: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            print(f"pid: {info['pid']}\nsocket: {info['socket']}", flush=True)

    serve_snapshot(args.name, block_size=kib * 1024, prefetch=not args.no_prefetch,
                   record_workingset=not args.no_record, on_ready=ready)  # fmt: skip
    if not args.json:
        print(f"stopped serving {args.name}", file=sys.stderr)
    return 0
