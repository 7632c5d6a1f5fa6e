"""The VM's one container, in the guest: prepared up to its gate, started, attached to.

Lifecycle (state): NONE -prepare-> GATED -start-> RUNNING -> EXITED.

prepare   the image made available (image.py), the gate's directory and socket, then
          `podman run -d` with fcvm's gate (assets/data/gate.c) as the entrypoint: podman
          does all of its work (storage, namespaces, cgroups, mounts) and the container
          runs, holding at the gate. A snapshot taken here is the image cache's.
start     the gate gets the final argv, the environment on top of podman's, and the
          stdio (pipes, or a PTY this agent keeps the master of), and execs: the user's
          process is the container's PID 1, as if podman had started it.
exit      its pid (from the gate's SO_PEERCRED) as a pidfd; the code from conmon's exit
          file (`podman container cleanup` removes it a second later under TCG, so it is
          read at once; `podman inspect` if missed).

The container outlives sessions: a session that goes away (the host replaced after a
restore from a startup snapshot) detaches from it, and the next `attach` picks up its
output where it stands. Output is read only while someone is attached (a pipe's own
buffer holds the rest), so nothing is lost between sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import shutil
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from fcvm.agent import procs
from fcvm.agent import protocol as p
from fcvm.agent.image import ProcError, prepare_image, run_quiet
from fcvm.agent.maps import Maps
from fcvm.agent.proc_view import (
    ProcessConfig,
    container_pty,
    process_config,
    warm_page_cache,
    zombie_status,
)
from fcvm.agent.spec import ContainerSetup, ProcessSpec, command_line
from fcvm.session import Channel, SessionClosed, fdio

log = logging.getLogger("fcvm.agent")

Phase = Callable[[str, str], Awaitable[None]]

GATE_MAGIC = 0x47564346  # "FCVG"
GATE_VERSION = 1
GATE_TTY = 1
GATE_TIMEOUT = 60.0  # podman run -d until the gate says hello
EXIT_DIR = "/run/libpod/exits"  # conmon's --exit-dir for rootful podman
RUNROOT = "/run/containers/storage"  # podman's runroot: the hostname/hosts/resolv.conf
GRAPHROOT = "/var/lib/containers/storage"  # and its graphroot: the bundle's config.json
OUTPUT_DRAIN_SECONDS = 5.0
HEALTH_POLL_SECONDS = 0.5


class State(enum.Enum):
    NONE = "none"
    PREPARING = "preparing"
    GATED = "gated"
    RUNNING = "running"
    EXITED = "exited"


class _Output:
    """One output stream of the container's process, sent to whoever is attached."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.sink: Channel | None = None
        self._attached = asyncio.Event()
        self.done = asyncio.Event()  # EOF reached and handed on (or nobody to hand it to)
        self.eof = False

    def attach(self, ch: Channel) -> None:
        self.sink = ch
        self._attached.set()

    def detach(self) -> None:
        self.sink = None
        self._attached.clear()

    async def pump(self) -> None:
        try:
            while True:
                await self._attached.wait()
                data = await fdio.read_fd(self.fd)
                if not data:
                    break
                while not await self._deliver(data):
                    await self._attached.wait()
        finally:
            self.eof = True
            with contextlib.suppress(OSError):
                os.close(self.fd)
        await self.send_eof()

    async def _deliver(self, data: bytes) -> bool:
        ch = self.sink
        if ch is None:
            return False
        try:
            await ch.write(data)
            return True
        except (SessionClosed, ConnectionError, OSError):
            if self.sink is ch:
                self.detach()
            return False

    async def send_eof(self) -> None:
        ch = self.sink
        if self.eof and ch is not None:
            with contextlib.suppress(SessionClosed, ConnectionError, OSError):
                await ch.write_eof()
            self.done.set()


