"""Making the container image available to the guest's podman (before `podman run`).

From a prebuilt image store disk (mounted read-only as an additional image store: no
load at all), from an archive disk (`podman load`), or pulled from a registry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable

from fcvm.agent import procs
from fcvm.agent import protocol as p
from fcvm.agent.spec import ImageSource

log = logging.getLogger("fcvm.agent")

Phase = Callable[[str, str], Awaitable[None]]


class ProcError(Exception):
    """A request the agent cannot carry out; code is podman's (125/126/127)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


async def run_quiet(
    argv: list[str], reaper: procs.Reaper, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run a helper command to completion; returns (exit code, stderr+stdout text)."""
    proc = procs.spawn(argv, env=env)
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


async def prepare_image(
    image: ImageSource, reaper: procs.Reaper, phase: Phase, proxy_env: dict[str, str]
) -> str:
    """Make the container image available in the guest's podman; returns its reference.
    proxy_env is the host's proxies, for a pull (nothing else sees them)."""
    device = image.device
    ref = image.ref
    if image.store is not None:
        await phase("image-store", "")
        why = mount_store(image.store, image.ref)
        if why is None:
            await phase("image-loaded", "")
            return image.ref
        if device is None:
            raise ProcError(f"image store {image.store} unusable: {why}", 125)
        log.warning("image store %s unusable (%s): loading the archive", image.store, why)
        await phase("image-store-unusable", why)
        ref = ""  # the store's image ID; the archive's name is what podman load reports
    if device is not None:
        await phase("image-load", "")
        code, text = await run_quiet(["podman", "load", "-q", "-i", device], reaper)
        if code != 0:
            raise ProcError(f"podman load failed: {text}", 125)
        # "Loaded image: REF" or "Loaded image(s): REF[,REF]"
        loaded = text.splitlines()[-1].split(": ", 1)[-1].split(",")[0].strip()
        await phase("image-loaded", "")
        return ref or loaded
    ref = str(image.pull)
    await phase("image-pull", "")
    env = {**os.environ, **proxy_env}
    code, text = await run_quiet(["podman", "pull", "-q", ref], reaper, env)
    if code != 0:
        last = text.splitlines()[-1] if text else f"podman pull exited {code}"
        raise ProcError(f"cannot pull {ref} in the guest: {last}", 125)
    await phase("image-loaded", "")
    return ref
