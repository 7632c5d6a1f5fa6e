"""fcvm as a Python library: containers in microVMs, from a program.

    import fcvm

    done = fcvm.run("localhost/fcvm-busybox", ["echo", "hello"])     # one shot
    assert (done.exit_code, done.stdout) == (0, b"hello\\n")

    with fcvm.start("localhost/fcvm-busybox", ["httpd", "-f", "-p", "80"],
                    publish=["8080:80"]) as vm:                     # a VM that lives
        r = vm.exec(["wget", "-qO-", "http://127.0.0.1/"], check=True)
        host, port = vm.address(80)                                  # published port

`fcvm.aio` has the same functions for asyncio (`await fcvm.aio.run(...)`, `async with
await fcvm.aio.start(...) as vm`). Errors are the CLI's: `fcvm.FcvmError` and its
family, with the same one-line messages; a command that exits non-zero with
`check=True` raises `ProcessFailed` carrying the result (so does a command that
cannot be started: exit code 127 not found, 126 not runnable, the reason on stderr, as
the CLI has it); `timeout` (seconds) kills the command and raises `ExecTimeout`
carrying what it printed until then.

Every VM runs on one background thread (fcvm._runtime), whatever thread or event loop
calls; a VM is stopped by `stop()`, by leaving its `with` block, when its container
exits, or at interpreter exit (a VM garbage-collected while running warns and stops).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

from fcvm import plan as planning
from fcvm._runtime import runtime
from fcvm.agent import protocol as p
from fcvm.agent.spec import ProcessSpec
from fcvm.errors import FcvmError, GuestError, StateError, UsageError
from fcvm.remote import BufferStdio, RemoteProcess, RemoteProcessError
from fcvm.session import SessionClosed

if TYPE_CHECKING:
    from typing_extensions import Unpack

Command = Sequence[str] | str | None
OUTPUT_LIMIT = 8 << 20  # bytes of a started container's output kept for output()


class VmOptions(TypedDict, total=False):
    """The VM and container options of `run` and `start`: the CLI's flags, same rules."""

    name: str  # unique among running VMs; generated when absent
    env: Mapping[str, str] | Sequence[str]  # {"K": "V"} or ["K=V", ...]
    cpus: int
    mem: int | str  # MiB, or "2G"
    disk_size: int | str  # the container's storage disk: "8G" (default), or "ram"
    snapshot: bool  # use and fill the image cache (default True)
    network: str  # "rootless" (default) or "bridged"
    publish: Sequence[str]  # ["8080:80", "127.0.0.1:5353:53/udp"]
    privileged: bool
    health_check: str  # URL that must answer 2xx/3xx inside the VM before start() returns
    health_timeout: float
    vmm: str  # "auto" (default), "firecracker", "qemu"
    maps: Sequence[str]  # ["/srv/data:/data", "/etc/app:/config:ro"]: host directories


@dataclass(frozen=True)
class Completed:
    """A finished command: what `run` and `VM.exec` return."""

    args: tuple[str, ...]
    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace")

    def check(self) -> Completed:
        """self, or ProcessFailed if the command exited non-zero."""
        if self.exit_code != 0:
            raise ProcessFailed(self)
        return self


class ProcessFailed(FcvmError):
    """check=True and the command exited non-zero; `.result` has its output."""

    def __init__(self, result: Completed) -> None:
        super().__init__(f"{' '.join(result.args) or 'the container'} exited {result.exit_code}")
        self.result = result
        self.exit_code = result.exit_code


class ExecTimeout(FcvmError, TimeoutError):
    """The command ran longer than its timeout and was killed; `.result` has what it
    printed until then (exit code 137, as for SIGKILL)."""

    def __init__(self, result: Completed, timeout: float) -> None:
        super().__init__(f"{' '.join(result.args)} did not finish within {timeout:g} s")
        self.result = result


@dataclass(frozen=True)
class Port:
    """A published port: the guest's port reached at host_ip:host_port on this host."""

    guest_port: int
    host_ip: str
    host_port: int
    proto: str = "tcp"


def _argv(command: Command) -> tuple[str, ...]:
    """A list runs as given; a string runs under `sh -c` (the shell convenience)."""
    if command is None:
        return ()
    if isinstance(command, str):
        return ("sh", "-c", command)
    argv = tuple(command)
    if not all(isinstance(a, str) for a in argv):
        raise UsageError("a command is a list of strings (or one string for sh -c)")
    return argv