class Container:
    def __init__(self, reaper: procs.Reaper, transport: str = "serial") -> None:
        self.reaper = reaper
        self.maps = Maps(reaper, transport)  # --map volumes mounted in it
        self.state = State.NONE
        self.container_id = ""
        self.pid = 0  # the gate's, then the user's process's (same process)
        self.exit_code: int | None = None
        # What every `fcvm exec` gets on top of the container's config env: the run's
        # env was given to the gate, not to podman.
        self.exec_env: tuple[tuple[str, str], ...] = ()
        self.health: dict[str, Any] | None = None
        self._gate: socket.socket | None = None
        self._outputs: list[_Output] = []
        self._stdin: int | None = None  # pipe write end, or the PTY master
        self._master: int | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._proc: Channel | None = None  # the attached process channel
        self._exited = asyncio.Event()
        self._spec: ProcessSpec | None = None
        self.entrypoint: tuple[str, ...] = ()
        self.cmd: tuple[str, ...] = ()
        # The container's process settings as podman made them (config.json): what
        # `crun exec` starts from (its --env replaces rather than adds; its user and
        # directory would be root and /).
        self.config = ProcessConfig()

    # -- files podman made for the container (rewritten by identity.py) -----------

    def userdata(self, name: str) -> str:
        return os.path.join(RUNROOT, "overlay-containers", self.container_id, "userdata", name)

    # -- prepare ---------------------------------------------------------------------

    async def prepare(self, ch: Channel, setup: ContainerSetup) -> None:
        """Serve a prepare channel: up to the gate, then `ready`."""

        async def phase(name: str, detail: str = "") -> None:
            event = {"event": p.EV_PHASE, "name": name}
            if detail:
                event["detail"] = detail
            await ch.send_json(event)

        try:
            if self.state is not State.NONE:
                raise ProcError(f"the container is already {self.state.value}", 125)
            self.state = State.PREPARING
            ref = await prepare_image(setup.image, self.reaper, phase, dict(setup.proxy_env))
            await self._image_config(setup, ref)
            await phase("container-create")
            await self._create(setup, ref)
            self.config = process_config(
                os.path.join(GRAPHROOT, "overlay-containers", self.container_id, "userdata",
                             "config.json")
            )  # fmt: skip
            warm_page_cache(self.pid, command_line(self.entrypoint, self.cmd, ()))
            self.state = State.GATED
            await ch.send_json({"event": p.EV_READY, "container": self.container_id,
                                "pid": self.pid})  # fmt: skip
        except ProcError as exc:
            self.state = State.NONE
            await _send_error(ch, str(exc), exc.code)
        except Exception as exc:
            self.state = State.NONE
            log.exception("prepare failed")
            await _send_error(ch, f"agent: {exc}", 125)
        finally:
            with contextlib.suppress(Exception):
                await ch.close()

    async def _image_config(self, setup: ContainerSetup, ref: str) -> None:
        if setup.entrypoint is not None and setup.cmd is not None:
            self.entrypoint, self.cmd = setup.entrypoint, setup.cmd
            return
        code, text = await run_quiet(
            ["podman", "image", "inspect", "--format", "{{json .Config}}", ref], self.reaper
        )
        try:
            config = json.loads(text.splitlines()[-1]) if code == 0 else {}
        except (IndexError, ValueError):
            config = {}
        if not isinstance(config, dict):
            config = {}
        self.entrypoint = tuple(str(a) for a in config.get("Entrypoint") or ())
        self.cmd = tuple(str(a) for a in config.get("Cmd") or ())

    async def _create(self, setup: ContainerSetup, ref: str) -> None:
        os.makedirs(p.GATE_DIR, exist_ok=True)
        shutil.copy(p.GATE_BINARY, os.path.join(p.GATE_DIR, "gate"))
        path = os.path.join(p.GATE_DIR, "gate.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(path)
            os.chmod(path, 0o666)  # the image's USER may be anyone
            listener.listen(1)
            listener.setblocking(False)
            argv = [
                "podman", "--log-level=error", "run", "-d", "--pull=never", "--network=host",
                "--uts=host", f"--name={p.CONTAINER_NAME}", f"--entrypoint={p.GATE_MOUNT}/gate",
                f"--volume={p.GATE_DIR}:{p.GATE_MOUNT}:ro",
            ]  # fmt: skip
            if setup.privileged:
                argv.append("--privileged")
            argv.append(ref)
            loop = asyncio.get_running_loop()
            accept = asyncio.ensure_future(loop.sock_accept(listener))
            code, text = await run_quiet(argv, self.reaper)
            if code != 0:
                accept.cancel()
                raise ProcError(f"podman run failed: {text}", 125)
            self.container_id = text.splitlines()[-1].strip()
            try:
                conn, _ = await asyncio.wait_for(accept, GATE_TIMEOUT)
            except TimeoutError:
                raise ProcError("the container started but its gate never answered", 125) from None
        finally:
            listener.close()
        conn.setblocking(False)
        hello = await asyncio.wait_for(loop.sock_recv(conn, 6), GATE_TIMEOUT)
        if hello != b"GATE1\n":
            conn.close()
            raise ProcError(f"the gate said {hello!r}", 125)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid = struct.unpack("3i", creds)[0]
        self._gate = conn

    # -- start / attach --------------------------------------------------------------

    async def run(self, proc_ch: Channel, stdio: dict[int, Channel], spec: ProcessSpec) -> None:
        """Serve a container-mode process channel: start the gated container, or attach
        to the running one; events until its exit (or until this channel goes away)."""
        try:
            if self.state is State.GATED:
                await self.maps.mount(self.pid, spec.maps)
                await self._start(spec)
                await proc_ch.send_json({"event": p.EV_STARTED, "pid": self.pid})
            elif self.state in (State.RUNNING, State.EXITED):
                if spec.maps and self.state is State.RUNNING:
                    await self.maps.mount(self.pid, spec.maps)
                await proc_ch.send_json({"event": p.EV_STARTED, "pid": self.pid})
                if self.health is not None:  # healthy when the snapshot was taken
                    await proc_ch.send_json(self.health)
            else:
                raise ProcError(f"no container to run (it is {self.state.value})", 125)
            await self._attach(proc_ch, stdio)
        except ProcError as exc:
            await _send_error(proc_ch, str(exc), exc.code)
            for ch in (*stdio.values(), proc_ch):
                with contextlib.suppress(Exception):
                    await ch.close()

    async def _start(self, spec: ProcessSpec) -> None:
        assert self._gate is not None
        argv = command_line(self.entrypoint, self.cmd, spec.argv)
        if not argv:
            raise ProcError("no command given, and the image has no ENTRYPOINT or CMD", 125)
        env = list(spec.env)
        if spec.tty and not any(k == "TERM" for k, _ in env):
            env.insert(0, ("TERM", "xterm"))  # what podman sets with -t
        self.exec_env = tuple(env)
        child: list[int] = []
        try:
            if spec.tty:
                master, slave = container_pty(self.pid)
                procs.set_winsize(slave, spec.rows, spec.cols)
                self._master = self._stdin = master
                child = [slave, slave, slave]
                self._outputs = [_Output(os.dup(master))]
            else:
                if spec.interactive:
                    r, w = os.pipe()
                    self._stdin = w
                else:
                    r = os.open(os.devnull, os.O_RDONLY)
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                child = [r, out_w, err_w]
                self._outputs = [_Output(out_r), _Output(err_r)]
            for out in self._outputs:
                os.set_blocking(out.fd, False)
            if self._stdin is not None:
                os.set_blocking(self._stdin, False)
            payload = b"".join(a.encode() + b"\0" for a in argv)
            payload += b"".join(f"{k}={v}".encode() + b"\0" for k, v in env)
            header = struct.pack("6I", GATE_MAGIC, GATE_VERSION, GATE_TTY if spec.tty else 0,
                                 len(argv), len(env), len(payload))  # fmt: skip
            self._gate.setblocking(True)
            socket.send_fds(self._gate, [header], child)
            self._gate.sendall(payload)
        finally:
            for fd in set(child):
                os.close(fd)
        self._gate.setblocking(False)
        answer = await asyncio.get_running_loop().sock_recv(self._gate, 64)
        self._gate.close()
        self._gate = None
        if answer:  # "E<errno>\n": the exec failed, the gate exits
            err = int(answer.strip()[1:] or 0)
            self.state = State.EXITED
            what = argv[0]
            if err == 2:  # ENOENT
                raise ProcError(f"{what}: executable file not found in $PATH", 127)
            raise ProcError(f"{what}: {os.strerror(err)}", 126)
        self.state = State.RUNNING
        self._spec = spec
        for out in self._outputs:
            self._spawn(out.pump())
        self._spawn(self._watch_exit())
        self._spawn(self._watch_health(spec))

    async def _attach(self, proc_ch: Channel, stdio: dict[int, Channel]) -> None:
        self._proc = proc_ch
        sinks = [stdio.get(0)] if self._master is not None else [stdio.get(1), stdio.get(2)]
        for out, sink in zip(self._outputs, sinks, strict=False):
            if sink is not None:
                out.attach(sink)
                await out.send_eof()
        feeding = None
        if self._stdin is not None and 0 in stdio:
            feeding = asyncio.create_task(self._feed(stdio[0]))
        try:
            await self._serve_ops(proc_ch)
        finally:
            if feeding is not None:
                feeding.cancel()
            if self._proc is proc_ch:
                self._proc = None
            for out in self._outputs:
                if out.sink in stdio.values():
                    out.detach()

    async def _feed(self, ch: Channel) -> None:
        """stdin channel -> the process; a real EOF closes its stdin (types the EOF
        character on its terminal), a lost session does not (the next attachment goes
        on feeding it)."""
        fd = self._stdin
        assert fd is not None
        if fd == self._master:
            await fdio.pump_channel_to_terminal(ch, fd)
            return
        while data := await ch.read():
            with contextlib.suppress(OSError):
                await fdio.write_fd(fd, data)
        if not ch.closed:
            with contextlib.suppress(OSError):
                os.close(fd)
            self._stdin = None

    async def _serve_ops(self, proc_ch: Channel) -> None:
        """The host's resize/signal requests, until the channel ends; the exit event is
        sent (by _deliver_exit) to whoever is attached when the process is gone."""
        if self.exit_code is not None:
            await self._deliver_exit()
        while (msg := await proc_ch.recv_json()) is not None:
            if not isinstance(msg, dict):
                continue
            op = msg.get("op")
            try:
                if op == p.OP_RESIZE and self._master is not None:
                    procs.set_winsize(self._master, int(msg["rows"]), int(msg["cols"]))
                elif op == p.OP_SIGNAL and self.state is State.RUNNING:
                    os.kill(self.pid, int(msg["signal"]))
            except (KeyError, ValueError, TypeError, OSError) as exc:
                log.warning("container op %r refused: %s", op, exc)

    # -- while it runs ------------------------------------------------------------

    async def _watch_exit(self) -> None:
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(self.pid)
        gone: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            await gone
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        self.exit_code = await self._exit_code()
        self.state = State.EXITED
        self._exited.set()
        await self._deliver_exit()

    async def _exit_code(self) -> int:
        """The process has exited. Until conmon (its parent) reaps it, its status is in
        /proc/PID/stat (field 52), which saves waiting for conmon under emulation; else
        conmon's exit file, written right after reaping (podman's cleanup removes it
        about a second later: read at once); else ask podman."""
        status = zombie_status(self.pid)
        if status is not None:
            return status
        path = os.path.join(EXIT_DIR, self.container_id)
        for _ in range(250):  # up to 0.5 s
            try:
                with open(path) as f:
                    text = f.read().strip()
                if text:
                    return int(text)
            except (OSError, ValueError):
                pass
            await asyncio.sleep(0.002)
        _, text = await run_quiet(
            ["podman", "inspect", "--format", "{{.State.ExitCode}}", self.container_id],
            self.reaper,
        )
        try:
            return int(text.splitlines()[-1])
        except (IndexError, ValueError):
            log.warning("no exit code for the container: %s", text)
            return 125

    async def _deliver_exit(self) -> None:
        proc = self._proc
        if proc is None or self.exit_code is None:
            return  # the next attachment gets it
        # Output is complete when the pipes reach EOF (the container's other processes
        # died with its pid namespace; a pipe passed elsewhere may linger: bounded).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(o.done.wait() for o in self._outputs)), OUTPUT_DRAIN_SECONDS
            )
        with contextlib.suppress(SessionClosed, ConnectionError, OSError):
            await proc.send_json(procs.exit_event(self.exit_code))
            await proc.close()

    async def _watch_health(self, spec: ProcessSpec) -> None:
        """healthy: the process runs (the gate exec'd it) and, with a health check, the
        URL answers 2xx/3xx; unhealthy when the check does not pass in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.health_timeout
        url = spec.health_check
        detail = ""
        ok = True
        if url:
            while True:
                ok, detail = await loop.run_in_executor(None, probe_url, url)
                if ok or loop.time() >= deadline or self.exit_code is not None:
                    break
                await asyncio.sleep(HEALTH_POLL_SECONDS)
        status = "healthy" if ok else "unhealthy"
        self.health = {"event": p.EV_HEALTH, "status": status,
                       "detail": (url or "") if ok else f"{url}: {detail}"}  # fmt: skip
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(SessionClosed, ConnectionError, OSError):
                await proc.send_json(self.health)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def probe_url(url: str) -> tuple[bool, str]:
    """(passed, what was seen). Never raises: anything that goes wrong is a failed
    check (an answer that is not HTTP raised http.client's BadStatusLine, which ended
    the health watch and left the container 'starting' for good)."""
    import http.client
    import urllib.error
    import urllib.request

    try:
        # Straight to the container: a proxy from the environment must not answer for it.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=2) as resp:
            return 200 <= resp.status < 400, f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except urllib.error.URLError as exc:  # (its str() is "<urlopen error ...>")
        reason = exc.reason
        return False, reason.strerror or str(reason) if isinstance(reason, OSError) else str(reason)
    except http.client.HTTPException as exc:  # e.g. BadStatusLine
        return False, f"not an HTTP answer ({type(exc).__name__})"
    except Exception as exc:  # a URL urllib refuses, a reset...
        return False, f"{type(exc).__name__}: {exc}"


async def _send_error(ch: Channel, message: str, code: int) -> None:
    with contextlib.suppress(Exception):
        await ch.send_json({"event": p.EV_ERROR, "message": message, "code": code})
