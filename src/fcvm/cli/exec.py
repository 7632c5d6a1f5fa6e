"""`fcvm exec`: run a command in a running VM's container (or in the guest with --vm)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fcvm.agent.spec import ProcessSpec
    from fcvm.remote import LocalStdio
    from fcvm.state import VmRecord


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ex = sub.add_parser(
        "exec",
        help="run a command in a running VM",
        description="Run a command in the container of a running VM, or with --vm in the "
        "guest OS. The exit code is the command's (126: cannot run, 127: not found).",
        epilog="example: fcvm exec --name web -it -- sh",
    )
    who = ex.add_mutually_exclusive_group(required=True)
    who.add_argument("--name", help="the VM's name")
    who.add_argument("--pid", type=int, help="the VM's owning fcvm process id (fcvm ls)")
    ex.add_argument("--vm", action="store_true", help="run in the guest OS, not the container")
    ex.add_argument("-i", "--interactive", action="store_true", help="stream stdin to the command")
    ex.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    ex.add_argument("-e", "--env", action="append", default=[], metavar="K=V[,K=V...]",
                    help="environment variable (repeatable; commas as for podman run "
                    "--env)")  # fmt: skip
    ex.add_argument("-w", "--workdir", metavar="DIR", help="working directory")
    ex.add_argument("-u", "--user", metavar="USER", help="user (container only)")
    ex.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    ex.set_defaults(func=cmd_exec)


def cmd_exec(args: argparse.Namespace) -> int:
    import asyncio

    from fcvm import state
    from fcvm.agent import protocol as p
    from fcvm.agent.spec import ProcessSpec
    from fcvm.errors import StateError, UsageError
    from fcvm.plan import parse_env
    from fcvm.remote import LocalStdio

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("no command given: fcvm exec --name N -- CMD ARGS")
    if args.vm and args.user:
        raise UsageError("--user applies to the container; with --vm commands run as root")
    state.reap_stale()
    rec = state.find(name=args.name, pid=args.pid)
    if rec.status != "running":
        raise StateError(
            f"VM {rec.name!r} is still starting; try again when fcvm ls shows it running"
        )
    if not args.vm and not rec.health:
        raise StateError(f"the container of VM {rec.name!r} is still starting")
    spec = ProcessSpec(
        mode=p.MODE_VM if args.vm else p.MODE_EXEC,
        argv=tuple(command),
        env=parse_env(args.env),
        workdir=args.workdir,
        user=args.user,
    )
    stdio = LocalStdio(stdin=0 if args.interactive else None, tty=args.tty)
    return asyncio.run(_exec(rec, spec, stdio))


async def _exec(rec: VmRecord, spec: ProcessSpec, stdio: LocalStdio) -> int:
    import asyncio
    import signal

    from fcvm.errors import GuestError
    from fcvm.machine.client import connect
    from fcvm.remote import SessionLost, run_remote

    session = await connect(rec)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    signalled: list[int] = []

    def on_signal(signum: int) -> None:
        signalled.append(signum)
        main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)
    # Output nobody reads any more (`| head`): as SIGPIPE ends a writer (exit 141); the
    # process in the guest is killed when its channel closes.
    stdio.on_reader_gone = lambda: on_signal(signal.SIGPIPE)
    try:
        return await run_remote(session, spec, stdio)
    except SessionLost:
        # (the usual cause: the VM stopped - its container exited, say, killed by
        # this very command - and took the session with it)
        raise GuestError(f"VM {rec.name!r} went away while the command ran (its "
                         "container exited, or it was stopped)") from None  # fmt: skip
    except asyncio.CancelledError:
        if not signalled:
            raise
        return 128 + signalled[0]
    finally:
        await session.close()
