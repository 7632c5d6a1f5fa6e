"""Guest assets (kernel, initrd, root filesystem): public API.

``resolve_assets()`` is what a VM start calls: it reads the manifest and re-hashes
the agent sources, nothing more (no subprocess). ``setup()`` builds whatever is
missing or stale; see cache.py for the content-addressing scheme.

User-supplied kernel/initrd: explicit arguments (the CLI's --kernel/--initrd) beat
$FCVM_KERNEL/$FCVM_INITRD, which beat ``kernel = "..."``/``initrd = "..."`` in the
TOML config file (paths.config_file()). A user kernel is used as-is for both
``vmlinux`` and ``bzimage`` (give an ELF vmlinux with a PVH note for Firecracker).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fcvm import paths
from fcvm.assets import cache
from fcvm.errors import FcvmError, NotSetUp, UsageError
from fcvm.fsutil import atomic_write

log = logging.getLogger("fcvm.assets")

Progress = Callable[[str, str], None]
"""progress(stage, message): stage is kernel|initrd|base|rootfs|done."""


@dataclass(frozen=True)
class GuestAssets:
    vmlinux: Path  # ELF with PVH entry (Firecracker, QEMU -kernel)
    bzimage: Path  # the same kernel as a bzImage
    initrd: Path  # uncompressed newc cpio
    rootfs: Path  # ext4 image, attach read-only as /dev/vda
    kernel_version: str  # uname -r (release), e.g. 6.1.0-56-cloud-amd64


def _noop(stage: str, message: str) -> None:
    pass


# --- user overrides -----------------------------------------------------------


def _config_values() -> tuple[Path | None, Path | None]:
    cfg = paths.config_file()
    if not cfg.is_file():
        return None, None
    import tomllib

    try:
        data = tomllib.loads(cfg.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read config {cfg}: {exc}") from exc
    out: list[Path | None] = []
    for key in ("kernel", "initrd"):
        val = data.get(key)
        if val is None or val == "":
            out.append(None)
        elif not isinstance(val, str):
            raise UsageError(f"config {cfg}: `{key}` must be a path string")
        else:
            p = Path(val).expanduser()
            out.append(p if p.is_absolute() else cfg.parent / p)
    return out[0], out[1]


def user_overrides(
    kernel: Path | None = None, initrd: Path | None = None
) -> tuple[Path | None, Path | None]:
    """The effective user kernel/initrd: argument, else env, else config file."""
    cfg_kernel, cfg_initrd = None, None
    if (kernel is None and not os.environ.get("FCVM_KERNEL")) or (
        initrd is None and not os.environ.get("FCVM_INITRD")
    ):
        cfg_kernel, cfg_initrd = _config_values()

    def pick(arg: Path | None, env: str, cfg: Path | None) -> Path | None:
        if arg is not None:
            return Path(arg).expanduser()
        val = os.environ.get(env)
        if val:
            return Path(val).expanduser()
        return cfg

    k = pick(kernel, "FCVM_KERNEL", cfg_kernel)
    i = pick(initrd, "FCVM_INITRD", cfg_initrd)
    for what, p in (("kernel", k), ("initrd", i)):
        if p is not None and not p.is_file():
            raise UsageError(f"{what} {p} does not exist")
    return k, i


def kernel_release_of(path: Path) -> str:
    """Best-effort `uname -r` of a kernel image (bzImage header or ELF banner)."""
    import mmap
    import struct

    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if len(mm) > 0x210 and mm[0x202:0x206] == b"HdrS":
                (ptr,) = struct.unpack_from("<H", mm, 0x20E)
                off = ptr + 0x200
                end = mm.find(b"\0", off, off + 256)
                if end > off:
                    return mm[off:end].decode(errors="replace").split()[0]
            pos = mm.find(b"Linux version ")
            if pos >= 0:
                return mm[pos + 14 : pos + 120].split(b" ", 1)[0].decode(errors="replace")
    except (OSError, ValueError):
        pass
    return ""


# --- resolve --------------------------------------------------------------------


def _stale_reason(m: cache.Manifest) -> str | None:
    adir = paths.assets_dir()
    if m.kernel is None or m.initrd is None or m.base is None or m.rootfs is None:
        return "no complete manifest"
    for name in (m.kernel.vmlinux, m.kernel.bzimage, m.initrd.file, m.rootfs.file):
        if not (adir / name).is_file():
            return f"{name} is missing"
    # The keys below are pure functions of fcvm's own files and the manifest: when
    # none of those changed since they last matched, they still do (this skips ~25 ms
    # of imports and hashing on every run).
    stamp, racy = _sources_stamp()
    checked = paths.base_dir() / "assets-checked"
    try:
        if checked.read_text() == stamp:
            return None
    except OSError:
        pass
    reason = _keys_stale_reason(m)
    if reason is None and not racy:
        with contextlib.suppress(OSError):  # (e.g. another user's read-only base dir)
            atomic_write(checked, stamp.encode())
    return reason


RACY_SECONDS = 2.0


def _sources_stamp() -> tuple[str, bool]:
    """(path, size, mtime) of every file of the fcvm package and of the manifest; and
    whether one changed too recently for its mtime to tell a later change apart (file
    times are coarse: such a stamp is not saved, as git does for racy index entries)."""
    package = cache.package_root()
    h = hashlib.sha256()
    newest = 0
    for root, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            newest = max(newest, st.st_mtime_ns)
            h.update(f"{root}/{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}\n".encode())
    st = os.stat(cache.manifest_path())
    newest = max(newest, st.st_mtime_ns)
    h.update(f"manifest:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode())
    return h.hexdigest(), time.time_ns() - newest < RACY_SECONDS * 1e9


def _keys_stale_reason(m: cache.Manifest) -> str | None:
    from fcvm.assets.initrd import initrd_key
    from fcvm.assets.rootfs import base_key, rootfs_key

    assert m.kernel is not None and m.initrd is not None and m.base is not None
    assert m.rootfs is not None
    if m.initrd.key != initrd_key(m.kernel.key, m.initrd.busybox_sha256):
        return "the initrd recipe changed"
    if m.base.key != base_key():
        return "the base package list changed"
    if m.rootfs.key != rootfs_key(m.base.key, m.kernel.key, cache.agent_hash()):
        return "the agent sources or rootfs recipe changed"
    return None


def resolve_assets(*, kernel: Path | None = None, initrd: Path | None = None) -> GuestAssets:
    """The current assets; NotSetUp when they are missing or stale. No subprocesses."""
    user_kernel, user_initrd = user_overrides(kernel, initrd)
    m = cache.load_manifest()
    reason = _stale_reason(m)
    if reason is not None:
        log.info("guest assets not usable: %s", reason)
        raise NotSetUp("guest assets are not set up", hint="run `fcvm setup`")
    assert m.kernel is not None and m.initrd is not None and m.rootfs is not None
    adir = paths.assets_dir()
    if user_kernel is not None:
        vmlinux = bzimage = user_kernel
        release = kernel_release_of(user_kernel)
    else:
        vmlinux, bzimage = adir / m.kernel.vmlinux, adir / m.kernel.bzimage
        release = m.kernel.release
    return GuestAssets(
        vmlinux=vmlinux,
        bzimage=bzimage,
        initrd=user_initrd if user_initrd is not None else adir / m.initrd.file,
        rootfs=adir / m.rootfs.file,
        kernel_version=release,
    )


def live_files() -> set[Path]:
    """Asset files the current manifest references (everything else may be pruned)."""
    m = cache.load_manifest()
    adir, dl = paths.assets_dir(), paths.download_cache_dir()
    out = {cache.manifest_path()}
    if m.kernel:
        out |= {adir / m.kernel.vmlinux, adir / m.kernel.bzimage}
        from fcvm.assets.kernel import tree_dir

        out.add(tree_dir(m.kernel.key))
    if m.initrd:
        out.add(adir / m.initrd.file)
    if m.base:
        out.add(dl / m.base.file)
    if m.rootfs:
        out.add(adir / m.rootfs.file)
    return out


PRUNE_KINDS = ("vmlinux-", "vmlinuz-", "initrd-", "rootfs-")
KEEP_SUPERSEDED = 2


def prune_superseded(keep: int = KEEP_SUPERSEDED) -> list[Path]:
    """Delete old asset files the manifest no longer references, keeping the newest
    ``keep`` of each kind (a VM that resolved them a moment ago may still be opening
    them; running VMs hold open files, and snapshots copy their disks). Call with the
    setup lock held."""
    adir = paths.assets_dir()
    live = live_files()
    removed: list[Path] = []
    for kind in PRUNE_KINDS:
        old = [p for p in adir.glob(f"{kind}*") if p.is_file() and p not in live]
        old.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for p in old[keep:]:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# --- setup ----------------------------------------------------------------------


def setup(
    *,
    force: bool = False,
    kernel: Path | None = None,
    initrd: Path | None = None,
    progress: Progress | None = None,
) -> GuestAssets:
    """Build what is missing or stale (everything with force=True); return the assets.

    A current manifest makes this a no-op: no apt, no mmdebstrap, only hashing.
    """
    from fcvm.assets import initrd as initrd_mod
    from fcvm.assets import kernel as kernel_mod
    from fcvm.assets import rootfs as rootfs_mod

    report = progress or _noop
    user_overrides(kernel, initrd)  # validate early
    adir, dl = paths.assets_dir(), paths.download_cache_dir()
    adir.mkdir(parents=True, exist_ok=True)
    dl.mkdir(parents=True, exist_ok=True)
    built: list[str] = []
    with cache.setup_lock():
        cache.remove_stale_temps([adir, dl])
        m = cache.load_manifest()

        # kernel
        k = m.kernel
        if (
            force
            or k is None
            or not (adir / k.vmlinux).is_file()
            or not (adir / k.bzimage).is_file()
        ):
            pkg = None
            if not force and k is not None:  # files lost: same package again
                pkg = kernel_mod.KernelPackage(k.package, k.version)
            if force:
                for name in (k.vmlinux, k.bzimage) if k else ():
                    (adir / name).unlink(missing_ok=True)
            k = kernel_mod.build(report, pkg)
            m.kernel = k
            cache.save_manifest(m)
            built.append("kernel")
        elif k.key != kernel_mod.kernel_key(kernel_mod.KernelPackage(k.package, k.version)):
            k = kernel_mod.build(report, kernel_mod.KernelPackage(k.package, k.version))
            m.kernel = k
            cache.save_manifest(m)
            built.append("kernel")

        # initrd
        bb_sha = cache.file_sha256(initrd_mod.BUSYBOX) if initrd_mod.BUSYBOX.is_file() else ""
        ikey = initrd_mod.initrd_key(k.key, bb_sha)
        i = m.initrd
        if force or i is None or i.key != ikey or not (adir / i.file).is_file():
            tree = kernel_mod.ensure_tree(k, report)
            if force:
                (adir / f"initrd-{ikey}.cpio").unlink(missing_ok=True)
            m.initrd = initrd_mod.build(k, tree, report)
            cache.save_manifest(m)
            built.append("initrd")

        # rootfs (base tarball only when the rootfs must be rebuilt)
        bkey = rootfs_mod.base_key()
        ahash = cache.agent_hash()
        rkey = rootfs_mod.rootfs_key(bkey, k.key, ahash)
        r = m.rootfs
        if force or r is None or r.key != rkey or not (adir / r.file).is_file():
            b = m.base
            if force or b is None or b.key != bkey or not (dl / b.file).is_file():
                if rootfs_mod.base_path(bkey).is_file() and not force:
                    b = cache.BaseRecord(key=bkey, file=rootfs_mod.base_path(bkey).name)
                else:
                    b = rootfs_mod.build_base(report)
                    built.append("base")
                m.base = b
                cache.save_manifest(m)
            tree = kernel_mod.ensure_tree(k, report)
            m.rootfs = rootfs_mod.build_rootfs(b, k, tree, ahash, report)
            cache.save_manifest(m)
            built.append("rootfs")
        elif m.base is None or m.base.key != bkey:
            m.base = cache.BaseRecord(key=bkey, file=rootfs_mod.base_path(bkey).name)
            cache.save_manifest(m)
        if built:
            for p in prune_superseded():
                log.info("removed superseded asset %s", p.name)

    report("done", f"built: {', '.join(built)}" if built else "guest assets are up to date")
    return resolve_assets(kernel=kernel, initrd=initrd)


__all__ = [
    "FcvmError",
    "GuestAssets",
    "NotSetUp",
    "live_files",
    "resolve_assets",
    "setup",
    "user_overrides",
]
