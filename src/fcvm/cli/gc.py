"""`fcvm gc`: reap what killed fcvm processes left behind.

Every fcvm command already does this on start (state.reap_stale); `gc` does only
that, and says what it removed.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    gc = sub.add_parser(
        "gc",
        help="clean up after fcvm processes that were killed",
        description="Remove records, VM directories, VMM processes and network state "
        "left by fcvm processes that died (e.g. kill -9), and snapshots, image exports "
        "and image store builds left unfinished by them. Every fcvm command reaps the "
        "former on start too.",
    )
    gc.set_defaults(func=cmd_gc)


def cmd_gc(args: argparse.Namespace) -> int:
    from fcvm import images, state
    from fcvm.snapshot import store

    for rec in state.reap_stale():
        print(f"reaped {rec.name} ({rec.vm_id}, owner pid {rec.pid})")
    for name in store.collect_garbage():
        print(f"removed the unfinished snapshot {name}")
    for path in images.collect_garbage():
        print(f"removed {path} (an image export or store build that was killed)")
    return 0
