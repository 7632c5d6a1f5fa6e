#!/usr/bin/env python3
"""The container storage disk (--disk-size): making it, and I/O on it in a VM; JSON.

    python bench/bench_storage.py [--runs 5] [--sizes 8G,100G] [--size-mib 256]
                                  [--files 2000] [--reps 1] [--mem 2048] [--skip-ram]

make_blank  host only: fcvm.machine.disks.make_blank (a sparse file + mkfs.ext4 without
            journal, lazy inode tables), --runs times per size: milliseconds, and the
            bytes it allocates on the host (st_blocks) against its apparent size.
vm          one VM per --disk-size (the default, 8G, then `ram`: podman storage in
            guest RAM), booted cold (snapshot=False: a blank disk from make_blank, no
            image-cache entry left behind), its container running `sleep MARKER`.
            Every workload is one python3 process in the VM's namespace (`exec --vm`,
            bench/fsworker.py), in the container's root filesystem
            (/proc/PID/root/var/tmp: the overlay whose upper layer is on the disk, or
            in guest RAM with `ram`) and on the VM's /dev/shm (tmpfs, RAM; the
            container's own /dev/shm is 64 MB), one after the other, after an untimed
            warm-up write+read on /dev/shm (QEMU's first touch of fresh guest RAM):
              seq_write    --size-mib MiB in 1 MiB writes, fsync, close (MiB/s)
              seq_read     that file after `sync; echo 3 > drop_caches` (MiB/s; from
                           the disk through virtio-blk, which QEMU serves from the host
                           page cache: -drive's default cache=writeback)
              small_files  --files x (create + write 100 B + close, stat, unlink)
            ratio_rootfs_to_shm = rootfs rate / /dev/shm rate; cpu_s: guest CPU seconds
            by kind during the timed part (fsworker.py --cpu). disk_file: the VM's disk
            file on the host after the workloads (allocated bytes: the guest mounts it
            with discard on QEMU, so what the workloads deleted is given back).

MiB = 2**20 bytes. No assertion on timing; exit 1 on a failed workload or a VM left
behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ensure_setup, load_avg, records, report, require_root

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src")]

from bench_volumes import guest_worker, median_result, rate, rate_of  # noqa: E402

import fcvm  # noqa: E402
from fcvm.machine.disks import make_blank  # noqa: E402
from fcvm.plan import parse_disk_size  # noqa: E402

IMAGE = "localhost/fcvm-busybox"
PREFIX = "bench-storage-"
SHM = "/dev/shm/fcvm-bench-storage"


def bench_make_blank(sizes: list[str], runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    top = Path(tempfile.mkdtemp(prefix="fcvm-bench-storage-"))
    try:
        for text in sizes:
            size = parse_disk_size(text)
            assert size
            times, alloc = [], 0
            for i in range(runs):
                path = top / f"disk-{text}-{i}"
                t0 = time.perf_counter()
                make_blank(path, size)
                times.append(time.perf_counter() - t0)
                alloc = path.stat().st_blocks * 512
                path.unlink()
            out[text] = {"ms": {"median": round(statistics.median(times) * 1000, 1),
                                "min": round(min(times) * 1000, 1),
                                "max": round(max(times) * 1000, 1),
                                "samples": [round(t * 1000, 1) for t in times]},
                         "apparent_bytes": size, "allocated_bytes": alloc}  # fmt: skip
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return out


def disk_files(vm: fcvm.VM) -> dict[str, Any]:
    """The VM's writable disks on the host (apparent and allocated bytes), if reachable."""
    machine = getattr(getattr(getattr(vm._avm, "_core", None), "run", None), "machine", None)
    out: dict[str, Any] = {}
    for name, path in (getattr(machine, "disks", None) or {}).items():
        with_blocks = Path(path).stat()
        out[name] = {"apparent_bytes": with_blocks.st_size,
                     "allocated_bytes": with_blocks.st_blocks * 512}  # fmt: skip
    return out


