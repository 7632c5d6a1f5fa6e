"""A container in its own VM: `fcvm podman run`, and `fcvm.run`/`fcvm.start` in Python.

    run = ContainerRun(plan, stdio)
    code = await run.run()          # resolve, boot the Machine, run the container

`resolve()` turns the RunPlan into a MachineSpec (guest assets, backend, the image's
disks, named) and the container's ProcessSpec (the image as the guest finds it on
those disks, the command, env and health check). `run()` boots the Machine, runs the
container as its workload, reports health to the VM's record, and returns the
container's exit code.

Signals (`forward_signals=True`, what the CLI asks for; podman's --sig-proxy): before
the container runs, SIGINT/SIGTERM/SIGHUP stop the VM (exit 128+N). Once it runs, the
first one is forwarded to the container's process and fcvm exits with the
container's own code when it ends; a second signal, or the container not ending
within the plan's stop_timeout (podman's --stop-timeout, 10 s), stops the VM
(exit 128+N).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fcvm import images, log, state
from fcvm.agent import protocol as p
from fcvm.agent.spec import ImageSource, ProcessSpec
from fcvm.machine import DriveSpec, Machine, MachineSpec
from fcvm.net import parse_publish
from fcvm.plan import RunPlan
from fcvm.remote import RemoteProcess, Stdio
from fcvm.timings import Timings

logger = log.get("container")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
IMAGES_DRIVE = "images"  # the prebuilt image store (read-only ext4)
ARCHIVE_DRIVE = "image-archive"  # the image as an OCI/docker archive (read-only)


@dataclass(frozen=True)
class Resolved:
    machine: MachineSpec
    image: ImageSource


class _Stopped(Exception):
    """A stop signal ended the run before the container did."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class ContainerRun:
    """One RunPlan's container in its own VM."""

    def __init__(
        self,
        plan: RunPlan,
        stdio: Stdio,
        *,
        forward_signals: bool = False,
        on_machine: Callable[[Machine], None] | None = None,
        on_process: Callable[[RemoteProcess], None] | None = None,
        timings: Timings | None = None,
    ) -> None:
        self.plan = plan
        self.stdio = stdio
        self.forward_signals = forward_signals
        self.on_machine = on_machine
        self.on_process = on_process
        self.timings = timings or Timings()
        self.machine: Machine | None = None
        self.process: RemoteProcess | None = None
        self._signalled: int | None = None
        self._stopping = False  # the run was cancelled to stop the VM: ignore more signals
        self._pending: asyncio.Future[None] | None = None
        self._health = asyncio.Event()

    # -- plan -> specs -------------------------------------------------------------

    def resolve(self) -> Resolved:
        """Guest assets, backend and image disks (blocking: may export or pack the image).

        Everything that can be wrong with the input fails here, before a VM exists."""
        from fcvm.assets import resolve_assets
        from fcvm.vmm import select

        plan = self.plan
        assets = resolve_assets()
        backend = select.plan(plan.vmm)
        logger.info("vmm: %s (%s) - %s", backend.backend, backend.accel, backend.reason)
        guest_image = images.resolve(plan.image)
        drives: list[DriveSpec] = []
        if guest_image.store is not None:
            drives.append(DriveSpec(IMAGES_DRIVE, guest_image.store.path))
        if guest_image.archive is not None:
            drives.append(DriveSpec(ARCHIVE_DRIVE, guest_image.archive))
        machine = MachineSpec(
            name=plan.name,
            backend=backend,
            kernel=assets.vmlinux,
            initrd=assets.initrd,
            rootfs=assets.rootfs,
            vcpus=plan.cpus,
            mem_mib=plan.mem_mib,
            network=plan.network,
            publish=tuple(parse_publish(list(plan.publish))),
            drives=tuple(drives),
            image=plan.image.ref,
        )
        self.timings.mark("image-ready")
        return Resolved(machine, image_source(machine, guest_image))

    def container_spec(self, image: ImageSource, proxy_env: dict[str, str]) -> ProcessSpec:
        plan = self.plan
        return ProcessSpec(
            mode=p.MODE_CONTAINER,
            argv=plan.command,
            env=plan.env,
            interactive=plan.interactive,
            tty=plan.tty,
            image=image,
            privileged=plan.privileged,
            health_check=plan.health_check,
            health_timeout=plan.health_timeout,
            # podman passes these on to pulls and to the container
            proxy_env=tuple(sorted(proxy_env.items())),
        )

    # -- running -------------------------------------------------------------------

    async def run(self) -> int:
        """Boot, run the container, stop; the container's exit code (or 128+N)."""
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None
        installed: list[signal.Signals] = []
        if self.forward_signals:
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, self._on_signal, sig, main)
                installed.append(sig)
        try:
            return await self._run()
        except asyncio.CancelledError:
            if self._signalled is None:
                raise
            # A stop signal before the container ran, a second one, or the grace
            # period over: the VM is already stopped (the Machine unwound).
            logger.info("signal %d: stopped the VM", self._signalled)
            return 128 + self._signalled
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            self.timings.dump()

    async def _run(self) -> int:
        state.reap_stale()
        resolved = await asyncio.to_thread(self.resolve)
        async with Machine(resolved.machine, timings=self.timings) as machine:
            self.machine = machine
            if self.on_machine is not None:
                self.on_machine(machine)
            spec = self.container_spec(resolved.image, machine.proxy_env())
            code = await machine.supervise(self._container(machine, spec))
        self.timings.mark("vm-stopped")
        return code

    async def _container(self, machine: Machine, spec: ProcessSpec) -> int:
        def on_event(event: dict[str, Any]) -> None:
            kind = event.get("event")
            if kind == p.EV_PHASE:
                self.timings.mark(str(event.get("name")))
                if event.get("detail"):  # e.g. why the image store was not usable
                    logger.info("%s: %s", event.get("name"), event.get("detail"))
            elif kind == p.EV_STARTED:
                self.timings.mark("container-started")
            elif kind == p.EV_HEALTH:
                status = str(event.get("status"))
                self.timings.mark(f"health-{status}")
                machine.update_record(health=status)
                self._health.set()
                if status != "healthy":
                    logger.warning("container unhealthy: %s", event.get("detail"))

        from fcvm.remote import run_remote

        def started(proc: RemoteProcess) -> None:
            self.process = proc
            if self.on_process is not None:
                self.on_process(proc)

        code = await run_remote(
            machine.session, spec, self.stdio, on_event=on_event, on_start=started
        )
        self.timings.mark("container-exited")
        return code

    async def wait_healthy(self) -> None:
        """Until the agent has reported the container's health (either way)."""
        await self._health.wait()

    def _on_signal(self, signum: int, main: asyncio.Task[Any]) -> None:
        if self._stopping:
            return
        proc = self.process
        first = self._signalled is None
        self._signalled = signum
        if first and proc is not None and proc.exit_code is None:
            # podman's --sig-proxy: the container decides what the signal means.
            logger.info("signal %d: forwarded to the container", signum)
            self._pending = asyncio.ensure_future(proc.signal(signum))
            asyncio.get_running_loop().call_later(self.plan.stop_timeout, self._stop, main)
            return
        self._stop(main)

    def _stop(self, main: asyncio.Task[Any]) -> None:
        if not self._stopping and not main.done():
            self._stopping = True
            main.cancel()


def image_source(machine: MachineSpec, guest_image: images.GuestImage) -> ImageSource:
    """Where the guest finds the image: the drives `resolve` attached, by name."""
    if guest_image.pull:
        return ImageSource(pull=guest_image.pull)
    archive = (
        machine.device(ARCHIVE_DRIVE) if guest_image.archive is not None else None
    )
    if guest_image.store is not None:
        # Run from the prebuilt store; load the archive only if it turns out unusable.
        return ImageSource(
            ref=guest_image.store.image_id, store=machine.device(IMAGES_DRIVE), device=archive
        )
    return ImageSource(ref=guest_image.ref, device=archive)
