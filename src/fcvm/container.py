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
(exit 128+N). The same signal again within DUPLICATE_SECONDS is the first one passed
on twice (a wrapper such as `timeout --foreground` forwards the terminal's Ctrl-C that
fcvm also got), not a second. SIGUSR1, SIGUSR2, SIGQUIT and SIGALRM are only forwarded
(reload, log reopening): they never stop the VM. Output whose reader went away
(`| head`) stops the VM at once (141).
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fcvm import children, imagecache, images, log, state
from fcvm.agent import protocol as p
from fcvm.agent.spec import ContainerSetup, ImageSource, MapMount, ProcessSpec
from fcvm.machine import DriveSpec, Machine, MachineSpec, RestoreFailed
from fcvm.net import parse_publish
from fcvm.plan import RunPlan
from fcvm.remote import RemoteProcess, Stdio
from fcvm.snapshot.layout import KIND_PRESTART, KIND_STARTUP
from fcvm.timings import Timings
from fcvm.volumes.spec import VolumeMap

logger = log.get("container")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PROXY_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT, signal.SIGALRM)
DUPLICATE_SECONDS = 0.3
IMAGES_DRIVE = "images"  # the prebuilt image store (read-only ext4)
ARCHIVE_DRIVE = "image-archive"  # the image as an OCI/docker archive (read-only)
STORAGE_DRIVE = "storage"  # podman's storage: the container's writable layer (private)


