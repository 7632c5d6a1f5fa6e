"""`fcvm setup`: build (or verify) the guest kernel, initrd and root filesystem."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "setup",
        help="build the guest kernel, initrd and root filesystem",
        description="Download Debian's cloud kernel, build the initrd and the guest root "
        "filesystem (podman + fcvm's agent) into the content-addressed asset cache. "
        "A second run with nothing changed is a no-op; a changed agent rebuilds only the "
        "final root filesystem stage. The first run takes a minute or more (mmdebstrap).",
    )
    p.add_argument("--force", action="store_true", help="rebuild everything")
    p.add_argument(
        "--kernel",
        type=Path,
        metavar="PATH",
        help="use this guest kernel instead of the built one "
        "(else $FCVM_KERNEL, else `kernel` in the config file)",
    )
    p.add_argument(
        "--initrd",
        type=Path,
        metavar="PATH",
        help="use this initrd (else $FCVM_INITRD, else `initrd` in the config file)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from fcvm.assets import GuestAssets, setup

    start = time.monotonic()
    _exit_cleanly_on_termination()
    assets: GuestAssets
    if sys.stderr.isatty():
        from rich.console import Console

        console = Console(stderr=True)
        with console.status("checking guest assets", spinner="dots") as status:
            current: list[str] = [""]

            def progress(stage: str, message: str) -> None:
                if stage != current[0]:
                    if current[0] and current[0] != "done":
                        console.print(f"[green]✓[/] {current[0]}")
                    current[0] = stage
                if stage != "done":
                    status.update(f"[bold]{stage}[/]: {message}")

            assets = setup(
                force=args.force, kernel=args.kernel, initrd=args.initrd, progress=progress
            )
        elapsed = time.monotonic() - start
        console.print(f"[green]✓[/] guest assets ready ({elapsed:.1f}s)")
    else:

        def progress(stage: str, message: str) -> None:
            print(f"fcvm setup: {stage}: {message}", file=sys.stderr, flush=True)

        assets = setup(force=args.force, kernel=args.kernel, initrd=args.initrd, progress=progress)
    compile_own_modules()
    print(f"kernel  {assets.vmlinux} ({assets.kernel_version})")
    print(f"initrd  {assets.initrd}")
    print(f"rootfs  {assets.rootfs}")
    return 0


def _exit_cleanly_on_termination() -> None:
    """SIGTERM and SIGHUP end setup as Ctrl-C does - through its cleanup (an interrupted
    mmdebstrap unmounts its chroot, partial files go) - rather than at once; exit 128+N."""
    import signal

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, leave)


def compile_own_modules() -> None:
    """Byte-compile fcvm's own modules where they are installed. An editable install
    (or PYTHONDONTWRITEBYTECODE) leaves none, and every fcvm command would then compile
    what it imports from source: ~100 ms of a `podman run` restored from the cache.
    ~3 ms when up to date; a directory fcvm cannot write is left as it is."""
    import compileall

    import fcvm

    compileall.compile_dir(Path(fcvm.__file__).parent, quiet=2)
