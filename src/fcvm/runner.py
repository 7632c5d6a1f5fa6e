"""One `fcvm podman run`: plan -> assets -> image -> VM -> agent -> exit code.

Teardown is one ExitStack: every resource registers its undo as soon as it exists,
so container exit, Ctrl-C, SIGTERM, a dead VMM or an fcvm bug all unwind the same
way. If fcvm itself is killed -9, the VMM dies with it (PDEATHSIG) and the next fcvm
command reaps the record and directory (state.reap_stale).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from fcvm import images, log, paths, state
from fcvm.agent import protocol as p
from fcvm.errors import GuestError, ProtocolError
from fcvm.net import parse_publish, setup_network
from fcvm.plan import RunPlan
from fcvm.relay import start_relay
from fcvm.remote import LocalStdio, SessionLost, run_remote
from fcvm.session import SessionClosed
from fcvm.vmm.base import Drive, VmConfig, Vmm

logger = log.get("runner")

# Failures that may just be the VMM dying under us (the watchdog then says so).
LOST_SESSION = (SessionLost, SessionClosed, ConnectionError, BrokenPipeError)
BOOT_TIMEOUT = float(os.environ.get("FCVM_BOOT_TIMEOUT", "90"))


class Timings:
    """Phase split of a run: logged at info, written as JSON to $FCVM_TIMINGS."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.marks: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        elapsed = time.monotonic() - self.t0
        self.marks.append((name, elapsed))
        logger.info("%7.3fs %s", elapsed, name)

    def dump(self) -> None:
        out = os.environ.get("FCVM_TIMINGS")
        if out:
            Path(out).write_text(json.dumps(dict(self.marks)))