def _not_started(exc: RemoteProcessError, argv: tuple[str, ...], stdio: BufferStdio
                 ) -> Completed:  # fmt: skip
    """A command the guest could not start (not found: 127, not runnable: 126) is a
    result with that code and the reason on stderr, as the CLI reports it; any other
    failure (125: fcvm's own) is raised."""
    if exc.exit_code not in (126, 127):
        raise exc
    stderr = bytes(stdio.stderr) + f"{exc}\n".encode()
    return Completed(argv, exc.exit_code, bytes(stdio.stdout), stderr)


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
        raise UsageError(f"timeout={timeout!r}: a number of seconds above 0 (or None)")


def _strings(option: str, value: object) -> list[str]:
    """A list of strings option (a lone string would be taken letter by letter)."""
    items = [] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else None
    if items is None or isinstance(value, str) or not all(isinstance(v, str) for v in items):
        raise UsageError(f"{option} is a list of strings")
    return [str(v) for v in items]


def _input(data: bytes | str | None) -> bytes | None:
    """stdin: bytes-like (kept as given), or str (UTF-8)."""
    if data is None or isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise UsageError(f"input is bytes or str, not {type(data).__name__}")


def _env(env: Mapping[str, str] | Sequence[str] | None) -> tuple[tuple[str, str], ...]:
    if env is None:
        return ()
    if isinstance(env, str):  # (it would be taken letter by letter)
        raise UsageError("env is a mapping or a list of 'KEY=VALUE' strings")
    items = [f"{k}={v}" for k, v in env.items()] if isinstance(env, Mapping) else list(env)
    out = []
    for item in items:  # the CLI's rules, one item at a time (values may hold commas)
        key, eq, value = item.partition("=")
        if not eq or not planning.ENV_KEY_RE.fullmatch(key):
            raise UsageError(f"malformed env entry {item!r}: expected KEY=VALUE")
        out.append((key, value))
    return tuple(out)


def _plan(image: str, command: Command, options: VmOptions, *, interactive: bool = False
          ) -> planning.RunPlan:  # fmt: skip
    from fcvm.net import parse_publish
    from fcvm.volumes.spec import parse_maps

    unknown = set(options) - set(VmOptions.__annotations__)
    if unknown:
        raise UsageError(f"unknown option {sorted(unknown)[0]!r}")
    if not isinstance(image, str):
        raise UsageError(f"image is a string (a reference or an archive path), not "
                         f"{type(image).__name__}")  # fmt: skip
    for key in ("name", "network", "health_check", "vmm"):
        if options.get(key) is not None and not isinstance(options.get(key), str):
            raise UsageError(f"{key} is a string, not {type(options.get(key)).__name__}")
    network = options.get("network", "rootless")
    if network not in ("rootless", "bridged"):
        raise UsageError(f"unknown network mode {network!r} (use rootless or bridged)")
    return planning.RunPlan(
        name=planning.parse_name(options.get("name") or f"fcvm-{os.urandom(3).hex()}"),
        image=planning.parse_image(image),
        command=_argv(command),
        env=_env(options.get("env")),
        cpus=planning.parse_cpus(str(options.get("cpus", 1))),
        mem_mib=planning.parse_mem(str(options.get("mem", 1024))),
        disk_size=planning.parse_disk_size(str(options.get("disk_size", "8G"))),
        snapshot=bool(options.get("snapshot", True)),
        vmm=options.get("vmm") or os.environ.get("FCVM_VMM", "auto"),
        network=network,
        publish=tuple(
            f.spec() for f in parse_publish(_strings("publish", options.get("publish", ())))
        ),
        privileged=bool(options.get("privileged", False)),
        interactive=interactive,
        health_check=planning.parse_health_check(options.get("health_check")),
        health_timeout=planning.parse_seconds(
            "health_timeout", str(options.get("health_timeout", 60.0))
        ),
        maps=parse_maps(_strings("maps", options.get("maps", ()))),
    )


class _BoundedStdio(BufferStdio):
    """A started container's output: the last OUTPUT_LIMIT bytes of each stream."""

    async def copy_out(self, fd: int, channel: Any) -> None:
        sink = self.stdout if fd == 1 else self.stderr
        while data := await channel.read():
            sink += data
            if len(sink) > OUTPUT_LIMIT:
                del sink[: len(sink) - OUTPUT_LIMIT]


