"""Container image sources on the host, and how each reaches the guest.

There is no registry here, so an image reaches the guest on read-only virtio disks:

- an image in the host's podman storage is exported once per image ID to
  BASE/images/<id>.oci.tar and reused;
- `oci-archive:PATH` / `docker-archive:PATH` are used as they are;
- a fully qualified registry reference not in host storage is pulled by podman in
  the guest, which needs the guest to have network.

For the first two, fcvm also builds an *image store* once per image (see
`image_store`): the archive loaded into a private containers-storage on the host
and packed into a read-only ext4 (BASE/images/<key>.store.ext4 + .store.json). The
guest mounts it as an additional image store and runs the image by ID, with no
`podman load`. The archive is attached as well and loaded only if the store turns
out unusable in the guest; when the store cannot be built, the archive alone is
attached (the reason is logged at info level).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcvm import children, log, paths
from fcvm.assets import ext4
from fcvm.errors import FcvmError, ImageError
from fcvm.fsutil import atomic_write
from fcvm.plan import ImageSpec

logger = log.get("images")

STORE_VERSION = 1  # bump when the store layout changes: older stores are rebuilt
STORE_SUFFIX = ".store.ext4"
META_SUFFIX = ".store.json"
STORE_LABEL = "fcvm-images"
BUILD_PREFIX = ".build-"
RUNROOT_PREFIX = "fcvm-st-"  # podman's runroot for a store build, in /tmp: fcvm-st-PID-*
# What a run that was killed while exporting or packing an image leaves, its pid in the
# name: an export's temp file, a build's directory, a packed store's temp file.
_LEFT_BY_PID = re.compile(
    r".+\.oci\.tmp(?P<a>\d+)|\.build-.+-(?P<b>\d+)|\.build-.+\.store\.ext4\.(?P<c>\d+)"
)
_RUNROOT = re.compile(rf"{RUNROOT_PREFIX}(?P<pid>\d+)-.+")
# Where the guest mounts the store; podman's storage.conf lists it as an
# additionalimagestores entry (assets/rootfs.py).


@dataclass(frozen=True)
class ImageStore:
    """A read-only ext4 holding a containers-storage with exactly one image."""

    path: Path
    image_id: str  # full hex image ID: what the guest runs
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageConfig:
    """What the image runs by default (podman's rule: entrypoint + (command or cmd))."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()


@dataclass(frozen=True)
class GuestImage:
    archive: Path | None  # attached read-only as the image disk, or None to pull
    ref: str  # what to run (the name podman load reports wins when it has one)
    pull: str | None = None
    store: ImageStore | None = None  # preferred over the archive when present
    config: ImageConfig | None = None  # None: not known here (a pull: the guest asks podman)


class StoreBuildError(Exception):
    """The image store could not be built (the archive is used instead)."""


def images_dir() -> Path:
    return paths.base_dir() / "images"


def _podman() -> str:
    path = shutil.which("podman")
    if path is None:
        raise ImageError("podman is not installed on the host", hint="apt-get install podman")
    return path


def _looks_like_registry_ref(ref: str) -> bool:
    first = ref.split("/", 1)[0]
    return "/" in ref and ("." in first or ":" in first) and first != "localhost"


def _strings(value: object) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _config_of(config: object) -> ImageConfig:
    """An image's Entrypoint and Cmd, from its config (OCI "config" or podman's Config)."""
    if not isinstance(config, dict):
        return ImageConfig()
    return ImageConfig(_strings(config.get("Entrypoint")), _strings(config.get("Cmd")))


def _storage_marker() -> list[int] | None:
    """The identity of the host storage's image list (podman rewrites it whenever an
    image or a tag changes), or None where it cannot be found."""
    candidates = []
    for conf in (os.environ.get("CONTAINERS_STORAGE_CONF"), "/etc/containers/storage.conf"):
        if conf:
            with contextlib.suppress(OSError, ValueError):
                import tomllib

                with open(conf, "rb") as f:
                    root = tomllib.load(f).get("storage", {}).get("graphroot")
                if isinstance(root, str):
                    candidates.append(Path(root))
                    break
    if os.geteuid() == 0:
        candidates.append(Path("/var/lib/containers/storage"))
    else:
        candidates.append(Path.home() / ".local/share/containers/storage")
    for root in candidates:
        for driver in ("overlay", "vfs"):
            with contextlib.suppress(OSError):
                st = (root / f"{driver}-images" / "images.json").stat()
                return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
    return None


def host_image(ref: str) -> tuple[str, ImageConfig] | None:
    """(image ID, config) of ref in the host's podman storage, or None.

    Asking podman costs ~40 ms, on the path of every cached run: answers are kept in
    BASE/images/host-refs.json for as long as the storage's image list is unchanged."""
    marker = _storage_marker()
    known_path = images_dir() / "host-refs.json"
    known: dict[str, Any] = {}
    if marker is not None:
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(known_path.read_text())
            if isinstance(loaded, dict) and loaded.get("marker") == marker:
                known = loaded
        hit = known.get("refs", {}).get(ref)
        if isinstance(hit, dict) and isinstance(hit.get("id"), str):
            return hit["id"], _config_of(hit.get("config"))
    found = _inspect_host_image(ref)
    if found is not None and marker is not None:
        refs = dict(known.get("refs", {}))
        refs[ref] = {"id": found[0], "config": {"Entrypoint": list(found[1].entrypoint),
                                                 "Cmd": list(found[1].cmd)}}  # fmt: skip
        with contextlib.suppress(OSError):
            atomic_write(known_path, json.dumps({"marker": marker, "refs": refs}))
    return found


def _inspect_host_image(ref: str) -> tuple[str, ImageConfig] | None:
    proc = subprocess.run(
        [_podman(), "image", "inspect", "--format", "{{.Id}}\t{{json .Config}}", ref],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return None
    image_id, _, config = proc.stdout.strip().splitlines()[0].partition("\t")
    try:
        return image_id, _config_of(json.loads(config))
    except ValueError:
        return image_id, ImageConfig()


def archive_config(kind: str, path: Path) -> ImageConfig:
    """The image config in an OCI or docker archive (ImageConfig() if unreadable)."""
    import tarfile  # (imported where used: every run's start pays for a module import)

    try:
        with tarfile.open(path) as tar:

            def member(name: str) -> Any:
                f = tar.extractfile(name.removeprefix("./"))
                return json.load(f) if f else None

            if kind == "docker-archive":
                config = member(member("manifest.json")[0]["Config"])
            else:
                index = member("index.json")
                manifest = member("blobs/" + index["manifests"][0]["digest"].replace(":", "/"))
                config = member("blobs/" + manifest["config"]["digest"].replace(":", "/"))
    except (OSError, KeyError, IndexError, TypeError, ValueError, tarfile.TarError):
        return ImageConfig()
    return _config_of(config.get("config") if isinstance(config, dict) else None)


def export_host_image(ref: str, image_id: str) -> Path:
    """podman save, once per image ID (atomically, so a concurrent run never sees half)."""
    out = images_dir() / f"{image_id[:32]}.oci.tar"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:  # (stopped with the run: children.py)
        proc = children.run([_podman(), "save", "--format", "oci-archive", "-o", str(tmp), ref],
                          capture_output=True, text=True)  # fmt: skip
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ImageError(f"cannot export {ref} from host storage: {proc.stderr.strip()}")
    os.replace(tmp, out)
    return out


def _check_archive(kind: str, path: Path) -> None:
    import tarfile

    if not path.exists():
        raise ImageError(f"{kind} not found: {path}")
    if not path.is_file():
        raise ImageError(f"{kind} is not a file: {path}")
    wanted = "index.json" if kind == "oci-archive" else "manifest.json"
    a_kind = f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
    try:
        with tarfile.open(path) as tar:  # reads headers only, seeking over contents
            names = {member.name.removeprefix("./"): member for member in tar}
            if wanted not in names:
                raise ImageError(f"{path} is not {a_kind} (no {wanted} in it)")
            # (the guest's podman load would say so in five lines, after a boot)
            f = tar.extractfile(names[wanted])
            top = json.load(f) if f is not None else None
    except (OSError, tarfile.TarError):
        raise ImageError(f"{kind} {path} is not a readable tar archive") from None
    except ValueError as exc:
        raise ImageError(f"{path} is not {a_kind} ({wanted} is not JSON: {exc})") from None
    if not isinstance(top, dict if kind == "oci-archive" else list):
        raise ImageError(f"{path} is not {a_kind} ({wanted} is not an image index)")


def archive_ref(kind: str, path: Path) -> str:
    """The image name recorded in an archive, if any (for listings)."""
    import tarfile

    try:
        with tarfile.open(path) as tar:
            if kind == "docker-archive":
                f = tar.extractfile("manifest.json")
                tags = json.load(f)[0].get("RepoTags") or [] if f else []
                return str(tags[0]) if tags else path.name
            f = tar.extractfile("index.json")
            index = json.load(f) if f else {}
            ann = (index.get("manifests") or [{}])[0].get("annotations", {})
            return str(ann.get("org.opencontainers.image.ref.name") or path.name)
    except (OSError, KeyError, ValueError, tarfile.TarError):
        return path.name


# --- image stores -------------------------------------------------------------------


def archive_store_key(path: Path) -> str:
    """Store key of an archive file: its identity (real path, size, mtime, inode).

    A rewritten or replaced archive gets a new key, so a stale store is never used.
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    ident = f"{STORE_VERSION}\0{real}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_dev}\0{st.st_ino}"
    return "a-" + hashlib.sha256(ident.encode()).hexdigest()[:32]


def host_store_key(image_id: str) -> str:
    """Store key of a host-storage image: its image ID (content-addressed already)."""
    return f"i-{STORE_VERSION}-{image_id[:32]}"


def store_paths(key: str) -> tuple[Path, Path]:
    """(ext4 image, metadata) of a store key."""
    d = images_dir()
    return d / f"{key}{STORE_SUFFIX}", d / f"{key}{META_SUFFIX}"


def cached_store(key: str) -> ImageStore | None:
    """The store built for `key`, if its metadata and ext4 image still agree."""
    ext4, meta_path = store_paths(key)
    try:
        meta = json.loads(meta_path.read_text())
        st = ext4.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != STORE_VERSION:
        return None
    if meta.get("key") != key or not isinstance(meta.get("image_id"), str):
        return None
    if meta.get("size") != st.st_size or meta.get("mtime_ns") != st.st_mtime_ns:
        return None  # rewritten or truncated behind our back: build it again
    return ImageStore(ext4, meta["image_id"], tuple(meta.get("names") or ()))


@contextlib.contextmanager
def _key_lock(key: str) -> Iterator[None]:
    images_dir().mkdir(parents=True, exist_ok=True)
    fd = os.open(images_dir() / f".{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _store_switched_off() -> bool:
    return os.environ.get("FCVM_IMAGE_STORE", "").lower() in ("0", "off", "no", "false")


def store_disabled_reason() -> str | None:
    """Why no store can be built here, or None."""
    if os.geteuid() != 0:
        return "building one needs root (file ownership in the store)"
    for tool in ("podman", "mkfs.ext4"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def image_store(key: str, archive: Path, source: str) -> ImageStore | None:
    """The store for `key` (built from `archive` on first use), or None to load the archive.

    Never raises for a store problem: the archive path still works without one.
    """
    if _store_switched_off():
        logger.info("no image store for %s: FCVM_IMAGE_STORE is off", source)
        return None
    store = cached_store(key)
    if store is not None:
        return store
    why = store_disabled_reason()
    if why is not None:
        logger.info("no image store for %s: %s; the guest loads the archive", source, why)
        return None
    try:
        with _key_lock(key):
            store = cached_store(key)  # a concurrent run may have built it meanwhile
            if store is None:
                t0 = time.monotonic()
                store = build_store(key, archive, source)
                logger.info(
                    "built image store %s for %s in %.2fs",
                    store.path.name,
                    source,
                    time.monotonic() - t0,
                )
    except (StoreBuildError, OSError) as exc:
        logger.info("no image store for %s: %s; the guest loads the archive", source, exc)
        return None
    return store


def build_store(key: str, archive: Path, source: str) -> ImageStore:
    """Load `archive` into a private containers-storage and pack it as a read-only ext4.

    Call with the key's lock held. Raises StoreBuildError (or OSError).
    """
    d = images_dir()
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(f"{BUILD_PREFIX}{key}-*"):  # left by killed builds (we hold the lock)
        _remove_tree(stale)
    collect_garbage()  # (and whatever killed builds of other images left)
    work = d / f"{BUILD_PREFIX}{key}-{os.getpid()}"
    ext4, meta_path = store_paths(key)
    tmp_ext4 = ext4.with_name(f"{BUILD_PREFIX}{ext4.name}.{os.getpid()}")
    # podman refuses a runroot longer than 50 characters: keep it short, in /tmp.
    import tempfile

    run = Path(tempfile.mkdtemp(prefix=f"{RUNROOT_PREFIX}{os.getpid()}-", dir="/tmp"))
    try:
        root, image_id, names = _load_private(work, run, archive)
        shutil.rmtree(root / "libpod", ignore_errors=True)  # podman's own DB: not needed
        make_store_ext4(root, tmp_ext4)
        os.replace(tmp_ext4, ext4)
        st = ext4.stat()
        meta = {
            "version": STORE_VERSION,
            "key": key,
            "source": source,
            "archive": str(archive),
            "image_id": image_id,
            "names": list(names),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        }
        atomic_write(meta_path, json.dumps(meta, indent=1) + "\n")
    finally:
        tmp_ext4.unlink(missing_ok=True)
        _remove_tree(work)
        _remove_tree(run)
    if key.startswith("a-"):
        _prune_superseded(key, str(archive))
    return ImageStore(ext4, image_id, names)


def _load_private(work: Path, run: Path, archive: Path) -> tuple[Path, str, tuple[str, ...]]:
    """`podman load` into work/root (overlay); returns (root, image ID, names)."""
    root = work / "root"
    root.mkdir(parents=True)
    conf = work / "storage.conf"  # keeps the host's storage.conf options out of it
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{root}"\nrunroot = "{run}"\n')
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}
    argv = [
        _podman(), "--root", str(root), "--runroot", str(run), "--storage-driver", "overlay",
        "--events-backend", "none", "load", "-q", "-i", str(archive),
    ]  # fmt: skip
    proc = children.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise StoreBuildError(f"podman load failed: {lines[-1] if lines else proc.returncode}")
    try:
        images = json.loads((root / "overlay-images" / "images.json").read_text())
    except (OSError, ValueError) as exc:
        raise StoreBuildError(f"no image in the private storage: {exc}") from None
    if not isinstance(images, list) or len(images) != 1 or "id" not in images[0]:
        raise StoreBuildError(f"expected one image in the archive, found {len(images)}")
    return root, str(images[0]["id"]), tuple(images[0].get("names") or ())


def make_store_ext4(root: Path, out: Path) -> int:
    try:
        return ext4.pack(root, out, label=STORE_LABEL, growth=1.10, slack_mib=16)
    except children.Cancelled:
        raise
    except FcvmError as exc:
        raise StoreBuildError(str(exc)) from None


def _prune_superseded(key: str, archive: str) -> None:
    """Drop stores of archives that were since rewritten (same path, another key) or
    removed: nothing else would ever use them again."""
    for meta_path in images_dir().glob(f"a-*{META_SUFFIX}"):
        old = meta_path.name[: -len(META_SUFFIX)]
        if old == key:
            continue
        with contextlib.suppress(OSError, ValueError):
            source = json.loads(meta_path.read_text()).get("archive")
            if isinstance(source, str) and (source == archive or not os.path.exists(source)):
                ext4, _ = store_paths(old)
                meta_path.unlink()
                ext4.unlink(missing_ok=True)
                (images_dir() / f".{old}.lock").unlink(missing_ok=True)
                logger.info("removed superseded image store %s", ext4.name)


def collect_garbage() -> list[str]:
    """Remove what runs killed while exporting or packing an image left behind (its
    pid, in the name, no longer runs): export temp files, build directories (with the
    overlay mounts podman left under them) and podman's runroots in /tmp. `fcvm gc`
    and every store build call this; what was removed."""
    found: list[tuple[Path, int]] = []
    with contextlib.suppress(OSError):
        for path in images_dir().iterdir():
            if m := _LEFT_BY_PID.fullmatch(path.name):
                found.append((path, int(m.group("a") or m.group("b") or m.group("c"))))
    with contextlib.suppress(OSError):
        for path in Path("/tmp").iterdir():
            if m := _RUNROOT.fullmatch(path.name):
                found.append((path, int(m.group("pid"))))
    from fcvm.state import process_start_time

    removed = []
    for path, pid in found:
        if process_start_time(pid) is not None:  # (its run is still at it)
            continue
        if path.is_dir() and not path.is_symlink():
            _remove_tree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(str(path))
    return removed


_MNT_DETACH = 2


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """rm -rf, after unmounting anything podman may have left mounted under it."""
    if not path.exists():
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for point in _mounts_under(path):
        if libc.umount2(point.encode(), _MNT_DETACH) != 0:
            logger.warning("cannot unmount %s: %s", point, os.strerror(ctypes.get_errno()))
    shutil.rmtree(path, ignore_errors=True)


def resolve(spec: ImageSpec) -> GuestImage:
    if spec.kind in ("oci-archive", "docker-archive"):
        path = Path(spec.ref).resolve()
        _check_archive(spec.kind, path)
        store = image_store(archive_store_key(path), path, f"{spec.kind}:{path}")
        config = archive_config(spec.kind, path)
        return GuestImage(archive=path, ref="", store=store, config=config)
    found = host_image(spec.ref)
    if found is not None:
        image_id, config = found
        logger.info("image %s is %s in host storage", spec.ref, image_id[:12])
        archive = export_host_image(spec.ref, image_id)
        store = image_store(host_store_key(image_id), archive, spec.ref)
        return GuestImage(archive=archive, ref="", store=store, config=config)
    if _looks_like_registry_ref(spec.ref):
        return GuestImage(archive=None, ref=spec.ref, pull=spec.ref)
    raise ImageError(
        f"image {spec.ref!r} not found in host storage",
        hint="give a full registry reference to pull it in the guest, "
        "or oci-archive:PATH / docker-archive:PATH",
    )
