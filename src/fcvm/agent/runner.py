"""Runs one process request (a proc channel) to completion in the guest."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pty
import signal
import subprocess
from typing import Any

from fcvm.agent import procs
from fcvm.agent import protocol as p
from fcvm.agent.spec import ImageSource, ProcessSpec, SpecError
from fcvm.session import Channel, fdio

log = logging.getLogger("fcvm.agent")

OUTPUT_DRAIN_SECONDS = 5.0
HEALTH_POLL_SECONDS = 0.05  # (a stat: cheap enough to poll often)


class ProcError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def podman_argv(spec: ProcessSpec, image: str | None = None) -> list[str]:
    """The podman command for a container run or an exec into the container."""
    argv = ["podman", "--log-level=error"]
    if spec.mode == p.MODE_CONTAINER:
        # No --rm: the whole VM is thrown away after the run, and removing the
        # container first only delays the exit code. The image is already local.
        argv += ["run", "--pull=never", "--network=host", f"--name={p.CONTAINER_NAME}"]
        if spec.privileged:
            argv.append("--privileged")
    else:
        argv += ["exec"]
    if spec.workdir:
        argv.append(f"--workdir={spec.workdir}")
    if spec.user:
        argv.append(f"--user={spec.user}")
    if spec.interactive:
        argv.append("--interactive")
    if spec.tty:
        argv.append("--tty")
    for key, value in spec.env:
        argv.append(f"--env={key}={value}")
    if spec.mode == p.MODE_CONTAINER:
        assert image is not None
        argv.append(image)
    else:
        argv.append(p.CONTAINER_NAME)
    argv += spec.argv
    return argv


async def _run_quiet(argv: list[str], reaper: procs.Reaper) -> tuple[int, str]:
    """Run a helper command to completion; returns (exit code, stderr+stdout text)."""
    proc = procs.spawn(argv)
    done = reaper.watch(proc)
    assert proc.stdout is not None and proc.stderr is not None
    loop = asyncio.get_running_loop()
    out, err = await asyncio.gather(
        loop.run_in_executor(None, proc.stdout.read), loop.run_in_executor(None, proc.stderr.read)
    )
    code = await done
    proc.returncode = code
    return code, (err + out).decode(errors="replace").strip()


_MS_RDONLY = 1
_MNT_DETACH = 2


def mount_store(device: str, image_id: str, target: str = p.IMAGE_STORE_DIR) -> str | None:
    """Mount an image store read-only; None if it holds `image_id`, else why not."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as exc:
        return f"{target}: {exc.strerror}"
    if libc.mount(device.encode(), target.encode(), b"ext4", _MS_RDONLY, b"") != 0:
        return f"mount {device}: {os.strerror(ctypes.get_errno())}"
    try:
        with open(os.path.join(target, "overlay-images", "images.json")) as f:
            images = json.load(f)
        if any(isinstance(i, dict) and i.get("id") == image_id for i in images):
            return None
        why = f"image {image_id[:12]} is not in it"
    except (OSError, ValueError, TypeError) as exc:
        why = f"unreadable: {exc}"
    libc.umount2(target.encode(), _MNT_DETACH)
    return why


async def prepare_image(image: ImageSource, reaper: procs.Reaper, phase: Any) -> str:
    """Make the container image available in the guest's podman; returns its reference."""
    device = image.device
    ref = image.ref
    if image.store is not None:
        await phase("image-store")
        why = mount_store(image.store, image.ref)
        if why is None:
            await phase("image-loaded")
            return image.ref
        if device is None:
            raise ProcError(f"image store {image.store} unusable: {why}", 125)
        log.warning("image store %s unusable (%s): loading the archive", image.store, why)
        await phase("image-store-unusable", why)
        ref = ""  # the store's image ID; the archive's name is what podman load reports
    if device is not None:
        await phase("image-load")
        code, text = await _run_quiet(["podman", "load", "-q", "-i", device], reaper)
        if code != 0:
            raise ProcError(f"podman load failed: {text}", 125)
        # "Loaded image: REF" or "Loaded image(s): REF[,REF]"
        loaded = text.splitlines()[-1].split(": ", 1)[-1].split(",")[0].strip()
        await phase("image-loaded")
        return ref or loaded
    ref = str(image.pull)
    await phase("image-pull")
    code, text = await _run_quiet(["podman", "pull", "-q", ref], reaper)
    if code != 0:
        last = text.splitlines()[-1] if text else f"podman pull exited {code}"
        raise ProcError(f"cannot pull {ref} in the guest: {last}", 125)
    await phase("image-loaded")
    return ref


async def run_proc(proc_ch: Channel, stdio: dict[int, Channel], reaper: procs.Reaper) -> None:
    async def phase(name: str, detail: str = "") -> None:
        event = {"event": p.EV_PHASE, "name": name}
        if detail:
            event["detail"] = detail
        await proc_ch.send_json(event)

    try:
        try:
            spec = ProcessSpec.from_json(proc_ch.meta.get("spec"))
        except SpecError as exc:
            raise ProcError(f"malformed process spec: {exc}", 125) from None
        if spec.mode == p.MODE_CONTAINER:
            assert spec.image is not None
            # Proxies from the host: podman uses them for pulls and passes them on
            # to the container (its --http-proxy default).
            os.environ.update(dict(spec.proxy_env))
            image = await prepare_image(spec.image, reaper, phase)
            argv = podman_argv(spec, image)
            env = None
        elif spec.mode == p.MODE_EXEC:
            argv = podman_argv(spec)
            env = None
        else:
            argv = list(spec.argv)
            env = dict(os.environ)
            env.update(dict(spec.env))
        await _execute(proc_ch, stdio, reaper, spec, argv, env)
    except ProcError as exc:
        await _send_error(proc_ch, str(exc), exc.code)
    except Exception as exc:  # never let one request take the agent down
        log.exception("request failed")
        await _send_error(proc_ch, f"agent: {exc}", 125)
    finally:
        for ch in stdio.values():
            with contextlib.suppress(Exception):
                await ch.close()
        with contextlib.suppress(Exception):
            await proc_ch.close()


