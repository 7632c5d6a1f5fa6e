"""Benchmark: a --map volume's FUSE path on the host, against a local tmpfs.

The same workloads run on a directory of a private tmpfs (the baseline) and through a
real FUSE mount served by VolumeServer through fcvm-fuse-relay (socketpair, no VM: the
guest's exact code path with the host kernel as the guest kernel), whose backing
directory is on the same tmpfs; once with the writeback cache and once without.

  seq_write   256 MiB in 1 MiB writes, then fsync (MiB/s)
  seq_read    256 MiB written on the host side, read in 1 MiB reads (MiB/s; a cold
              FUSE page cache, so every byte crosses the relay)
  small_files create + write 100 B + close + stat + unlink of 2,000 files (files/s)
  readdir     os.listdir of 10,000 entries (entries/s; listing made on the host side)

Ratios are fuse / local per workload (median of --repeat runs). Run as root (mounts).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from fcvm.volumes.relay import READY_BYTE, build_relay
from fcvm.volumes.server import VolumeServer

MiB = 1 << 20


@contextlib.contextmanager
def tmpfs() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="fcvm-bench-vol-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", str(top)], check=True)
    try:
        yield top
    finally:
        subprocess.run(["umount", "-l", str(top)], check=False)
        os.rmdir(top)


@contextlib.contextmanager
def fuse_mount(relay: Path, backing: Path, mnt: Path, writeback: bool) -> Iterator[Path]:
    backing.mkdir()
    mnt.mkdir()
    server = VolumeServer(backing, writeback=writeback)
    ours, theirs = socket.socketpair()
    t = threading.Thread(target=server.serve, args=(ours,), daemon=True)
    t.start()
    proc = subprocess.Popen([str(relay), str(mnt), str(theirs.fileno())],
                            stdout=subprocess.PIPE, pass_fds=(theirs.fileno(),))  # fmt: skip
    assert proc.stdout is not None
    if proc.stdout.read(1) != READY_BYTE:
        raise SystemExit("relay did not start")
    theirs.close()
    try:
        yield mnt
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        t.join(10)
        ours.close()


def seq_write(d: Path, host: Path, size: int) -> float:
    buf = os.urandom(MiB)
    t0 = time.perf_counter()
    fd = os.open(d / "seq", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    for _ in range(size // MiB):
        os.write(fd, buf)
    os.fsync(fd)
    os.close(fd)
    dt = time.perf_counter() - t0
    if os.stat(host / "seq").st_size != size:
        raise SystemExit("short write")
    os.unlink(d / "seq")
    return size / MiB / dt


def seq_read(d: Path, host: Path, size: int) -> float:
    with open(host / "src", "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    t0 = time.perf_counter()
    fd = os.open(d / "src", os.O_RDONLY)
    n = 0
    while chunk := os.read(fd, MiB):
        n += len(chunk)
    os.close(fd)
    dt = time.perf_counter() - t0
    if n != size:
        raise SystemExit("short read")
    os.unlink(host / "src")
    return size / MiB / dt


def small_files(d: Path, host: Path, count: int) -> float:
    del host
    (d / "small").mkdir()
    data = b"x" * 100
    t0 = time.perf_counter()
    for i in range(count):
        p = d / "small" / f"f{i}"
        fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, data)
        os.close(fd)
        os.stat(p)
        os.unlink(p)
    dt = time.perf_counter() - t0
    os.rmdir(d / "small")
    return count / dt


def readdir(d: Path, host: Path, count: int) -> float:
    (host / "many").mkdir()
    for i in range(count):
        (host / "many" / f"entry-{i:06d}").touch()
    t0 = time.perf_counter()
    n = len(os.listdir(d / "many"))
    dt = time.perf_counter() - t0
    if n != count:
        raise SystemExit(f"listed {n} of {count}")
    for i in range(count):
        os.unlink(host / "many" / f"entry-{i:06d}")
    os.rmdir(host / "many")
    return count / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--entries", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_volumes_host: run as root (it mounts tmpfs and FUSE)")
    workloads: dict[str, tuple[Callable[[Path, Path, int], float], int]] = {
        "seq_write_mib_s": (seq_write, args.size_mib * MiB),
        "seq_read_mib_s": (seq_read, args.size_mib * MiB),
        "small_files_per_s": (small_files, args.files),
        "readdir_entries_per_s": (readdir, args.entries),
    }
    out: dict[str, object] = {"load_start": os.getloadavg()}
    samples: dict[str, dict[str, list[float]]] = {}
    with tmpfs() as top:
        relay = top / "fcvm-fuse-relay"
        build_relay(relay)
        local = top / "local"
        local.mkdir()
        for mode in ("local", "fuse_writeback", "fuse_no_writeback"):
            samples[mode] = {k: [] for k in workloads}
            for rep in range(args.repeat):
                if mode == "local":
                    ctx: contextlib.AbstractContextManager[Path] = contextlib.nullcontext(local)
                    host = local
                else:
                    host = top / f"back-{mode}-{rep}"
                    ctx = fuse_mount(relay, host, top / f"mnt-{mode}-{rep}",
                                     writeback=mode == "fuse_writeback")  # fmt: skip
                with ctx as d:
                    for name, (fn, n) in workloads.items():
                        samples[mode][name].append(fn(d, host, n))
    medians = {m: {k: statistics.median(v) for k, v in s.items()} for m, s in samples.items()}
    out["median"] = medians
    out["ratio_vs_local"] = {
        m: {k: round(medians[m][k] / medians["local"][k], 3) for k in workloads}
        for m in ("fuse_writeback", "fuse_no_writeback")
    }
    out["samples"] = samples
    out["load_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
