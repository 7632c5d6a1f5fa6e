"""Firecracker's side of the userfaultfd page-server protocol, played for tests.

No Firecracker runs here, so this driver does what Firecracker documents and does
(docs/snapshotting/handling-page-faults-on-snapshot-resume.md; `guest_memory_from_uffd`
in src/vmm/src/persist.rs):

1. maps each guest memory region as anonymous private memory;
2. creates a userfaultfd (O_CLOEXEC | O_NONBLOCK, not user-mode-only) either with the
   userfaultfd syscall or /dev/userfaultfd's USERFAULTFD_IOC_NEW, and enables
   UFFD_FEATURE_EVENT_REMOVE with UFFDIO_API, as Firecracker always does;
3. registers every region for missing-page faults (UFFDIO_REGISTER_MODE_MISSING);
4. connects to the handler's Unix socket and sends, in ONE sendmsg, the JSON array of
   ``{base_host_virt_addr, size, offset, page_size, page_size_kib}`` (offsets: the
   regions laid end to end in the memory file; page sizes in bytes) with the uffd as
   SCM_RIGHTS - then keeps the socket open for its lifetime, never writing again.

Then, unlike Firecracker, it plays the guest: touches pages sequentially or at random
(each first touch blocks in a fault the server must resolve), checks every byte against
the memory file, optionally MADV_DONTNEEDs a range (what the balloon does, producing
UFFD_EVENT_REMOVE) and checks that those pages come back as zeros.

Run as a script (one process per VM; prints one JSON line) or import `Driver`.
The toucher must never be the page server's process or thread: it blocks on faults.
"""

from __future__ import annotations

import argparse
import array
import ctypes
import hashlib
import json
import mmap
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from fcvm.snapshot import uffd  # noqa: E402

PAGE = 4096
HUGE_PAGE = 2 << 20
MAP_HUGETLB = 0x40000  # (not in Python's mmap module)

# The toucher in C (compiled with the system gcc on first use, then cached): a Python
# loop costs ~0.17 us per page sequentially and ~0.54 us at random over 512 MiB, which
# is as much as resolving a fault from a prefetched set takes, so the benchmark would
# otherwise measure the loop.
_TOUCHER_C = r"""
#include <stddef.h>
#include <stdint.h>
long fcvm_touch(const uint64_t *addrs, size_t n)
{
    long sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += *(volatile const unsigned char *)(uintptr_t)addrs[i];
    return sum;
}
"""
_toucher_lib: Any = None


def native_toucher() -> Any:
    """fcvm_touch(addresses, n) from a tiny shared object, or None without gcc."""
    global _toucher_lib
    if _toucher_lib is None:
        digest = hashlib.sha256(_TOUCHER_C.encode()).hexdigest()[:12]
        so = Path(tempfile.gettempdir()) / f"fcvm-uffd-toucher-{os.getuid()}-{digest}.so"
        try:
            if not so.exists():
                src = so.with_suffix(f".{os.getpid()}.c")
                src.write_text(_TOUCHER_C)
                tmp = so.with_suffix(f".{os.getpid()}.tmp")
                subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)],
                               check=True, capture_output=True, timeout=60)  # fmt: skip
                src.unlink()
                os.replace(tmp, so)
            lib = ctypes.CDLL(str(so))
        except (OSError, subprocess.SubprocessError):
            _toucher_lib = False
            return None
        lib.fcvm_touch.restype = ctypes.c_long
        lib.fcvm_touch.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _toucher_lib = lib
    return _toucher_lib or None


def touch_native(lib: Any, addrs: array.array[int]) -> float:
    """Read one byte at each address (in order) in C; returns the seconds it took."""
    ptr, n = addrs.buffer_info()
    t0 = time.perf_counter()
    lib.fcvm_touch(ptr, n)
    return time.perf_counter() - t0


