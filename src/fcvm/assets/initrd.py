"""Guest initrd: an uncompressed newc cpio with busybox, boot modules and /init.

Uncompressed because unpacking is the fastest option under TCG. The modules are
those the guest needs to find its disks and talk to the host (virtio transports,
block, net, console, rng, vsock) plus fuse and overlay; their dependencies come
from ``modules.dep``, builtins (``modules.builtin``) are skipped, compressed
modules (.ko.xz/.ko.zst/.ko.gz) are stored decompressed, and
``/lib/modules/<release>/fcvm-load-order`` lists them in load order for /init.
"""

from __future__ import annotations

import gzip
import lzma
import stat
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fcvm import paths
from fcvm.assets import cache
from fcvm.errors import FcvmError

INITRD_RECIPE = "initrd-v1"
BUSYBOX = Path("/bin/busybox")

# Modules the guest needs; dependencies are added from modules.dep.
GUEST_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "vsock",
    "vmw_vsock_virtio_transport",
    "fuse",
    "overlay",
    "ext4",
)

LOAD_ORDER_FILE = "fcvm-load-order"
KO_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")

Progress = Callable[[str, str], None]


def init_script() -> bytes:
    return (Path(__file__).parent / "data" / "init.sh").read_bytes()


def initrd_key(kernel_key: str, busybox_sha256: str, modules: Iterable[str] = GUEST_MODULES) -> str:
    return cache.short_hash(
        INITRD_RECIPE, init_script(), "\n".join(modules), kernel_key, busybox_sha256
    )


# --- modules.dep ---------------------------------------------------------------


def module_name(relpath: str) -> str:
    """kernel/drivers/virtio/virtio-mmio.ko.xz -> virtio_mmio"""
    base = relpath.rsplit("/", 1)[-1]
    for suffix in KO_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


@dataclass(frozen=True)
class ModuleIndex:
    deps: dict[str, list[str]]  # relpath -> dependency relpaths (as in modules.dep)
    by_name: dict[str, str]  # module name -> relpath
    builtin: frozenset[str]  # module names built into the kernel

    @classmethod
    def load(cls, moddir: Path) -> ModuleIndex:
        deps: dict[str, list[str]] = {}
        dep_file = moddir / "modules.dep"
        if not dep_file.is_file():
            raise FcvmError(f"{dep_file} is missing (depmod has not run)")
        for line in dep_file.read_text().splitlines():
            if ":" not in line:
                continue
            mod, _, rest = line.partition(":")
            deps[mod.strip()] = rest.split()
        by_name = {module_name(p): p for p in deps}
        builtin: set[str] = set()
        bfile = moddir / "modules.builtin"
        if bfile.is_file():
            builtin = {module_name(ln.strip()) for ln in bfile.read_text().splitlines() if ln}
        return cls(deps, by_name, frozenset(builtin))

    def load_order(self, wanted: Iterable[str]) -> list[str]:
        """Relpaths of the wanted modules and their dependencies, dependencies first."""
        order: list[str] = []
        done: set[str] = set()
        visiting: set[str] = set()

        def visit(rel: str) -> None:
            if rel in done:
                return
            if rel in visiting:
                raise FcvmError(f"modules.dep has a dependency cycle at {rel}")
            visiting.add(rel)
            # modprobe loads a module's dependencies last-listed first
            for dep in reversed(self.deps.get(rel, [])):
                visit(dep)
            visiting.discard(rel)
            done.add(rel)
            order.append(rel)

        for name in wanted:
            name = name.replace("-", "_")
            if name in self.by_name:
                visit(self.by_name[name])
            elif name not in self.builtin:
                raise FcvmError(f"kernel module {name} is neither a module nor built in")
        return order


