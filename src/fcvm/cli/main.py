"""fcvm's entry point: parse the command line, dispatch, map errors to exit codes."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from fcvm import __version__

# Command modules, in the order `fcvm --help` lists them. Each has add_parser(sub).
COMMAND_MODULES = (
    "fcvm.cli.setup",
    "fcvm.cli.podman",
    "fcvm.cli.exec",
    "fcvm.cli.ls",
    "fcvm.cli.snapshot",
    "fcvm.cli.snapshots",
    "fcvm.cli.gc",
)


class Parser(argparse.ArgumentParser):
    """argparse, with podman's convention for bad usage: one line, exit 125 (argparse's own
    is the usage text and exit 2). Subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        from fcvm.errors import UsageError

        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fcvm",
        description="Run Podman containers inside microVMs: one VM per container, "
        "Firecracker or QEMU underneath.",
        epilog="Environment: FCVM_BASE_DIR (state and assets; default /var/lib/fcvm "
        "for root), FCVM_LOG=info|debug (fcvm's own messages on stderr), "
        "FCVM_FIRECRACKER (path to firecracker), FCVM_VMM=auto|firecracker|qemu, "
        "FCVM_ASSETS_DIR (share built guest assets), FCVM_IMAGE_STORE=off (attach image "
        "archives instead of prebuilt image disks), FCVM_NO_SNAPSHOT=1 (no image cache), "
        "FCVM_SNAPSHOT_CACHE_MAX (its size bound, e.g. 10G), FCVM_WRITEBACK_CACHE=1 "
        "(--map with the guest's writeback cache).",
    )
    parser.add_argument("--version", action="version", version=f"fcvm {__version__}")
    sub = parser.add_subparsers(dest="fcvm_command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command not built yet
                continue
            raise
        module.add_parser(sub)
    _name_leaf_parsers(parser)
    return parser


def _name_leaf_parsers(parser: argparse.ArgumentParser) -> None:
    """Each command's parser leaves its prog in the namespace (fcvm_prog), so that an
    unknown flag can be pointed at that command's --help rather than fcvm's."""
    parser.set_defaults(fcvm_prog=parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _name_leaf_parsers(child)


def main(argv: Sequence[str] | None = None) -> int:
    from fcvm.log import setup_logging

    setup_logging()
    parser = build_parser()
    from fcvm.errors import FcvmError, UsageError

    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)} "
                             f"(see {getattr(args, 'fcvm_prog', 'fcvm')} --help)")  # fmt: skip
        if args.fcvm_command in ASYNCIO_COMMANDS:
            _import_asyncio_without_ssl()
        func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
        if func is None:  # bare `fcvm`: its help, and a usage error's code (as podman)
            parser.print_help()
            return 125
        return int(func(args) or 0)
    except FcvmError as exc:
        print(f"fcvm: {exc.line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # (`fcvm ls | head -1`: ends quietly, as a writer on SIGPIPE)
        with contextlib.suppress(OSError):  # (nothing more reaches the gone reader)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:  # a file or device fcvm needs is not there or not allowed
        where = f": {exc.filename}" if exc.filename else ""
        print(f"fcvm: {exc.strerror or exc}{where}", file=sys.stderr)
        return 125
    except Exception as exc:  # a bug of ours: one line, the traceback only when asked
        import logging

        logging.getLogger("fcvm").debug("internal error", exc_info=True)
        print(
            f"fcvm: internal error: {type(exc).__name__}: {exc} "
            "(FCVM_LOG=debug shows the traceback)",
            file=sys.stderr,
        )
        return 125


def run() -> None:
    sys.exit(main())


# The commands that run VMs or talk to them (asyncio); the others (--help, ls, gc,
# setup, snapshots) start without it.
ASYNCIO_COMMANDS = frozenset({"podman", "exec", "snapshot"})


def _import_asyncio_without_ssl() -> None:
    """asyncio imports ssl if it can (~10 ms of every command's start); fcvm never
    speaks TLS through asyncio. Hide ssl while asyncio loads, then let whoever needs it
    (httpx, for Firecracker) import it as usual."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]


if __name__ == "__main__":
    run()