@dataclass(frozen=True)
class Resolved:
    machine: MachineSpec
    image: ImageSource
    config: images.ImageConfig | None
    keys: imagecache.Keys


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
        self._signalled_at = 0.0  # (loop time)
        self._stopping = False  # the run was cancelled to stop the VM: ignore more signals
        self._pending: asyncio.Future[None] | None = None
        self._health = asyncio.Event()
        self._resolved: Resolved | None = None
        self._startup_pending = False
        self._startup: asyncio.Future[None] | None = None
        self._main: asyncio.Task[Any] | None = None  # run()'s task, while it runs
        if forward_signals:  # (the CLI: a writer whose reader is gone gets SIGPIPE)
            stdio.on_reader_gone = self._reader_gone

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
        if plan.disk_size:
            drives.append(DriveSpec(STORAGE_DRIVE, read_only=False, blank_size=plan.disk_size))
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
            maps=plan.maps,
        )
        if plan.disk_size:
            machine = dataclasses.replace(
                machine, cmdline_extra=(f"fcvm.storage={machine.device(STORAGE_DRIVE)}",)
            )
        keys = imagecache.keys_for(plan, machine, guest_image)
        self.timings.mark("image-ready")
        return Resolved(machine, image_source(machine, guest_image), guest_image.config, keys)

    def container_setup(self, resolved: Resolved, proxy_env: dict[str, str]) -> ContainerSetup:
        """What the container is created with (up to its gate)."""
        config = resolved.config
        return ContainerSetup(
            image=resolved.image,
            privileged=self.plan.privileged,
            proxy_env=tuple(sorted(proxy_env.items())),  # for a pull in the guest
            entrypoint=config.entrypoint if config else None,
            cmd=config.cmd if config else None,
        )

    def container_spec(self, proxy_env: dict[str, str]) -> ProcessSpec:
        """The container's process: command, and env on top of the image's. Proxies
        first (podman passes the host's on to the container), then HOSTNAME (podman
        sets it), then the run's own --env, which wins."""
        plan = self.plan
        env = (*sorted(proxy_env.items()), ("HOSTNAME", plan.name), *plan.env)
        return ProcessSpec(
            mode=p.MODE_CONTAINER,
            argv=plan.command,
            env=env,
            interactive=plan.interactive,
            tty=plan.tty,
            health_check=plan.health_check,
            health_timeout=plan.health_timeout,
            maps=map_mounts(plan.maps),
        )

    # -- running -------------------------------------------------------------------

    async def run(self) -> int:
        """Boot, run the container, stop; the container's exit code (or 128+N)."""
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None
        self._main = main
        installed: list[signal.Signals] = []
        if self.forward_signals:
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, self._on_signal, sig, main)
                installed.append(sig)
            for sig in PROXY_SIGNALS:
                loop.add_signal_handler(sig, self._proxy_signal, sig)
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
        resolved = await children.in_thread(self.resolve)  # (stopped with the run)
        self._resolved = resolved
        keys = resolved.keys
        if keys.reason:
            logger.info("no snapshot cache: %s", keys.reason)
        entry = await asyncio.to_thread(imagecache.lookup, keys)
        if entry is not None:
            try:
                code = await self._in_machine(Machine(
                    resolved.machine, restore=imagecache.restore_source(entry),
                    timings=self.timings), keys, entry.meta.kind)  # fmt: skip
                entry.lease.release()
                return code
            except RestoreFailed as exc:
                imagecache.forget(entry, exc.line())
                self.timings.mark("restore-failed")
            except BaseException:
                entry.lease.release()
                raise
        return await self._in_machine(Machine(resolved.machine, timings=self.timings), keys, None)

    async def _in_machine(self, machine: Machine, keys: imagecache.Keys, restored: str | None
                          ) -> int:  # fmt: skip
        """Boot (restored None) or restore the machine, run the container in it, stop it.

        Booted: the container is prepared, and the first run of a key snapshots it right
        there (prestart). Restored from a prestart snapshot, the container is started;
        from a startup (or a named) snapshot it runs already and is attached to."""
        async with machine:
            self.machine = machine
            machine.workload = self._workload_info()
            if self.on_machine is not None:
                self.on_machine(machine)
            if restored is None:
                assert self._resolved is not None
                setup = self.container_setup(self._resolved, machine.proxy_env())
                await machine.supervise(self._prepare(machine, setup))
                if keys.prestart is not None and machine.vmm and machine.vmm.capabilities.snapshot:
                    await imagecache.write(machine, keys, KIND_PRESTART, self._workload_info())
            self._startup_pending = keys.startup is not None and restored != KIND_STARTUP
            spec = self.container_spec(machine.proxy_env())
            code = await machine.supervise(self._container(machine, spec))
        self.timings.mark("vm-stopped")
        return code

    def _workload_info(self) -> dict[str, Any]:
        """For snapshots' metadata: what runs in the VM (a clone attaches to it)."""
        plan = self.plan
        return {"kind": "container", "image": plan.image.ref, "command": list(plan.command),
                "tty": plan.tty, "interactive": plan.interactive,
                "health_check": plan.health_check}  # fmt: skip

    def _on_phase(self, event: dict[str, Any]) -> None:
        if event.get("event") == p.EV_PHASE:
            self.timings.mark(str(event.get("name")))
            if event.get("detail"):  # e.g. why the image store was not usable
                logger.info("%s: %s", event.get("name"), event.get("detail"))

    async def _prepare(self, machine: Machine, setup: ContainerSetup) -> None:
        from fcvm.remote import prepare_container

        await prepare_container(machine.session, setup, on_event=self._on_phase)
        self.timings.mark("container-ready")

    async def _container(self, machine: Machine, spec: ProcessSpec) -> int:
        def on_event(event: dict[str, Any]) -> None:
            kind = event.get("event")
            if kind == p.EV_STARTED:
                self.timings.mark("container-started")
                if spec.health_check and not machine.record.health:  # (not yet checked)
                    machine.update_record(health="starting")  # fcvm exec may come in now
            elif kind == p.EV_HEALTH:
                status = str(event.get("status"))
                self.timings.mark(f"health-{status}")
                # (with the URL checked, if any: fcvm ls names a health only for those)
                machine.update_record(health=status, extra={
                    **machine.record.extra, "health_check": spec.health_check or ""})
                self._health.set()
                if status != "healthy":
                    logger.warning("container unhealthy: %s", event.get("detail"))
                elif self._startup_pending:
                    self._startup_pending = False
                    self._startup = asyncio.ensure_future(self._write_startup(machine))

        from fcvm.remote import run_remote

        def started(proc: RemoteProcess) -> None:
            self.process = proc
            if self.on_process is not None:
                self.on_process(proc)

        from fcvm.remote import SessionLost

        try:
            while True:
                reconnects = machine.reconnects
                try:
                    code = await run_remote(
                        machine.session, spec, self.stdio, on_event=on_event, on_start=started
                    )
                    break
                except SessionLost:
                    if machine.reconnects == reconnects:
                        raise
                    # A snapshot reset the agent's connection (Firecracker) and the
                    # Machine connected anew: the container runs on; attach again.
                    logger.info("reattaching to the container after a snapshot")
        finally:
            if self._startup is not None and not self._startup.done():
                self._startup.cancel()
        self.timings.mark("container-exited")
        return code

    async def _write_startup(self, machine: Machine) -> None:
        """The first healthy run of a startup key snapshots the running service."""
        assert self._resolved is not None
        try:
            await imagecache.write(machine, self._resolved.keys, KIND_STARTUP,
                                   self._workload_info())  # fmt: skip
        except Exception as exc:  # the run itself goes on
            logger.warning("no startup snapshot: %s", exc)

    async def wait_healthy(self) -> None:
        """Until the agent has reported the container's health (either way)."""
        await self._health.wait()

    def _on_signal(self, signum: int, main: asyncio.Task[Any]) -> None:
        if self._stopping:
            return
        loop = asyncio.get_running_loop()
        if signum == self._signalled and loop.time() - self._signalled_at < DUPLICATE_SECONDS:
            logger.debug("signal %d again at once: taken as the same one", signum)
            return
        proc = self.process
        first = self._signalled is None
        self._signalled, self._signalled_at = signum, loop.time()
        if first and proc is not None and proc.exit_code is None:
            # podman's --sig-proxy: the container decides what the signal means.
            logger.info("signal %d: forwarded to the container", signum)
            self._pending = asyncio.ensure_future(proc.signal(signum))
            asyncio.get_running_loop().call_later(self.plan.stop_timeout, self._stop, main)
            return
        self._stop(main)

    def _proxy_signal(self, signum: int) -> None:
        """A signal only passed on to the container's process (none before it runs)."""
        proc = self.process
        if proc is None or proc.exit_code is not None or self._stopping:
            logger.info("signal %d: the container is not running; ignored", signum)
            return
        logger.info("signal %d: forwarded to the container", signum)
        task = asyncio.ensure_future(proc.signal(signum))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # (best effort)

    def _reader_gone(self) -> None:
        """fcvm's output has no reader any more (`fcvm podman run ... | head`): the run
        ends as a pipeline's writer would (SIGPIPE, exit 141) - the VM is stopped at
        once (a container's PID 1 ignores a forwarded SIGPIPE, and its output has
        nowhere to go)."""
        if self._main is not None and not self._stopping:
            logger.info("the output's reader went away: stopping the VM")
            self._signalled = signal.SIGPIPE
            self._stop(self._main)

    def _stop(self, main: asyncio.Task[Any]) -> None:
        if not self._stopping and not main.done():
            self._stopping = True
            main.cancel()


def map_mounts(maps: tuple[VolumeMap, ...]) -> tuple[MapMount, ...]:
    """--map volumes as the agent mounts them: map i on the VM's extra stream i (the
    Machine serves it there)."""
    return tuple(MapMount(i, m.guest, m.read_only) for i, m in enumerate(maps))


def image_source(machine: MachineSpec, guest_image: images.GuestImage) -> ImageSource:
    """Where the guest finds the image: the drives `resolve` attached, by name."""
    if guest_image.pull:
        return ImageSource(pull=guest_image.pull)
    archive = machine.device(ARCHIVE_DRIVE) if guest_image.archive is not None else None
    if guest_image.store is not None:
        # Run from the prebuilt store; load the archive only if it turns out unusable.
        return ImageSource(
            ref=guest_image.store.image_id, store=machine.device(IMAGES_DRIVE), device=archive
        )
    return ImageSource(ref=guest_image.ref, device=archive)