def _addr(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def resident_pages(m: mmap.mmap) -> int:
    """How many pages of an anonymous mapping are populated (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    n = (len(m) + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * n)()
    buf = ctypes.c_char.from_buffer(m)
    if libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(len(m)), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    del buf
    return sum(1 for v in vec if v & 1)


class Driver:
    """One fake VMM: its guest memory regions, its userfaultfd, its socket."""

    def __init__(
        self,
        memory: Path,
        *,
        regions: int = 1,
        size: int | None = None,
        method: str = "auto",
        huge: bool = False,
    ) -> None:
        self.memory = Path(memory)
        total = size if size is not None else self.memory.stat().st_size
        # huge: guest memory in 2 MiB hugetlb pages, as Firecracker's `huge_pages: "2M"`
        # maps it (anonymous MAP_HUGETLB; faults and copies are whole huge pages).
        self.page_size = HUGE_PAGE if huge else PAGE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (MAP_HUGETLB if huge else 0)
        # Split like Firecracker's layout around the MMIO gap: contiguous file offsets.
        npages = total // self.page_size
        bounds = [npages * i // regions for i in range(regions + 1)]
        self.layout = [
            (bounds[i] * self.page_size, (bounds[i + 1] - bounds[i]) * self.page_size)
            for i in range(regions)
        ]
        self.maps = [mmap.mmap(-1, sz, flags=flags) for _, sz in self.layout]
        self.uffd = uffd.create(method=method)
        uffd.api(self.uffd, uffd.UFFD_FEATURE_EVENT_REMOVE)
        for m in self.maps:
            uffd.register(self.uffd, _addr(m), len(m), uffd.UFFDIO_REGISTER_MODE_MISSING)
        self.sock: socket.socket | None = None

    def regions_json(self) -> list[dict[str, int]]:
        return [
            {
                "base_host_virt_addr": _addr(m),
                "size": sz,
                "offset": off,
                "page_size": self.page_size,
                "page_size_kib": self.page_size,  # deprecated alias, also bytes (sic)
            }
            for m, (off, sz) in zip(self.maps, self.layout, strict=True)
        ]

    def connect(
        self, path: Path, payload: bytes | None = None, fds: list[int] | None = None
    ) -> None:
        """Connect and send the handshake in one sendmsg (as Firecracker does)."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        if payload is None:
            payload = json.dumps(self.regions_json()).encode()
        fds = [self.uffd] if fds is None else fds
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        self.sock.sendmsg([payload], anc)

    def page_addrs(self) -> list[tuple[int, int]]:
        """(map index, offset in map) of every page, in memory order."""
        return [(i, o) for i, m in enumerate(self.maps) for o in range(0, len(m), PAGE)]

    def touch(
        self, order: list[tuple[int, int]], *, write: bool = False, die_after: int = -1
    ) -> float:
        maps = self.maps
        t0 = time.perf_counter()
        if write:
            src = self._file_view()
            for n, (i, o) in enumerate(order):
                if n == die_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                maps[i][o] = src[self.layout[i][0] + o]
        else:
            for n, (i, o) in enumerate(order):
                if n == die_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                maps[i][o]  # the read is the point: it faults
        return time.perf_counter() - t0

    def _file_view(self) -> mmap.mmap:
        with open(self.memory, "rb") as f:
            return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)

    def verify(self) -> list[int]:
        """File offsets of the pages whose bytes differ from the memory file."""
        src = self._file_view()
        bad = []
        for m, (off, sz) in zip(self.maps, self.layout, strict=True):
            if m[:] == src[off : off + sz]:
                continue
            bad.extend(
                off + o
                for o in range(0, sz, PAGE)
                if m[o : o + PAGE] != src[off + o : off + o + PAGE]
            )
        return bad

    def remove(self, file_off: int, length: int) -> tuple[int, int]:
        """MADV_DONTNEED a range given in memory-file offsets (the balloon's way)."""
        for i, (off, sz) in enumerate(self.layout):
            if off <= file_off < off + sz:
                rel = file_off - off
                self.maps[i].madvise(mmap.MADV_DONTNEED, rel, min(length, sz - rel))
                return i, rel
        raise ValueError("offset outside the regions")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        os.close(self.uffd)
        for m in self.maps:
            m.close()


GARBAGE = ("malformed-json", "no-fd", "beyond-file", "not-uffd", "empty", "two-fds", "unaligned")


def send_garbage(path: Path, memory: Path, kind: str, method: str = "auto") -> dict[str, Any]:
    """Send one kind of bad handshake; report whether the server hung up on us."""
    drv = Driver(memory, method=method, size=64 * PAGE)
    good = drv.regions_json()
    fds: list[int] | None = None
    payload: bytes | None = None
    extra_fd = -1
    if kind == "malformed-json":
        payload = b'[{"base_host_virt_addr": 1, "size": '
    elif kind == "no-fd":
        fds = []
    elif kind == "beyond-file":
        big = dict(good[0], size=memory.stat().st_size + 64 * PAGE)
        payload = json.dumps([big]).encode()
    elif kind == "unaligned":
        odd = dict(good[0], base_host_virt_addr=good[0]["base_host_virt_addr"] + 1)
        payload = json.dumps([odd]).encode()
    elif kind == "not-uffd":
        extra_fd = os.open("/dev/null", os.O_RDONLY)
        fds = [extra_fd]
    elif kind == "two-fds":
        extra_fd = os.open("/dev/null", os.O_RDONLY)
        fds = [drv.uffd, extra_fd]
    if kind == "empty":
        drv.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        drv.sock.connect(str(path))
        drv.sock.shutdown(socket.SHUT_WR)
    else:
        drv.connect(path, payload, fds)
    assert drv.sock is not None
    drv.sock.settimeout(10)
    try:
        closed = drv.sock.recv(1) == b""
    except (TimeoutError, ConnectionResetError) as exc:
        closed = isinstance(exc, ConnectionResetError)
    if extra_fd >= 0:
        os.close(extra_fd)
    drv.close()
    return {"garbage": kind, "closed_by_server": closed}


