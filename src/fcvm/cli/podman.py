"""`fcvm podman run`: run a container in its own microVM, like `podman run`."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  fcvm podman run --name hello localhost/fcvm-busybox -- echo hello
  fcvm podman run --name job --env A=1,B=2 --cpu 2 --mem 2G oci-archive:/tmp/img.tar
  fcvm podman run --name t --cmd 'sh -c "exit 42"' docker-archive:/tmp/img.tar

Images come from the host's podman storage, from oci-archive:PATH or
docker-archive:PATH, or (full registry references) are pulled inside the guest.
The container's stdout/stderr/exit code become fcvm's; fcvm's own failures exit
125 with one line on stderr (more with FCVM_LOG=info or debug).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    podman = sub.add_parser("podman", help="run a container in a microVM (podman-style)")
    psub = podman.add_subparsers(dest="podman_command", metavar="COMMAND", required=True)
    run = psub.add_parser(
        "run",
        help="boot a microVM and run IMAGE in it",
        description="Boot a microVM, run the container in it, forward its output and exit code.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--name", required=True, help="name of the VM (unique among running VMs)")
    run.add_argument(
        "--env",
        "-e",
        action="append",
        default=[],
        metavar="K=V[,K=V...]",
        help="environment for the container (repeatable; a comma starts another "
        "variable only where KEY= follows, so NO_PROXY=a,b is one; a bare K takes "
        "fcvm's value, if it has one)",
    )
    run.add_argument("--cpu", default="1", metavar="N", help="vCPUs (default 1)")
    run.add_argument("--mem", default="1024", metavar="MiB", help="memory in MiB (default 1024)")
    run.add_argument("--cmd", metavar="'CMD ARGS'", help="command as one shell-quoted string")
    run.add_argument(
        "--disk-size",
        default="8G",
        metavar="SIZE",
        help="the container's storage disk (default 8G; sparse: it costs what is written; "
        "the container gets ENOSPC when full); 'ram' (or 0) keeps container storage in guest "
        "memory instead",
    )
    from fcvm.vmm.registry import names as backends

    run.add_argument(
        "--vmm",
        choices=("auto", *backends()),
        default=None,
        help="VMM backend (default: $FCVM_VMM or auto: the first of "
        f"{', '.join(backends())} that can run here)",
    )
    run.add_argument(
        "--network",
        choices=("rootless", "bridged"),
        default="rootless",
        help="rootless (default: user namespace + slirp4netns) or bridged (root: veth + NAT)",
    )
    run.add_argument(
        "--publish",
        "-p",
        action="append",
        default=[],
        metavar="[IP:]HOST:GUEST[/tcp|udp]",
        help="publish a guest port on the host (comma-separated, repeatable)",
    )
    run.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="HOST:GUEST[:ro]",
        help="show host directory HOST at GUEST in the container, read-only with :ro "
        "(through FUSE; comma-separated, repeatable, at most 8)",
    )
    run.add_argument("--privileged", action="store_true", help="run the container privileged")
    run.add_argument(
        "--rm",
        action="store_true",
        help="accepted as podman's: the VM and its container are always removed when "
        "they stop",
    )
    run.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="keep stdin open and stream it to the container",
    )
    run.add_argument(
        "-t",
        "--tty",
        action="store_true",
        help="give the container a terminal (raw mode here, window size followed)",
    )
    run.add_argument(
        "--health-check",
        metavar="URL",
        help="healthy once URL answers 2xx/3xx inside the VM (see fcvm ls)",
    )
    run.add_argument(
        "--health-timeout",
        default="60",
        metavar="SECONDS",
        help="give up on the health check after this long (default 60)",
    )
    run.add_argument(
        "--no-snapshot",
        action="store_true",
        help="boot cold and leave no snapshot (also FCVM_NO_SNAPSHOT=1); by default the "
        "first run of an image and VM configuration snapshots the VM, and later runs "
        "start from that snapshot",
    )
    run.add_argument(
        "--stop-timeout",
        default="10",
        metavar="SECONDS",
        help="after forwarding a stop signal to the container, stop the VM if the "
        "container has not ended within this long (default 10; 0: at once)",
    )
    run.add_argument(
        "--setup",
        action="store_true",
        help="build the guest assets first if they are missing (fcvm setup)",
    )
    run.add_argument(
        "image",
        metavar="IMAGE",
        help="image in host storage, oci-archive:PATH, docker-archive:PATH, "
        "or a registry reference",
    )
    run.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- CMD ARGS",
        help="command to run instead of the image's default",
    )
    run.set_defaults(func=cmd_run)  # fmt: skip


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from fcvm import plan as p
    from fcvm.container import ContainerRun
    from fcvm.net import parse_publish
    from fcvm.remote import LocalStdio
    from fcvm.volumes.spec import parse_maps

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    plan = p.RunPlan(
        name=p.parse_name(args.name),
        image=p.parse_image(args.image),
        command=p.parse_command(args.cmd, command),
        env=p.parse_env(args.env),
        cpus=p.parse_cpus(args.cpu),
        mem_mib=p.parse_mem(args.mem),
        disk_size=p.parse_disk_size(args.disk_size),
        vmm=args.vmm or os.environ.get("FCVM_VMM", "auto"),
        privileged=args.privileged,
        network=args.network,
        publish=tuple(f.spec() for f in parse_publish(args.publish)),
        interactive=args.interactive,
        tty=args.tty,
        health_check=p.parse_health_check(args.health_check),
        health_timeout=p.parse_seconds("--health-timeout", args.health_timeout),
        stop_timeout=p.parse_seconds("--stop-timeout", args.stop_timeout, zero=True),
        snapshot=not args.no_snapshot,
        maps=parse_maps(args.map),
    )
    if args.setup:
        from fcvm.assets import setup

        setup()
    sys.stdout.flush()
    stdio = LocalStdio(stdin=0 if args.interactive else None, tty=args.tty)
    return asyncio.run(ContainerRun(plan, stdio, forward_signals=True).run())