class _Core:
    """One API VM, living on the runtime's loop: the ContainerRun task and its Machine."""

    def __init__(self, plan: planning.RunPlan) -> None:
        from fcvm.container import ContainerRun

        self.plan = plan
        self.stdio = _BoundedStdio()
        self.run = ContainerRun(plan, self.stdio)
        self.task: asyncio.Task[int] | None = None

    async def start(self) -> None:
        """Boot and wait until the container runs (and passes its health check)."""
        self.task = asyncio.create_task(self.run.run())
        healthy = asyncio.create_task(self.run.wait_healthy())
        try:
            await asyncio.wait({self.task, healthy}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await self.stop()
            raise
        finally:
            healthy.cancel()
        if self.task.done():
            self.task.result()  # the failure, if it failed
            return  # the container already ended: wait() has its code
        machine = self.run.machine
        if machine is not None and machine.record.health == "unhealthy":
            detail = machine.record.health
            await self.stop()
            raise StateError(f"VM {self.plan.name!r}: the container is {detail}")

    async def exec(
        self, argv: tuple[str, ...], *, input: bytes | None, env: tuple[tuple[str, str], ...],
        cwd: str | None, user: str | None, timeout: float | None, in_vm: bool,
    ) -> Completed:  # fmt: skip
        machine = self.run.machine
        if machine is None or self.task is None or self.task.done():
            raise StateError(f"VM {self.plan.name!r} is not running")
        spec = ProcessSpec(
            mode=p.MODE_VM if in_vm else p.MODE_EXEC, argv=argv, env=env, workdir=cwd,
            user=user, interactive=input is not None,
        )  # fmt: skip
        stdio = BufferStdio(input=input)
        try:
            proc = await RemoteProcess.start(machine.session, spec, stdio)
            code = await asyncio.wait_for(machine.supervise(proc.wait()), timeout)
        except RemoteProcessError as exc:
            return _not_started(exc, argv, stdio)
        except (GuestError, SessionClosed):
            if self.task.cancelled() or self.task.cancelling():  # stop() ended the VM
                raise StateError(
                    f"VM {self.plan.name!r} was stopped while the command ran"
                ) from None
            raise
        except TimeoutError:
            await proc.signal(signal.SIGKILL)  # (wait_for cancelled wait(): channels closed)
            partial = Completed(argv, 128 + signal.SIGKILL, bytes(stdio.stdout),
                                bytes(stdio.stderr))  # fmt: skip
            raise ExecTimeout(partial, timeout or 0) from None
        return Completed(argv, code, bytes(stdio.stdout), bytes(stdio.stderr))

    async def wait(self) -> int:
        task = self.task
        assert task is not None
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            waiter = asyncio.current_task()
            if task.cancelled() and not (waiter and waiter.cancelling()):  # stop() did it
                raise StateError(
                    f"VM {self.plan.name!r} was stopped before its container exited"
                ) from None
            raise

    async def stop(self) -> int | None:
        """Stop the VM (idempotent); the container's exit code if it had ended."""
        task = self.task
        if task is None:
            return None
        if not task.done():
            task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            return None

    def ports(self) -> list[Port]:
        machine = self.run.machine
        if machine is None or machine.net is None:
            return []
        return [Port(f.guest_port, f.host_ip, f.host_port, f.proto) for f in machine.net.forwards]


class AsyncVM:
    """A container running in its own VM, for asyncio programs (see `fcvm.aio.start`)."""

    def __init__(self, core: _Core) -> None:
        self._core = core
        runtime().finalizers[id(self)] = core.stop

    @property
    def name(self) -> str:
        return self._core.plan.name

    @property
    def running(self) -> bool:
        return self._core.task is not None and not self._core.task.done()

    @property
    def ports(self) -> list[Port]:
        """Published ports and where they are reachable on this host."""
        return self._core.ports()

    def address(self, guest_port: int, proto: str = "tcp") -> tuple[str, int]:
        """(host, port) on this host that reaches the guest's published port."""
        for port in self.ports:
            if port.guest_port == guest_port and port.proto == proto:
                return port.host_ip, port.host_port
        raise UsageError(f"guest port {guest_port}/{proto} is not published (publish=...)")

    @property
    def guest_ip(self) -> str:
        machine = self._core.run.machine
        return machine.net.guest_ip if machine is not None and machine.net is not None else ""

    def output(self) -> tuple[bytes, bytes]:
        """What the container printed so far (stdout, stderr; the last 8 MiB of each)."""
        return bytes(self._core.stdio.stdout), bytes(self._core.stdio.stderr)

    async def exec(
        self, command: Command, *, input: bytes | str | None = None,
        env: Mapping[str, str] | Sequence[str] | None = None, cwd: str | None = None,
        user: str | None = None, timeout: float | None = None, check: bool = False,
        vm: bool = False,
    ) -> Completed:  # fmt: skip
        """Run command in the container (with vm=True: in the guest OS) and wait for it."""
        argv = _argv(command)
        _check_timeout(timeout)
        if not argv:
            raise UsageError("exec needs a command")
        data = _input(input)
        result = await runtime().acall(self._core.exec(
            argv, input=data, env=_env(env), cwd=cwd, user=user, timeout=timeout, in_vm=vm,
        ))  # fmt: skip
        return result.check() if check else result

    async def wait(self) -> int:
        """Until the container exits; its exit code. StateError if the VM was stopped
        first (stop(), leaving `with`)."""
        return await runtime().acall(self._core.wait())

    async def stop(self) -> None:
        """Stop the VM and remove everything it held. Idempotent."""
        runtime().finalizers.pop(id(self), None)
        await runtime().acall(self._core.stop())

    async def __aenter__(self) -> AsyncVM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __del__(self) -> None:
        if getattr(self, "_core", None) is not None and self.running:
            warnings.warn(f"VM {self.name!r} was never stopped; stopping it now",
                          ResourceWarning, stacklevel=2)  # fmt: skip
            with contextlib.suppress(Exception):
                runtime().submit(self._core.stop())


class VM:
    """A container running in its own VM (see `fcvm.start`): the blocking twin of AsyncVM."""

    def __init__(self, avm: AsyncVM) -> None:
        self._avm = avm

    name = property(lambda self: self._avm.name)
    running = property(lambda self: self._avm.running)
    ports = property(lambda self: self._avm.ports)
    guest_ip = property(lambda self: self._avm.guest_ip)

    def address(self, guest_port: int, proto: str = "tcp") -> tuple[str, int]:
        return self._avm.address(guest_port, proto)

    def output(self) -> tuple[bytes, bytes]:
        return self._avm.output()

    def exec(
        self, command: Command, *, input: bytes | str | None = None,
        env: Mapping[str, str] | Sequence[str] | None = None, cwd: str | None = None,
        user: str | None = None, timeout: float | None = None, check: bool = False,
        vm: bool = False,
    ) -> Completed:  # fmt: skip
        """Run command in the container (vm=True: in the guest OS); see AsyncVM.exec."""
        return runtime().call(self._avm.exec(command, input=input, env=env, cwd=cwd,
                                             user=user, timeout=timeout, check=check,
                                             vm=vm))  # fmt: skip

    def wait(self, timeout: float | None = None) -> int:
        """Until the container exits (or timeout seconds: TimeoutError); its exit code.
        StateError if the VM was stopped first."""
        try:
            return runtime().call(self._avm.wait(), timeout)
        except TimeoutError as exc:
            if str(exc):
                raise
            raise TimeoutError(f"VM {self.name!r}: its container did not exit within "
                               f"{timeout} s (it goes on)") from None  # fmt: skip

    def stop(self) -> None:
        runtime().call(self._avm.stop())

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def start_async(image: str, command: Command = None, **options: Unpack[VmOptions]
                      ) -> AsyncVM:  # fmt: skip
    """Boot a VM running image (with command) and return once its container runs (and
    passes `health_check`, if given). Use it with `async with` or call `stop()`."""
    core = _Core(_plan(image, command, options))
    await runtime().acall(core.start())
    return AsyncVM(core)


async def run_async(
    image: str, command: Command = None, *, input: bytes | str | None = None,
    timeout: float | None = None, check: bool = False, **options: Unpack[VmOptions],
) -> Completed:  # fmt: skip
    """Run image (with command) in a new VM to completion: exit code, stdout, stderr.
    `input` is its stdin; `timeout` (seconds) stops the VM and raises ExecTimeout."""
    from fcvm.container import ContainerRun

    data = _input(input)
    plan = _plan(image, command, options, interactive=data is not None)
    _check_timeout(timeout)
    stdio = BufferStdio(input=data)

    async def go() -> int:
        return await asyncio.wait_for(ContainerRun(plan, stdio).run(), timeout)

    try:
        code = await runtime().acall(go())
    except RemoteProcessError as exc:
        result = _not_started(exc, plan.command, stdio)
        return result.check() if check else result
    except TimeoutError:
        partial = Completed(plan.command, 128 + signal.SIGKILL, bytes(stdio.stdout),
                            bytes(stdio.stderr))  # fmt: skip
        raise ExecTimeout(partial, timeout or 0) from None
    result = Completed(plan.command, code, bytes(stdio.stdout), bytes(stdio.stderr))
    return result.check() if check else result


def start(image: str, command: Command = None, **options: Unpack[VmOptions]) -> VM:
    """Blocking `start_async`: a VM whose container runs; `with` it or call `stop()`."""
    return VM(runtime().call(start_async(image, command, **options)))


def run(
    image: str, command: Command = None, *, input: bytes | str | None = None,
    timeout: float | None = None, check: bool = False, **options: Unpack[VmOptions],
) -> Completed:  # fmt: skip
    """Blocking `run_async`: the container's exit code, stdout and stderr."""
    return runtime().call(run_async(image, command, input=input, timeout=timeout, check=check,
                                    **options))  # fmt: skip