def bench_vm(disk: str, args: argparse.Namespace) -> dict[str, Any]:
    marker = str(800000 + os.getpid() % 99999)
    name = f"{PREFIX}{disk.lower()}"
    t0 = time.perf_counter()
    vm = fcvm.start(IMAGE, ["sleep", marker], name=name, mem=args.mem, disk_size=disk,
                    snapshot=False)  # fmt: skip
    out: dict[str, Any] = {"disk_size": disk, "vm_start_s": round(time.perf_counter() - t0, 2)}
    try:
        pid = guest_worker(vm, "findpid", marker)["pid"]
        rootfs = f"/proc/{pid}/root/var/tmp"
        vm.exec(["mkdir", "-p", "/var/tmp"], check=True)
        vm.exec(["mkdir", "-p", SHM], vm=True, check=True)
        storage = vm.exec(["sh", "-c", "grep -m1 ' /var/lib/containers ' /proc/mounts"
                                      " || grep -m1 ' / ' /proc/mounts"],
                          vm=True).stdout_text.split()  # fmt: skip
        out["fs"] = {"rootfs": guest_worker(vm, "fstype", rootfs),
                     "podman_storage": " ".join(storage[:3]),
                     "vm_shm": guest_worker(vm, "fstype", SHM)}  # fmt: skip
        places = {"rootfs": rootfs, "vm_shm": SHM}
        names = ("seq_write", "seq_read", "small_files")
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {
            w: {p: [] for p in places} for w in names}  # fmt: skip
        cpu: dict[str, dict[str, list[Any]]] = {w: {p: [] for p in places} for w in names}

        def one(place: str, workload: str, n: int, *flags: str) -> None:
            res = guest_worker(vm, workload, places[place], n, *flags, "--cpu")
            samples[workload][place].append(rate(res))
            cpu[workload][place].append(res["cpu_s"])

        # Warm-up (untimed): QEMU's first touch of fresh guest RAM is not the disk's.
        guest_worker(vm, "seq_write", SHM, args.size_mib)
        guest_worker(vm, "seq_read", SHM, args.size_mib)
        for _ in range(args.reps):
            for place in places:
                one(place, "seq_write", args.size_mib)
                one(place, "seq_read", args.size_mib, "--drop")
            for place in places:
                one(place, "small_files", args.files)
        workloads: dict[str, Any] = {}
        for w in names:
            r, s = median_result(samples[w]["rootfs"]), median_result(samples[w]["vm_shm"])
            workloads[w] = {"rootfs": r, "vm_shm": s,
                            "ratio_rootfs_to_shm": round(rate_of(r) / rate_of(s), 3),
                            "cpu_s": {k: v[0] if len(v) == 1 else v
                                      for k, v in cpu[w].items()}}  # fmt: skip
        out["workloads"] = workloads
        out["disk_file"] = disk_files(vm)
    finally:
        t0 = time.perf_counter()
        vm.stop()
        out["vm_stop_s"] = round(time.perf_counter() - t0, 2)
    out["load_avg"] = load_avg()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="make_blank runs per size")
    ap.add_argument("--sizes", default="8G,100G")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--mem", type=int, default=2048, help="guest MiB (/dev/shm holds the file)")
    ap.add_argument("--skip-ram", action="store_true", help="no --disk-size ram VM")
    args = ap.parse_args()
    require_root("bench_storage", "guest assets, networking and drop_caches in the guest")
    out: dict[str, Any] = {
        "bench": "storage", "image": IMAGE, "size_mib": args.size_mib, "files": args.files,
        "reps": args.reps, "guest_mem_mib": args.mem, "nproc": os.cpu_count(),
        "load_avg_start": load_avg(),
    }  # fmt: skip
    errors: list[str] = []
    try:
        out["make_blank"] = bench_make_blank(args.sizes.split(","), args.runs)
        out["setup_s"] = round(ensure_setup(), 2)
        out["vm"] = {}
        for disk in ["8G"] + ([] if args.skip_ram else ["ram"]):
            out["vm"][disk] = bench_vm(disk, args)
        out["summary"] = {
            w: {f"{d}.{p}": rate_of(v["workloads"][w][p])
                for d, v in out["vm"].items() for p in ("rootfs", "vm_shm")}
            for w in ("seq_write", "seq_read", "small_files")
        }  # fmt: skip
    except (RuntimeError, fcvm.FcvmError, subprocess.SubprocessError, OSError, KeyError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        left = records(PREFIX)
    return report(out, errors, left)


if __name__ == "__main__":
    sys.exit(main())