async def _send_error(proc_ch: Channel, message: str, code: int) -> None:
    with contextlib.suppress(Exception):
        await proc_ch.send_json({"event": p.EV_ERROR, "message": message, "code": code})


async def _execute(
    proc_ch: Channel,
    stdio: dict[int, Channel],
    reaper: procs.Reaper,
    spec: ProcessSpec,
    argv: list[str],
    env: dict[str, str] | None,
) -> None:
    cwd = spec.workdir if spec.mode == p.MODE_VM else None
    master = None
    try:
        if spec.tty:
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
    await proc_ch.send_json({"event": p.EV_STARTED, "pid": proc.pid})
    health = None
    if spec.mode == p.MODE_CONTAINER:
        health = asyncio.create_task(_report_health(proc_ch, spec))

    # The agent owns these descriptors: non-blocking, so a child that stops reading
    # its stdin never stalls the agent (fdio waits for room instead).
    readers: list[asyncio.Task[None]] = []  # process output -> host
    writers: list[asyncio.Task[None]] = []  # host input -> process

    def output(fd: int, ch: Channel) -> None:
        os.set_blocking(fd, False)
        readers.append(asyncio.create_task(fdio.pump_fd_to_channel(fd, ch, close_fd=True)))

    def input_(ch: Channel, fd: int, *, close_fd: bool) -> None:
        os.set_blocking(fd, False)
        writers.append(asyncio.create_task(fdio.pump_channel_to_fd(ch, fd, close_fd=close_fd)))

    if master is not None:
        output(os.dup(master), stdio[0])
        input_(stdio[0], master, close_fd=False)  # closed below, after the output
    else:
        for fd, pipe in ((1, proc.stdout), (2, proc.stderr)):
            assert pipe is not None
            raw = os.dup(pipe.fileno())
            pipe.close()
            if fd in stdio:
                output(raw, stdio[fd])
            else:
                os.close(raw)
        if proc.stdin is not None:
            raw = os.dup(proc.stdin.fileno())
            proc.stdin.close()
            input_(stdio[0], raw, close_fd=True)
    control = asyncio.create_task(_host_ops(proc_ch, proc, master))

    code = await done
    proc.returncode = code
    # Output is complete when the pipes close; a daemon the process left behind may
    # hold them open, so give that a bounded time only.
    if readers:
        await asyncio.wait(readers, timeout=OUTPUT_DRAIN_SECONDS)
    for task in (*readers, *writers, control, *([health] if health else [])):
        task.cancel()
    if master is not None:
        with contextlib.suppress(OSError):
            os.close(master)
    await proc_ch.send_json(procs.exit_event(code))


def _container_started() -> bool:
    """The runtime has started the container's process: the rootfs's poststart hook
    touched CONTAINER_STARTED_FILE. (It may have exited since; then the run is ending
    and this poll with it.) Asking `podman container inspect` instead costs a podman
    process per poll, which under TCG slowed the `podman run` it watched by ~1 s (1.5 ->
    2.4 s for `true` in a warm guest); a pid file would be too early (written at create,
    before start, when `podman exec` still fails)."""
    return os.path.exists(p.CONTAINER_STARTED_FILE)


def _probe_url(url: str) -> tuple[bool, str]:
    import urllib.error
    import urllib.request

    try:
        # Straight to the container: a proxy from the environment must not answer for it.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=2) as resp:
            return 200 <= resp.status < 400, f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return False, str(exc)


async def _report_health(proc_ch: Channel, spec: ProcessSpec) -> None:
    """healthy: the container runs and, with a health check, its URL answers 2xx/3xx."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + spec.health_timeout
    url = spec.health_check
    detail = "container not running"
    while loop.time() < deadline:
        if _container_started():
            break
        await asyncio.sleep(HEALTH_POLL_SECONDS)
    else:
        await proc_ch.send_json({"event": p.EV_HEALTH, "status": "unhealthy", "detail": detail})
        return
    if url:
        while True:
            ok, detail = await loop.run_in_executor(None, _probe_url, url)
            if ok or loop.time() >= deadline:
                break
            await asyncio.sleep(0.5)
        if not ok:
            await proc_ch.send_json(
                {"event": p.EV_HEALTH, "status": "unhealthy", "detail": f"{url}: {detail}"}
            )
            return
    await proc_ch.send_json({"event": p.EV_HEALTH, "status": "healthy", "detail": url or ""})


async def _host_ops(proc_ch: Channel, proc: subprocess.Popen[bytes], master: int | None) -> None:
    while True:
        msg = await proc_ch.recv_json()
        if msg is None:
            # The host went away (fcvm exec interrupted): like a terminal hangup,
            # the command does not outlive the one who started it.
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            return
        op = msg.get("op")
        if op == p.OP_RESIZE and master is not None:
            procs.set_winsize(master, int(msg["rows"]), int(msg["cols"]))
        elif op == p.OP_SIGNAL:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, int(msg["signal"]))