def read_module(path: Path) -> bytes:
    """The module's bytes, decompressed if Debian ships it compressed."""
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        try:
            return subprocess.run(
                ["zstd", "-dc", str(path)], capture_output=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            raise FcvmError(f"cannot decompress {name} (is zstd installed?)") from exc
    return path.read_bytes()


def stored_name(relpath: str) -> str:
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz"):
        if relpath.endswith(suffix):
            return relpath[: -len(suffix)] + ".ko"
    return relpath


# --- cpio (newc) ----------------------------------------------------------------


class CpioWriter:
    """A deterministic newc archive (mtime 0, root-owned), built in memory."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._ino = 1
        self._seen: set[str] = set()

    def _put(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size % 4:
            pad = b"\0" * (4 - self._size % 4)
            self._chunks.append(pad)
            self._size += len(pad)

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.strip("/") or "."
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = [
            self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
            len(name) + 1, 0,
        ]  # fmt: skip
        self._ino += 1
        hdr = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        self._put(hdr + name.encode() + b"\0")
        if data:
            self._put(data)

    def _parents(self, name: str) -> None:
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._seen:
                self._seen.add(d)
                self._entry(d, stat.S_IFDIR | 0o755)

    def dir(self, name: str, mode: int = 0o755) -> None:
        name = name.strip("/")
        self._parents(name)
        if name not in self._seen:
            self._seen.add(name)
            self._entry(name, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self._parents(name)
        self._seen.add(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self._parents(name)
        self._seen.add(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = name.strip("/")
        self._parents(name)
        self._seen.add(name)
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._chunks)


def parse_cpio(data: bytes) -> list[tuple[str, int, bytes]]:
    """(name, mode, data) of each entry of a newc archive (for tests and checks)."""
    out: list[tuple[str, int, bytes]] = []
    pos = 0
    while pos < len(data):
        if data[pos : pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at {pos}")
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = f[1], f[6], f[11]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos = (pos + namesize + 3) & ~3
        body = data[pos : pos + filesize]
        pos = (pos + filesize + 3) & ~3
        if name == "TRAILER!!!":
            break
        out.append((name, mode, body))
    return out


# --- build ------------------------------------------------------------------------


def busybox_applets(busybox: Path) -> list[str]:
    try:
        out = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise FcvmError(
            f"cannot run {busybox} --list-full", hint="apt-get install busybox-static"
        ) from exc
    return [ln.strip() for ln in out.splitlines() if ln.strip()]


def load_order_text(stored: list[str]) -> str:
    """Lines "<name> <relpath> [pci]" for /init; pci-only modules are skipped without PCI."""
    lines = []
    for rel in stored:
        name = module_name(rel)
        tag = " pci" if name.startswith("virtio_pci") else ""
        lines.append(f"{name} {rel}{tag}\n")
    return "".join(lines)


def build_cpio(
    moddir: Path,
    release: str,
    busybox: Path = BUSYBOX,
    modules: Iterable[str] = GUEST_MODULES,
    applets: list[str] | None = None,
) -> tuple[bytes, list[str]]:
    """The initrd image and the module load order it contains."""
    index = ModuleIndex.load(moddir)
    order = index.load_order(modules)
    w = CpioWriter()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run",
              "lower", "upper", "newroot", "etc", "root"):  # fmt: skip
        w.dir(d)
    w.chardev("dev/console", 5, 1)
    w.chardev("dev/null", 1, 3, 0o666)
    w.file("bin/busybox", busybox.read_bytes(), 0o755)
    if applets is None:
        applets = busybox_applets(busybox)
    for applet in applets:
        if applet.strip("/") in ("bin/busybox", "init", "linuxrc"):
            continue
        w.symlink(applet, "/bin/busybox")
    w.file("init", init_script(), 0o755)
    base = f"lib/modules/{release}"
    w.dir(base)
    stored: list[str] = []
    for rel in order:
        name = stored_name(rel)
        w.file(f"{base}/{name}", read_module(moddir / rel), 0o644)
        stored.append(name)
    w.file(f"{base}/{LOAD_ORDER_FILE}", load_order_text(stored).encode())
    w.file("etc/fcvm-initrd", f"release={release}\n".encode())
    return w.finish(), stored


def build(kernel: cache.KernelRecord, tree: Path, progress: Progress) -> cache.InitrdRecord:
    bb_sha = cache.file_sha256(BUSYBOX) if BUSYBOX.is_file() else ""
    if not bb_sha:
        raise FcvmError(f"{BUSYBOX} is missing", hint="apt-get install busybox-static")
    key = initrd_key(kernel.key, bb_sha)
    fname = f"initrd-{key}.cpio"
    final = paths.assets_dir() / fname
    moddir = tree / "lib" / "modules" / kernel.release
    progress("initrd", f"building {fname}")
    data, order = build_cpio(moddir, kernel.release)
    if not final.is_file():
        cache.atomic_write_bytes(final, data)
    return cache.InitrdRecord(key=key, file=fname, busybox_sha256=bb_sha, modules=order)
