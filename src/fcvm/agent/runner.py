"""Runs one exec or guest-command request (a proc channel) to completion in the guest.

(The container's own process is agent/container.py's: it outlives sessions.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pty
import signal
import socket
import subprocess
from typing import Any

from fcvm.agent import procs
from fcvm.agent import protocol as p
from fcvm.agent.container import Container
from fcvm.agent.image import ProcError
from fcvm.agent.proc_view import resolve_user
from fcvm.agent.spec import ProcessSpec
from fcvm.session import Channel, fdio

log = logging.getLogger("fcvm.agent")

OUTPUT_DRAIN_SECONDS = 5.0


CRUN_ROOT = "/run/crun"  # where podman's crun keeps container state (rootful)


def crun_exec_argv(spec: ProcessSpec, container: Container, pidfile: str, log: str,
                   console: str | None = None) -> list[str]:  # fmt: skip
    """`crun exec` of spec in the container: a quarter of `podman exec`'s time under TCG
    (no podman process, no conmon); the container's own process settings (capabilities,
    namespaces, cgroup) are its base. crun's --env replaces the environment, so it gets
    the container's, then the run's, then the exec's own. With a console socket, crun
    makes the process a terminal in the container and sends its master there."""
    config = container.config
    env = dict(config.env)
    env.update(container.exec_env)
    env.update(spec.env)
    argv = ["crun", f"--root={CRUN_ROOT}", f"--log=file:{log}", "exec", f"--pid-file={pidfile}"]
    if console is not None:
        argv += ["--tty", f"--console-socket={console}"]
    cwd = spec.workdir or config.cwd  # (as podman exec: the container's, unless -w)
    if cwd:
        argv.append(f"--cwd={cwd}")
    user = resolve_user(container.pid, spec.user) if spec.user else config.user
    if user:
        argv.append(f"--user={user}")
    argv += [f"--env={k}={v}" for k, v in env.items()]
    return [*argv, container.container_id, *spec.argv]


def podman_argv(spec: ProcessSpec, extra_env: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """`podman exec` of spec in the container. extra_env (the run's own env, which the
    gate gave the container's process rather than podman) comes first: the exec's own
    --env wins."""
    argv = ["podman", "--log-level=error", "exec"]
    if spec.workdir:
        argv.append(f"--workdir={spec.workdir}")
    if spec.user:
        argv.append(f"--user={spec.user}")
    if spec.interactive:
        argv.append("--interactive")
    if spec.tty:
        argv.append("--tty")
    for key, value in (*extra_env, *spec.env):
        argv.append(f"--env={key}={value}")
    argv.append(p.CONTAINER_NAME)
    argv += spec.argv
    return argv


async def run_proc(
    proc_ch: Channel,
    stdio: dict[int, Channel],
    reaper: procs.Reaper,
    spec: ProcessSpec,
    container: Container | None = None,
) -> None:
    """Run an exec or vm-mode spec; events on proc_ch; the channels closed at the end.

    An exec goes through `crun exec` (its pid file tells the agent which process in the
    container to signal or kill; with a TTY, crun hands the terminal's master over a
    console socket). (`podman exec -t` left the command running when fcvm went away:
    killing podman does not reach it, and stdin's end never reached its terminal.)"""
    crun: tuple[str, str] | None = None
    console: str | None = None
    try:
        fast = container is not None and bool(container.container_id)
        if spec.mode == p.MODE_EXEC and fast:
            assert container is not None
            tag = os.urandom(6).hex()
            crun = (f"/run/fcvm-exec-{tag}.pid", f"/run/fcvm-exec-{tag}.log")
            console = f"/run/fcvm-exec-{tag}.tty" if spec.tty else None
            argv = crun_exec_argv(spec, container, *crun, console)
            env = None
        elif spec.mode == p.MODE_EXEC:
            argv = podman_argv(spec, container.exec_env if container else ())
            env = None
        else:
            argv = list(spec.argv)
            env = dict(os.environ)
            env.update(dict(spec.env))
        await _execute(proc_ch, stdio, reaper, spec, argv, env, crun, console)
    except ProcError as exc:
        await send_error(proc_ch, str(exc), exc.code)
    except Exception as exc:  # never let one request take the agent down
        log.exception("request failed")
        await send_error(proc_ch, f"agent: {exc}", 125)
    finally:
        for ch in stdio.values():
            with contextlib.suppress(Exception):
                await ch.close()
        with contextlib.suppress(Exception):
            await proc_ch.close()
        for path in (*(crun or ()), *([console] if console else [])):
            with contextlib.suppress(OSError):
                os.unlink(path)


async def send_error(proc_ch: Channel, message: str, code: int) -> None:
    with contextlib.suppress(Exception):
        await proc_ch.send_json({"event": p.EV_ERROR, "message": message, "code": code})


async def _execute(
    proc_ch: Channel,
    stdio: dict[int, Channel],
    reaper: procs.Reaper,
    spec: ProcessSpec,
    argv: list[str],
    env: dict[str, str] | None,
    crun: tuple[str, str] | None = None,
    console: str | None = None,
) -> None:
    cwd = spec.workdir if spec.mode == p.MODE_VM else None
    master = None
    listener = None
    try:
        if console is not None:  # crun makes the terminal and sends us its master
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(console)
            listener.listen(1)
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    close_fds=True, start_new_session=True)  # fmt: skip
        elif spec.tty:
            master, slave = pty.openpty()
            procs.set_winsize(slave, spec.rows, spec.cols)
            proc = procs.spawn(argv, env=env, cwd=cwd, tty_fd=slave)
            os.close(slave)
        else:
            stdin = subprocess.PIPE if 0 in stdio else subprocess.DEVNULL
            proc = procs.spawn(argv, env=env, cwd=cwd, stdin=stdin)
    except FileNotFoundError:
        raise ProcError(f"{argv[0]}: command not found", 127) from None
    except PermissionError:
        raise ProcError(f"{argv[0]}: permission denied", 126) from None
    except OSError as exc:
        raise ProcError(f"{argv[0]}: {exc.strerror}", 126) from None
    done = reaper.watch(proc)
    if listener is not None:
        assert crun is not None
        try:
            master = await _console_master(listener, done, crun[1])
        except BaseException:
            proc.kill()
            raise
        procs.set_winsize(master, spec.rows, spec.cols)
    await proc_ch.send_json({"event": p.EV_STARTED, "pid": proc.pid})

    # The agent owns these descriptors: non-blocking, so a child that stops reading
    # its stdin never stalls the agent (fdio waits for room instead).
    readers: list[asyncio.Task[None]] = []  # process output -> host
    writers: list[asyncio.Task[None]] = []  # host input -> process

    held: _HeldStderr | None = None

    def output(fd: int, ch: Channel) -> None:
        os.set_blocking(fd, False)
        readers.append(asyncio.create_task(fdio.pump_fd_to_channel(fd, ch, close_fd=True)))

    def crun_stderr(fd: int, ch: Channel, pidfile: str) -> None:
        nonlocal held
        os.set_blocking(fd, False)
        held = _HeldStderr(fd, ch, pidfile)
        readers.append(asyncio.create_task(held.pump()))

    def input_(ch: Channel, fd: int, *, close_fd: bool) -> None:
        os.set_blocking(fd, False)
        writers.append(asyncio.create_task(fdio.pump_channel_to_fd(ch, fd, close_fd=close_fd)))

    if master is not None:
        if crun is not None:  # (crun's complaint, when it cannot start it, comes here too)
            crun_stderr(os.dup(master), stdio[0], crun[0])
        else:
            output(os.dup(master), stdio[0])
        os.set_blocking(master, False)  # (closed below, after the output)
        writers.append(asyncio.create_task(fdio.pump_channel_to_terminal(stdio[0], master)))
    else:
        for fd, pipe in ((1, proc.stdout), (2, proc.stderr)):
            assert pipe is not None
            raw = os.dup(pipe.fileno())
            pipe.close()
            if fd not in stdio:
                os.close(raw)
            elif fd == 2 and crun is not None:
                crun_stderr(raw, stdio[fd], crun[0])
            else:
                output(raw, stdio[fd])
        if proc.stdin is not None:
            raw = os.dup(proc.stdin.fileno())
            proc.stdin.close()
            input_(stdio[0], raw, close_fd=True)
    target = _Target(proc, crun[0] if crun else None)
    control = asyncio.create_task(_host_ops(proc_ch, target, master))

    code = await done
    proc.returncode = code
    if crun is not None and code == CRUN_FAILED:
        failure = _crun_failure(crun[1])
        if failure is not None:  # crun could not start it: podman's codes and words
            if readers:  # (crun's own copy of the reason, held back, is dropped)
                await asyncio.wait(readers, timeout=OUTPUT_DRAIN_SECONDS)
            for task in (*readers, *writers, control):
                task.cancel()
            if held is not None:
                await held.finish(send=False)
            raise failure
    # Output is complete when the pipes close; a daemon the process left behind may
    # hold them open, so give that a bounded time only.
    if readers:
        await asyncio.wait(readers, timeout=OUTPUT_DRAIN_SECONDS)
    for task in (*readers, *writers, control):
        task.cancel()
    if held is not None:
        await held.finish(send=True)
    if master is not None:
        with contextlib.suppress(OSError):
            os.close(master)
    await proc_ch.send_json(procs.exit_event(code))


CRUN_FAILED = 255
CONSOLE_TIMEOUT_S = 60.0


async def _console_master(listener: socket.socket, done: asyncio.Future[int], log_path: str
                          ) -> int:  # fmt: skip
    """The terminal master crun sends over its console socket; ProcError if crun ends
    (it could not start the command) or never sends it."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    try:
        accepting = asyncio.ensure_future(loop.sock_accept(listener))
        either: set[asyncio.Future[Any]] = {accepting, done}
        finished, _ = await asyncio.wait(either, timeout=CONSOLE_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if accepting not in finished:
            accepting.cancel()
            raise _crun_failure(log_path) or ProcError("crun sent no terminal", 125)
        conn, _ = accepting.result()
        with conn:
            conn.setblocking(True)
            _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        if not fds:
            raise ProcError("crun sent no terminal", 125)
        return fds[0]
    finally:
        listener.close()


class _HeldStderr:
    """The stderr of a `crun exec`. When crun cannot start the command it says why on
    this stream as well as in its log, and fcvm reports the log's line (one line, as
    for every failure of ours): so until crun has written its pid file (it does only
    once the command runs) what arrives is held back, then sent; if crun fails, it is
    dropped. Held output is looked at again every 10 ms, so a command's early message
    is not kept waiting for its next one."""

    RECHECK_S = 0.01

    def __init__(self, fd: int, ch: Channel, pidfile: str) -> None:
        self.fd, self.ch, self.pidfile = fd, ch, pidfile
        self.held = bytearray()
        self.started = False

    async def pump(self) -> None:
        reading: asyncio.Future[bytes] | None = None
        try:
            while True:
                if reading is None:
                    reading = asyncio.ensure_future(fdio.read_fd(self.fd))
                waiting = self.held and not self.started
                done, _ = await asyncio.wait({reading}, timeout=self.RECHECK_S if waiting else None)
                if not self.started and os.path.exists(self.pidfile):
                    self.started = True
                    if self.held:
                        await self.ch.write(bytes(self.held))
                        self.held.clear()
                if reading not in done:
                    continue
                data, reading = reading.result(), None
                if not data:
                    return
                if self.started:
                    await self.ch.write(data)
                else:
                    self.held += data
        except (ConnectionError, OSError):
            pass  # the session or the channel is gone
        finally:
            if reading is not None:
                reading.cancel()
            with contextlib.suppress(OSError):
                os.close(self.fd)

    async def finish(self, *, send: bool) -> None:
        """After pump: what is still held (sent, or dropped), then the stream's EOF."""
        with contextlib.suppress(Exception):
            if send and self.held:
                await self.ch.write(bytes(self.held))
            await self.ch.write_eof()


