"""Content addressing for guest assets: input hashes, the manifest, atomic writes.

Every asset file name carries a short hash of the inputs that produced it::

    kernel   H(package name, package version, kernel recipe)
    initrd   H(initrd recipe, /init script, module list, kernel key, busybox hash)
    base     H(suite, mirrors, package list, dpkg options, base recipe)   (mmdebstrap tar)
    rootfs   H(rootfs recipe, base key, kernel key, agent source hash)

``manifest.json`` in the assets directory records what was built last. Reading it
and re-hashing the (small) agent sources is all ``resolve_assets`` does: no
subprocess, no network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fcvm import paths

MANIFEST_VERSION = 1
HASH_LEN = 12


def short_hash(*parts: str | bytes) -> str:
    """A short, stable hash of an ordered list of inputs."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:HASH_LEN]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_root() -> Path:
    """The directory of the installed ``fcvm`` package (src/fcvm in a checkout)."""
    return Path(__file__).resolve().parent.parent


AGENT_SOURCE_FILES = ("__init__.py", "errors.py", "procstat.py")
AGENT_SOURCE_DIRS = ("session", "agent")


def agent_sources(root: Path | None = None) -> list[tuple[str, Path]]:
    """The files copied into the guest as /opt/fcvm/fcvm/..., sorted by relative path."""
    root = root or package_root()
    out: list[tuple[str, Path]] = []
    for name in AGENT_SOURCE_FILES:
        p = root / name
        if p.is_file():
            out.append((name, p))
    for d in AGENT_SOURCE_DIRS:
        base = root / d
        if not base.is_dir():
            continue
        for p in base.rglob("*.py"):
            if "__pycache__" in p.parts or not p.is_file():
                continue
            out.append((p.relative_to(root).as_posix(), p))
    out.sort()
    return out


def agent_hash(root: Path | None = None) -> str:
    parts: list[str | bytes] = ["agent-v1"]
    for rel, p in agent_sources(root):
        parts.append(rel)
        parts.append(p.read_bytes())
    return short_hash(*parts)


@dataclass
class KernelRecord:
    key: str
    package: str  # e.g. linux-image-6.1.0-56-cloud-amd64
    version: str  # Debian package version, e.g. 6.1.192-2
    release: str  # uname -r, e.g. 6.1.0-56-cloud-amd64
    vmlinux: str  # file names inside the assets dir
    bzimage: str


@dataclass
class InitrdRecord:
    key: str
    file: str
    busybox_sha256: str
    modules: list[str] = field(default_factory=list)  # load order, relative .ko paths


@dataclass
class BaseRecord:
    key: str
    file: str  # inside the download cache dir


@dataclass
class RootfsRecord:
    key: str
    file: str
    agent_hash: str
    size_bytes: int = 0


@dataclass
class Manifest:
    kernel: KernelRecord | None = None
    initrd: InitrdRecord | None = None
    base: BaseRecord | None = None
    rootfs: RootfsRecord | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": MANIFEST_VERSION}
        for name in ("kernel", "initrd", "base", "rootfs"):
            rec = getattr(self, name)
            d[name] = asdict(rec) if rec is not None else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        if d.get("version") != MANIFEST_VERSION:
            return cls()
        m = cls()
        try:
            if d.get("kernel"):
                m.kernel = KernelRecord(**d["kernel"])
            if d.get("initrd"):
                m.initrd = InitrdRecord(**d["initrd"])
            if d.get("base"):
                m.base = BaseRecord(**d["base"])
            if d.get("rootfs"):
                m.rootfs = RootfsRecord(**d["rootfs"])
        except TypeError:  # fields from another fcvm version: treat as absent
            return cls()
        return m


def manifest_path() -> Path:
    return paths.assets_dir() / "manifest.json"


def load_manifest() -> Manifest:
    try:
        data = json.loads(manifest_path().read_text())
    except (OSError, ValueError):
        return Manifest()
    if not isinstance(data, dict):
        return Manifest()
    return Manifest.from_json(data)


def save_manifest(m: Manifest) -> None:
    atomic_write_bytes(manifest_path(), (json.dumps(m.to_json(), indent=2) + "\n").encode())


TMP_PREFIX = ".tmp-"


def temp_path(final: Path, suffix: str = "") -> Path:
    """A fresh temporary name next to ``final`` (same filesystem, so rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f"{TMP_PREFIX}{final.name}.", suffix=suffix, dir=final.parent
    )
    os.close(fd)
    return Path(name)


def atomic_write_bytes(final: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_output(final, mode) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_output(final: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temp path to write; on success fsync it and rename it to ``final``."""
    tmp = temp_path(final)
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temps(dirs: Iterable[Path]) -> None:
    """Delete leftovers of interrupted builds (call with the setup lock held)."""
    import shutil

    for d in dirs:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(TMP_PREFIX):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


@contextlib.contextmanager
def setup_lock() -> Iterator[None]:
    """Serialise concurrent `fcvm setup` runs (flock on assets/.setup.lock)."""
    d = paths.assets_dir()
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / ".setup.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
