"""fcvm snapshot: create (a named snapshot of a running VM), run (a clone of one), serve
(the userfaultfd page server). Listing and removing them is `fcvm snapshots`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

SERVE_HELP = """\
Serve the memory file of snapshot NAME to VMs restored from it with Firecracker's
Uffd memory backend: listens on a Unix socket under the base directory, answers each
first touch of a guest page with the page from the file, serves any number of VMs at
once, and prefetches the working set recorded from earlier VMs. Prints its PID and
socket path; runs until SIGINT/SIGTERM (VMs still attached are first filled in
completely so they keep running; a second signal stops at once)."""


CREATE_HELP = """\
Pause the running VM (by name, or the fcvm process PID that owns it), write a named
snapshot of it - memory, device state, and a copy of each writable disk (a reflink on
btrfs or XFS; elsewhere a full copy, which is slower: one warning says so) - and let it
run on. Clones start from it with `fcvm snapshot run`."""

RUN_HELP = """\
Start a clone of a named snapshot: a VM of its own (name and hostname, network
namespace and MAC, published ports, clock, random numbers) whose memory is the
snapshot's, shared with other clones until written. With --exec the command runs in
the clone's container, its output and exit code become fcvm's, and the clone is torn
down; without, the clone runs like a `fcvm podman run` VM (fcvm ls, fcvm exec,
Ctrl-C). --pid takes the memory from the page server with that pid (fcvm snapshot
serve): Firecracker's lazy userfaultfd restore; QEMU maps the same file privately,
which the kernel's page cache fills lazily and shares just the same."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "snapshot",
        help="named snapshots of running VMs, clones of them, page servers",
        description="Snapshots of VMs, clones started from them, and the page server "
        "that clones can restore from. (List and remove them with fcvm snapshots.)",
    )
    ssub = p.add_subparsers(dest="snapshot_command", metavar="SUBCOMMAND", required=True)

    c = ssub.add_parser("create", help="snapshot a running VM", description=CREATE_HELP)
    c.add_argument("vm", nargs="?", metavar="VM", help="the VM's name")
    c.add_argument("--pid", type=int, help="the VM's owning fcvm process id instead")
    c.add_argument("--tag", required=True, metavar="NAME", help="the snapshot's name")
    c.add_argument("--json", action="store_true", help="print one JSON line")
    c.set_defaults(func=_create)

    r = ssub.add_parser("run", help="start a clone of a snapshot", description=RUN_HELP)
    r.add_argument("--snapshot", metavar="NAME", help="the named snapshot")
    r.add_argument("--pid", type=int, metavar="SERVE_PID",
                   help="or the pid of the page server serving it")  # fmt: skip
    r.add_argument("--name", help="the clone's name (default: SNAPSHOT-clone-XXXXXX)")
    r.add_argument("--network", choices=("rootless", "bridged"),
                   help="network mode (default: the snapshotted VM's)")  # fmt: skip
    r.add_argument("--publish", "-p", action="append", default=[],
                   metavar="[IP:]HOST:GUEST[/tcp|udp]", help="publish a guest port")  # fmt: skip
    r.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="HOST:GUEST[:ro]",
        help="show a host directory in the clone's container (as for podman run)",
    )
    r.add_argument("--exec", dest="exec_cmd", metavar="'CMD ARGS'",
                   help="run this in the clone's container, then tear the clone down")  # fmt: skip
    r.add_argument("-i", "--interactive", action="store_true",
                   help="stdin to the --exec command")  # fmt: skip
    r.add_argument("-t", "--tty", action="store_true", help="a terminal for --exec")
    r.add_argument("--stop-timeout", default="10", metavar="SECONDS",
                   help="as for fcvm podman run")  # fmt: skip
    r.set_defaults(func=_run)

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


def _create(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from fcvm import state
    from fcvm.errors import StateError, UsageError
    from fcvm.machine.client import connect
    from fcvm.session import SessionClosed
    from fcvm.session.control import RequestFailed
    from fcvm.snapshot.layout import validate_new_name

    if (args.vm is None) == (args.pid is None):
        raise UsageError("name the VM or give --pid PID (one of them)")
    validate_new_name(args.tag)
    state.reap_stale()
    rec = state.find(name=args.vm, pid=args.pid)
    if rec.status != "running":
        raise StateError(f"VM {rec.name!r} is still starting")

    async def go() -> dict[str, Any]:
        session = await connect(rec)
        try:
            return await session.requests.call("snapshot", 600, name=args.tag)
        except RequestFailed as exc:
            raise StateError(str(exc)) from None
        except SessionClosed:  # (its owner killed, or the VM stopped, meanwhile)
            raise StateError(f"VM {rec.name!r} went away before snapshot {args.tag!r} was "
                             "written; nothing was kept") from None  # fmt: skip
        finally:
            await session.close()

    done = asyncio.run(go())
    if args.json:
        print(json.dumps({k: done[k] for k in ("name", "seconds", "bytes", "reflinked")}))
    else:
        print(f"{done['name']}: {done['bytes'] / (1 << 20):.0f} MiB in {done['seconds']:.2f} s")
    if not done.get("reflinked", True):
        from fcvm import paths

        print(f"fcvm: warning: {paths.snapshots_dir()} is not on btrfs or XFS: the VM's disks "
              "were copied, not reflinked, which is slower", file=sys.stderr)  # fmt: skip
    return 0


def _run(args: argparse.Namespace) -> int:
    import asyncio
    import os
    import shlex

    from fcvm import plan as pl
    from fcvm.clone import (
        CloneRun,
        CloneSource,
        check_name_free,
        generated_name,
        snapshot_workload,
    )
    from fcvm.errors import UsageError
    from fcvm.net import parse_publish
    from fcvm.remote import LocalStdio
    from fcvm.volumes.spec import parse_maps

    if (args.snapshot is None) == (args.pid is None):
        raise UsageError("give --snapshot NAME or --pid SERVE_PID (one of them)")
    from fcvm import state

    state.reap_stale()
    source = CloneSource.named(args.snapshot) if args.snapshot else CloneSource.served_by(args.pid)
    name = pl.parse_name(args.name or generated_name(source.snapshot))
    check_name_free(name)
    exec_argv = None
    if args.exec_cmd is not None:
        try:
            exec_argv = tuple(shlex.split(args.exec_cmd))
        except ValueError as exc:
            raise UsageError(f"malformed --exec: {exc}") from None
        if not exec_argv:
            raise UsageError("--exec needs a command")
    elif args.interactive or args.tty:
        raise UsageError("-i and -t are for --exec (a clone attaches as its VM ran)")
    else:  # attaching: stdin and terminal as the snapshotted container has them
        workload = snapshot_workload(source.snapshot)
        args.interactive = bool(workload.get("interactive"))
        args.tty = bool(workload.get("tty"))
    plan = pl.RunPlan(
        name=name,
        image=pl.ImageSpec("snapshot", source.snapshot),
        publish=tuple(f.spec() for f in parse_publish(args.publish)),
        stop_timeout=pl.parse_seconds("--stop-timeout", args.stop_timeout, zero=True),
        vmm=os.environ.get("FCVM_VMM", "auto"),
        interactive=args.interactive, tty=args.tty, snapshot=False,
        maps=parse_maps(args.map),
    )  # fmt: skip
    sys.stdout.flush()
    stdio = LocalStdio(stdin=0 if args.interactive else None, tty=args.tty)
    clone = CloneRun(source, plan, stdio, exec_argv=exec_argv, forward_signals=True,
                     network=args.network)  # fmt: skip
    return asyncio.run(clone.run())