def _anon(args: argparse.Namespace) -> int:
    """First-touch faults on plain anonymous memory: the kernel's own floor."""
    size = args.size if args.size is not None else args.memory.stat().st_size
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    order = list(range(0, size, PAGE))
    if args.pattern == "random":
        random.Random(args.seed).shuffle(order)
    lib = native_toucher() if args.toucher != "python" else None
    if lib is not None:
        base = _addr(m)
        secs = touch_native(lib, array.array("Q", [base + o for o in order]))
    else:
        t0 = time.perf_counter()
        for o in order:
            m[o]
        secs = time.perf_counter() - t0
    print(json.dumps({"pid": os.getpid(), "pages": len(order), "touched": len(order),
                      "touch_seconds": secs, "pages_per_s": len(order) / secs,
                      "connect_to_done_seconds": secs,
                      "toucher": "c" if lib is not None else "python"}), flush=True)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", type=Path, help="the page server's socket (all but --anon)")
    ap.add_argument("--memory", type=Path, required=True)
    ap.add_argument("--size", type=int, help="bytes of guest memory (default: the file's size)")
    ap.add_argument("--regions", type=int, default=1)
    ap.add_argument("--method", default="auto", choices=("auto", "syscall", "dev"))
    ap.add_argument("--pattern", default="seq", choices=("seq", "random", "none"))
    ap.add_argument("--fraction", type=float, default=1.0, help="touch only this share of pages")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="touch by writing the expected byte")
    ap.add_argument("--huge", action="store_true", help="2 MiB hugetlb guest memory")
    ap.add_argument(
        "--toucher",
        default="auto",
        choices=("auto", "c", "python"),
        help="read-touch loop: C (gcc-compiled, cached) when available, else Python",
    )
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--remove", help="OFFSET:LENGTH (memory-file bytes) to MADV_DONTNEED after")
    ap.add_argument("--die-after", type=int, default=-1, help="SIGKILL itself after N touches")
    ap.add_argument("--garbage", choices=GARBAGE)
    ap.add_argument("--start-at", type=float, default=0.0, help="time.time() to start touching")
    ap.add_argument(
        "--resident-after",
        type=float,
        default=-1.0,
        help="seconds after connecting to count populated pages (prefetch check)",
    )
    ap.add_argument("--sleep-before-verify", type=float, default=0.0)
    ap.add_argument(
        "--anon",
        action="store_true",
        help="baseline: plain anonymous memory, no userfaultfd, no server",
    )
    ap.add_argument("--hold", type=float, default=0.0, help="stay attached this long at the end")
    args = ap.parse_args(argv)

    if not args.anon and args.socket is None:
        ap.error("--socket is required (except with --anon)")
    if args.garbage:
        print(json.dumps(send_garbage(args.socket, args.memory, args.garbage, args.method)))
        return 0

    if args.anon:
        return _anon(args)
    drv = Driver(
        args.memory, regions=args.regions, size=args.size, method=args.method, huge=args.huge
    )
    out: dict[str, Any] = {"pid": os.getpid(), "pages": sum(len(m) for m in drv.maps) // PAGE}
    order = drv.page_addrs()
    if args.pattern == "random":
        random.Random(args.seed).shuffle(order)
    if args.fraction < 1.0:
        order = order[: int(len(order) * args.fraction)]
    lib = None
    if args.toucher != "python" and not args.write and args.die_after < 0:
        lib = native_toucher()
        if lib is None and args.toucher == "c":
            ap.error("--toucher c: cannot build the C toucher (is gcc installed?)")
    addrs = array.array("Q", [_addr(drv.maps[i]) + o for i, o in order]) if lib else None
    t_connect = time.perf_counter()
    drv.connect(args.socket)
    if args.resident_after >= 0:
        time.sleep(args.resident_after)
        out["resident_before_touch"] = sum(resident_pages(m) for m in drv.maps)
    if args.start_at:
        time.sleep(max(0.0, args.start_at - time.time()))
    if args.pattern != "none":
        if lib is not None and addrs is not None:
            secs = touch_native(lib, addrs)
        else:
            secs = drv.touch(order, write=args.write, die_after=args.die_after)
        out["toucher"] = "c" if lib is not None else "python"
        rate = len(order) / secs if secs else 0.0
        out.update(touched=len(order), touch_seconds=secs, pages_per_s=rate)
        out["connect_to_done_seconds"] = time.perf_counter() - t_connect
    if args.sleep_before_verify:
        time.sleep(args.sleep_before_verify)
    if not args.no_verify:
        bad = drv.verify()
        out["mismatched_pages"] = len(bad)
        out["first_mismatch"] = bad[0] if bad else None
    if args.remove:
        off_s, len_s = args.remove.split(":")
        off, length = int(off_s, 0), int(len_s, 0)
        i, rel = drv.remove(off, length)
        m = drv.maps[i]
        zero = bytes(PAGE)
        out["removed_zero_pages"] = sum(
            1 for o in range(rel, rel + length, PAGE) if m[o : o + PAGE] == zero
        )
        out["removed_pages"] = length // PAGE
        src = drv._file_view()
        before, after = drv.layout[i][0], drv.layout[i][0] + rel + length
        out["outside_removed_ok"] = m[:rel] == src[before : before + rel] and (
            m[rel + length :] == src[after : drv.layout[i][0] + drv.layout[i][1]]
        )
    if args.hold:
        time.sleep(args.hold)
    print(json.dumps(out), flush=True)
    drv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