def _crun_failure(log_path: str) -> ProcError | None:
    """crun's own error (its --log file), as podman reports it: 127 not found, else 126."""
    try:
        with open(log_path) as f:
            text = f.read()
    except OSError:
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1]
    try:
        import json as _json

        last = str(_json.loads(last).get("msg", last))
    except (ValueError, AttributeError):
        pass
    code = 127 if ("not found" in last or "No such file" in last) else 126
    return ProcError(last, code)


class _Target:
    """What a host's signal or a kill reaches: the process the agent started, and with
    `crun exec` also the process in the container (its pid file): killing crun alone
    would leave the command running."""

    def __init__(self, proc: subprocess.Popen[bytes], pidfile: str | None) -> None:
        self.proc = proc
        self.pidfile = pidfile

    def signal(self, signum: int) -> None:
        if self.pidfile is not None:
            with contextlib.suppress(OSError, ValueError), open(self.pidfile) as f:
                pid = int(f.read().strip())
                # The command's whole process group when crun made it a session of its
                # own (the group of the session's leader: crun's child, which a shell's
                # `exec` may have replaced): a shell's children go with it, as a
                # terminal's hangup takes them. Never another group (the container's
                # main process's, say): then the command alone.
                pgid = os.getpgid(pid)
                if os.getsid(pid) == pgid and pgid not in (os.getpgrp(), 0, 1):
                    os.killpg(pgid, signum)
                else:
                    os.kill(pid, signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)


async def _host_ops(proc_ch: Channel, target: _Target, master: int | None) -> None:
    proc = target.proc
    while True:
        msg = await proc_ch.recv_json()
        if msg is None:
            # The host went away (fcvm exec interrupted): like a terminal hangup,
            # the command does not outlive the one who started it.
            if proc.returncode is None:
                target.signal(signal.SIGKILL)
            return
        if not isinstance(msg, dict):
            continue
        op = msg.get("op")
        try:
            if op == p.OP_RESIZE and master is not None:
                procs.set_winsize(master, int(msg["rows"]), int(msg["cols"]))
            elif op == p.OP_SIGNAL:
                target.signal(int(msg["signal"]))
        except (KeyError, ValueError, TypeError, OSError) as exc:
            log.warning("process op %r refused: %s", op, exc)