class Run:
    def __init__(self, plan: RunPlan, stdio: LocalStdio) -> None:
        self.plan = plan
        self.stdio = stdio
        self.timings = Timings()
        self.signalled: int | None = None
        self.proxy_env: dict[str, str] = {}

    def execute(self) -> int:
        """Run the plan; the exit code is the container's, or 128+N after signal N."""
        # SIGTERM/SIGHUP before the event loop takes over (network setup, image
        # store build) unwind like Ctrl-C does, so nothing is left half made.
        previous = {s: signal.signal(s, _raise_signalled) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            return self._execute()
        except _Signalled as sig:
            return 128 + sig.signum
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _execute(self) -> int:
        from fcvm.assets import resolve_assets
        from fcvm.vmm import select

        state.reap_stale()
        assets = resolve_assets()
        # Before anything is created: no usable VMM is bad input, not a teardown.
        backend = select.plan(self.plan.vmm)
        logger.info("vmm: %s (%s) - %s", backend.backend, backend.accel, backend.reason)
        guest_image = images.resolve(self.plan.image)
        self.timings.mark("image-ready")
        vm_id = state.new_vm_id()
        workdir = paths.vm_dir(vm_id)
        record = state.VmRecord(
            vm_id=vm_id,
            name=self.plan.name,
            image=self.plan.image.ref,
            cpus=self.plan.cpus,
            mem_mib=self.plan.mem_mib,
        )
        with contextlib.ExitStack() as undo:
            state.create(record)
            undo.callback(state.remove, vm_id)
            net = setup_network(
                vm_id, self.plan.network, parse_publish(list(self.plan.publish)), workdir=workdir
            )
            undo.callback(net.teardown)  # registered before the VMM's stop: runs after it
            state.update(record, network=net.record())
            self.timings.mark("network-ready")
            self.proxy_env = net.proxy_env()
            drives = [Drive("root", assets.rootfs, read_only=True, is_root=True)]
            if guest_image.store is not None:  # /dev/vdb; the archive after it is the fallback
                drives.append(Drive("images", guest_image.store.path, read_only=True))
            if guest_image.archive is not None:
                drives.append(Drive("image", guest_image.archive, read_only=True))
            config = VmConfig(
                vm_id=vm_id,
                workdir=workdir,
                kernel=assets.vmlinux,
                initrd=assets.initrd,
                vcpus=self.plan.cpus,
                mem_mib=self.plan.mem_mib,
                drives=tuple(drives),
                cmdline_extra=(f"fcvm.hostname={self.plan.name}", *net.guest_cmdline()),
                console_log=workdir / "console.log",
                net=net.vmm_net(),
                netns_exec=net.netns_exec,
            )
            vmm = select.instantiate(backend, config)
            undo.callback(vmm.stop)
            vmm.start()
            state.update(record, vmm=vmm.name, vmm_pid=vmm.pid, status="booting")
            self.timings.mark("vmm-started")
            try:
                code = asyncio.run(self._drive(vmm, record, guest_image))
            finally:
                self.timings.dump()
        if self.signalled is not None:
            return 128 + self.signalled
        return code

    def _container_spec(self, guest_image: images.GuestImage) -> dict[str, Any]:
        image: dict[str, Any]
        if guest_image.pull:
            image = {"pull": guest_image.pull}
        elif guest_image.store is not None:
            # Run from the prebuilt store; load the archive (next disk) only if it fails.
            image = {"store": "/dev/vdb", "ref": guest_image.store.image_id}
            if guest_image.archive is not None:
                image["device"] = "/dev/vdc"
        else:
            image = {"device": "/dev/vdb", "ref": guest_image.ref}
        return {
            "mode": p.MODE_CONTAINER,
            "image": image,
            "argv": list(self.plan.command),
            "env": [list(kv) for kv in self.plan.env],
            "interactive": self.plan.interactive,
            **self.stdio.tty_spec(),
            "privileged": self.plan.privileged,
            "health_check": self.plan.health_check,
            "health_timeout": self.plan.health_timeout,
            "proxy_env": self.proxy_env,  # podman passes these on to pulls and the container
        }

    async def _drive(self, vmm: Vmm, record: state.VmRecord, guest_image: images.GuestImage) -> int:
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None

        def on_signal(signum: int) -> None:
            self.signalled = signum
            main.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, on_signal, sig)
        watchdog = asyncio.create_task(_watch_vmm(vmm))
        try:
            work = asyncio.create_task(self._session(vmm, record, guest_image))
            done, _ = await asyncio.wait({work, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            if work in done and isinstance(work.exception(), LOST_SESSION):
                # A lost session usually means the VMM died: prefer saying that.
                await asyncio.wait({watchdog}, timeout=0.5)
                if watchdog.done():
                    return watchdog.result()
            if work in done:
                return work.result()
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
            return watchdog.result()  # raises the VMM's failure
        except asyncio.CancelledError:
            if self.signalled is None:
                raise
            logger.info("signal %d: stopping the VM", self.signalled)
            return 128 + self.signalled
        finally:
            watchdog.cancel()

    async def _session(
        self, vmm: Vmm, record: state.VmRecord, guest_image: images.GuestImage
    ) -> int:
        from fcvm.session import Session

        try:
            reader, writer = await vmm.open_agent_stream(timeout=BOOT_TIMEOUT)
            session = Session(reader, writer, role="host")
            await session.start(timeout=BOOT_TIMEOUT)
        except TimeoutError:
            raise GuestError(
                f"the guest agent did not answer within {BOOT_TIMEOUT:.0f}s",
                hint=_detail(vmm),
            ) from None
        except (ProtocolError, ConnectionError) as exc:
            await asyncio.sleep(0.2)  # let the console log catch up for the message
            raise GuestError(f"no session with the guest agent: {exc}", hint=_detail(vmm)) from None
        self.timings.mark("agent-ready")
        relay = await start_relay(paths.exec_socket(record.vm_id), session)
        state.update(record, status="running")

        def on_event(event: dict[str, Any]) -> None:
            kind = event.get("event")
            if kind == p.EV_PHASE:
                self.timings.mark(str(event.get("name")))
                if event.get("detail"):  # e.g. why the image store was not usable
                    logger.info("%s: %s", event.get("name"), event.get("detail"))
            elif kind == p.EV_STARTED:
                self.timings.mark("container-started")
            elif kind == p.EV_HEALTH:
                self.timings.mark(f"health-{event.get('status')}")
                state.update(record, health=str(event.get("status")))
                if event.get("status") != "healthy":
                    logger.warning("container unhealthy: %s", event.get("detail"))

        try:
            code = await run_remote(
                session, self._container_spec(guest_image), self.stdio, on_event=on_event
            )
            self.timings.mark("container-exited")
            return code
        finally:
            relay.close()
            await session.close()


class _Signalled(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum: int, frame: object) -> None:
    raise _Signalled(signum)


def _detail(vmm: Vmm) -> str | None:
    detail = getattr(vmm, "failure_detail", None)
    return detail() or None if callable(detail) else None


async def _watch_vmm(vmm: Vmm) -> int:
    """Raises GuestError when the VMM process ends before the work does."""
    while True:
        code = vmm.poll()
        if code is not None:
            raise GuestError(
                f"the VM stopped unexpectedly ({vmm.name} exited with {code})", hint=_detail(vmm)
            )
        await asyncio.sleep(0.05)
