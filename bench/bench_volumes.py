#!/usr/bin/env python3
"""A --map volume inside a real VM against the guest's own tmpfs and the host; JSON.

    python bench/bench_volumes.py [--size-mib 256] [--files 2000] [--entries 10000]
                                  [--calls 2000] [--reps 1] [--cpus 1] [--mem 2048]
                                  [--skip-writeback] [--compare-readahead-kb 128]
                                  [--profile]

One VM per cache mode (`no_writeback`, fcvm's default, then `writeback`:
FCVM_WRITEBACK_CACHE=1 in this process, which is the fcvm process: the VM is started
with the Python API, so its VolumeServer threads run here). Its container runs `sleep MARKER` with
`--map HOSTDIR:/data`. Every workload is one `python3` process in the VM's namespace
(`exec --vm`, bench/fsworker.py), on the map as `/proc/PID/root/data` (PID: the
container's sleep; the map is mounted in the container's mount namespace) and on the
guest's /tmp (tmpfs), one after the other; and the same worker on the host on a plain
directory next to HOSTDIR (host native). No process is spawned per file. The VMs boot
cold (snapshot=False: plain guest RAM, and no image-cache entry left behind). An untimed
warm-up first writes and reads the file in both places (QEMU's first touch of fresh
guest RAM would otherwise be charged to whichever place comes first).

  seq_write    --size-mib MiB in 1 MiB writes of one buffer, fsync, close (MiB/s)
  seq_read     that file, in 1 MiB reads, after `sync; echo 3 > drop_caches` in the guest
               (nothing comes from the guest page cache; on the host the map's server and
               the host-native read get the host page cache). Host native also cold:
               posix_fadvise(DONTNEED) of that one file first (host disk).
  small_files  --files x (create + write 100 B + close, stat, unlink) (files/s)
  readdir      os.listdir of --entries empty files after drop_caches (entries/s); for the
               map the entries are made and removed on the host side (untimed)
  roundtrip    --calls x getxattr of a missing user.* name (ENODATA): through the map one
               uncached FUSE request each, so us_per_call is one round trip guest kernel
               -> relay -> virtio-serial -> server -> back; on tmpfs a bare syscall

ratio_map_to_tmpfs = map rate / guest tmpfs rate (goals: seq_write and seq_read >= 0.3,
small_files >= 0.1; none for readdir and roundtrip), ratio_map_to_host = map rate / host
native rate. map_read_ahead_kb: the map's readahead window as the relay left it;
readahead_compare: the map's seq_read again (file written on the host) with the window
set to --compare-readahead-kb (128 = the kernel's FUSE default), against the relay's.

Where the time goes (map only unless said):
  server       requests the VolumeServer handled during the workload, by opcode, and
               busy_s, the wall seconds spent handling them (parse, host syscalls, reply
               send, and any time the host descheduled the thread); busy_share = busy_s /
               the workload's seconds.
  cpu_s.guest  guest CPU seconds during the timed part, by kind (/proc/stat: idle is the
               vCPU waiting for the host), and of fcvm-fuse-relay and the worker.
  cpu_s.host_whole_exec  host CPU seconds over the whole exec (~0.5 s of guest python
               start-up included): the busiest QEMU thread (the TCG vCPU), the other QEMU
               threads (main loop: virtio-serial and chardev I/O), the serving thread.
--profile also runs cProfile on the server threads and prints the top functions to
stderr (the figures are then inflated).

MiB = 2**20 bytes. No assertion on timing; exit 1 on a failed workload (short file,
wrong data, wrong entry count), a map that is not fuse.fcvm, or a VM left behind.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import ensure_setup, load_avg, records, report, require_root

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src")]

import fcvm  # noqa: E402
from fcvm.volumes import server as volserver  # noqa: E402
from fcvm.volumes.protocol import Op  # noqa: E402

IMAGE = "localhost/fcvm-busybox"
PREFIX = "bench-volumes-"
WORKER = (Path(__file__).resolve().parent / "fsworker.py").read_text()
GUEST_TMP = "/tmp/fcvm-bench-volumes"  # the guest's /tmp is a tmpfs
EXEC_TIMEOUT = 3600.0
MiB = 1 << 20
GOALS = {"seq_write": 0.3, "seq_read": 0.3, "small_files": 0.1}


class ServerStats:
    """Requests handled by every VolumeServer of this process, and the time spent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count: Counter[int] = Counter()
        self.busy = 0.0
        self.profiles: list[cProfile.Profile] = []
        self.tids: list[int] = []  # the serving threads (for their CPU time)

    def snapshot(self) -> tuple[Counter[int], float]:
        with self.lock:
            return Counter(self.count), self.busy

    def since(self, before: tuple[Counter[int], float], seconds: float) -> dict[str, Any]:
        count, busy = self.snapshot()
        diff = count - before[0]
        by_op = {_opname(op): n for op, n in diff.most_common()}
        return {
            "requests": sum(diff.values()),
            "by_op": by_op,
            "busy_s": round(busy - before[1], 3),
            "busy_share": round((busy - before[1]) / seconds, 3) if seconds else None,
        }

    def install(self, profile: bool) -> None:
        handle = volserver.VolumeServer._handle
        serve = volserver.VolumeServer.serve
        stats = self

        def counted(self: Any, hdr: Any, body: Any, ops: Any) -> None:
            t0 = time.perf_counter()
            try:
                handle(self, hdr, body, ops)
            finally:
                dt = time.perf_counter() - t0
                with stats.lock:
                    stats.count[hdr.opcode] += 1
                    stats.busy += dt

        def served(self: Any, sock: Any) -> None:
            with stats.lock:
                stats.tids.append(threading.get_native_id())
            prof = cProfile.Profile() if profile else None
            if prof is not None:
                prof.enable()
            try:
                serve(self, sock)
            finally:
                if prof is not None:
                    prof.disable()
                with stats.lock:
                    stats.tids.remove(threading.get_native_id())
                    if prof is not None:
                        stats.profiles.append(prof)

        volserver.VolumeServer._handle = counted  # type: ignore[method-assign]
        volserver.VolumeServer.serve = served  # type: ignore[method-assign]


def host_cpu(qemu_pid: int, server_tids: list[int]) -> dict[str, float]:
    """CPU seconds so far of each QEMU thread kind (by thread name: the TCG vCPU
    threads, the main loop, ...) and of the serving threads of this process."""
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}

    def add(key: str, stat_path: str) -> None:
        try:
            st = Path(stat_path).read_text()
        except OSError:
            return
        f = st.rsplit(")", 1)[1].split()
        out[key] = out.get(key, 0.0) + (int(f[11]) + int(f[12])) / hz

    for task in Path(f"/proc/{qemu_pid}/task").iterdir():
        add(f"qemu:{task.name}", str(task / "stat"))
    for tid in server_tids:
        add("server_thread", f"/proc/self/task/{tid}/stat")
    return out


def cpu_diff(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """CPU seconds meanwhile: the busiest QEMU thread (the TCG vCPU), the other QEMU
    threads together (main loop: virtio and chardev I/O), the serving threads."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    qemu = sorted((v for k, v in d.items() if k.startswith("qemu:")), reverse=True)
    return {"exec_wall": round(wall, 2), "qemu_vcpu": round(qemu[0] if qemu else 0.0, 2),
            "qemu_other": round(sum(qemu[1:]), 2),
            "server_thread": round(d.get("server_thread", 0.0), 2)}  # fmt: skip


def _opname(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return str(op)


def host_worker(op: str, d: Path | str, n: int = 0, *flags: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", WORKER, op, str(d), str(n), *flags],
                          capture_output=True, text=True, timeout=EXEC_TIMEOUT)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"host {op} {d}: {proc.stderr.strip()}")
    return dict(json.loads(proc.stdout))


def guest_worker(vm: fcvm.VM, op: str, d: str, n: int = 0, *flags: str) -> dict[str, Any]:
    r = vm.exec(["python3", "-c", WORKER, op, d, str(n), *flags], vm=True, timeout=EXEC_TIMEOUT)
    if r.exit_code != 0:
        raise RuntimeError(f"guest {op} {d}: exit {r.exit_code}: {r.stderr_text.strip()}")
    return dict(json.loads(r.stdout))


def rate(res: dict[str, Any]) -> dict[str, Any]:
    s = float(res["seconds"])
    if "bytes" in res:
        return {"seconds": round(s, 4), "mib_s": round(res["bytes"] / MiB / s, 2)}
    n = res.get("files", res.get("entries", res.get("calls")))
    out = {"seconds": round(s, 4), "ops_s": round(float(n) / s, 1)}
    if "calls" in res:
        out["us_per_call"] = round(s / n * 1e6, 1)
    return out


def rate_of(r: dict[str, Any]) -> float:
    return float(r.get("mib_s", r.get("ops_s", 0.0)))


def median_result(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The sample with the median rate (the lower middle one), plus all rates."""
    ordered = sorted(samples, key=rate_of)
    out = dict(ordered[(len(ordered) - 1) // 2])
    if len(samples) > 1:
        out["samples"] = [rate_of(s) for s in samples]
    return out


def bench_host(native: Path, args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, list[dict[str, Any]]] = {k: [] for k in
                                            ("seq_write", "seq_read", "seq_read_cold",
                                             "small_files", "readdir", "roundtrip")}  # fmt: skip
    for _ in range(args.reps):
        res["seq_write"].append(rate(host_worker("seq_write", native, args.size_mib)))
        res["seq_read"].append(rate(host_worker("seq_read", native, args.size_mib)))
        host_worker("seq_write", native, args.size_mib)
        res["seq_read_cold"].append(rate(host_worker("seq_read", native, args.size_mib,
                                                     "--fadvise")))  # fmt: skip
        res["small_files"].append(rate(host_worker("small_files", native, args.files)))
        host_worker("mkmany", native, args.entries)
        res["readdir"].append(rate(host_worker("readdir", native, args.entries)))
        res["roundtrip"].append(rate(host_worker("roundtrip", native, args.calls)))
        host_worker("rmmany", native, args.entries)
    return {k: median_result(v) for k, v in res.items()}


def bench_vm(mode: str, backing: Path, host: dict[str, Any], args: argparse.Namespace,
             stats: ServerStats) -> dict[str, Any]:  # fmt: skip
    marker = str(900000 + os.getpid() % 99999)
    os.environ.pop("FCVM_NO_WRITEBACK_CACHE", None)
    if mode == "writeback":
        os.environ["FCVM_WRITEBACK_CACHE"] = "1"
    else:
        os.environ.pop("FCVM_WRITEBACK_CACHE", None)
    t0 = time.perf_counter()
    vm = fcvm.start(IMAGE, ["sleep", marker], name=f"{PREFIX}{mode}", cpus=args.cpus,
                    mem=args.mem, maps=[f"{backing}:/data"], snapshot=False)  # fmt: skip
    out: dict[str, Any] = {"vm_start_s": round(time.perf_counter() - t0, 2)}
    try:
        os.environ.pop("FCVM_WRITEBACK_CACHE", None)
        rec = records(f"{PREFIX}{mode}", exact=True)
        if not rec:
            raise RuntimeError(f"{PREFIX}{mode} is not in fcvm ls")
        qemu_pid = int(rec[0]["vmm_pid"])
        pid = guest_worker(vm, "findpid", marker)["pid"]
        mapdir = f"/proc/{pid}/root/data"
        vm.exec(["mkdir", "-p", GUEST_TMP], vm=True, check=True)
        out["fs"] = {"map": guest_worker(vm, "fstype", mapdir),
                     "guest_tmpfs": guest_worker(vm, "fstype", GUEST_TMP)}  # fmt: skip
        if (out["fs"]["map"]["fstype"], out["fs"]["guest_tmpfs"]["fstype"]) != (
            "fuse.fcvm",
            "tmpfs",
        ):
            raise RuntimeError(f"unexpected filesystems: {out['fs']}")
        ra_kb = guest_worker(vm, "readahead", mapdir)["read_ahead_kb"]
        out["map_read_ahead_kb"] = ra_kb
        ra_compare: list[dict[str, Any]] = []
        names = ("seq_write", "seq_read", "small_files", "readdir", "roundtrip")
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {
            w: {"guest_tmpfs": [], "map": []} for w in names
        }
        servers: dict[str, list[dict[str, Any]]] = {w: [] for w in names}

        cpu: dict[str, dict[str, list[dict[str, Any]]]] = {
            w: {"guest_tmpfs": [], "map": []} for w in names}  # fmt: skip

        def one(where: str, workload: str, op: str, n: int, *flags: str) -> None:
            d = mapdir if where == "map" else GUEST_TMP
            before = stats.snapshot()
            with stats.lock:
                tids = list(stats.tids)
            host_before = host_cpu(qemu_pid, tids)
            t0 = time.perf_counter()
            res = guest_worker(vm, op, d, n, *flags, "--cpu")
            wall = time.perf_counter() - t0
            samples[workload][where].append(rate(res))
            cpu[workload][where].append(
                {
                    "guest": res["cpu_s"],
                    "host_whole_exec": cpu_diff(host_before, host_cpu(qemu_pid, tids), wall),
                }
            )
            if where == "map":
                servers[workload].append(stats.since(before, float(res["seconds"])))

        # Warm-up (untimed): touch the guest memory the workloads will use, so neither
        # place pays QEMU's first-touch faults of fresh guest RAM.
        for d in (GUEST_TMP, mapdir):
            guest_worker(vm, "seq_write", d, args.size_mib)
            guest_worker(vm, "seq_read", d, args.size_mib)

        for _ in range(args.reps):
            for where in ("guest_tmpfs", "map"):
                one(where, "seq_write", "seq_write", args.size_mib)
                if where == "map" and (backing / "seq").stat().st_size != args.size_mib * MiB:
                    raise RuntimeError("the map's file on the host has the wrong size")
                one(where, "seq_read", "seq_read", args.size_mib, "--drop")
            if args.compare_readahead_kb:
                # The same read at another readahead window (128: the kernel's default,
                # which the relay raises), the file written on the host side.
                host_worker("seq_write", backing, args.size_mib)
                guest_worker(vm, "readahead", mapdir, args.compare_readahead_kb)
                before = stats.snapshot()
                try:
                    res = guest_worker(vm, "seq_read", mapdir, args.size_mib, "--drop")
                finally:
                    guest_worker(vm, "readahead", mapdir, ra_kb)
                ra_compare.append({**rate(res), "server": stats.since(before, res["seconds"])})
            for where in ("guest_tmpfs", "map"):
                one(where, "small_files", "small_files", args.files)
            for where in ("guest_tmpfs", "map"):
                if where == "map":
                    host_worker("mkmany", backing, args.entries)
                else:
                    guest_worker(vm, "mkmany", GUEST_TMP, args.entries)
                one(where, "readdir", "readdir", args.entries, "--drop")
                if where == "map":
                    host_worker("rmmany", backing, args.entries)
                else:
                    guest_worker(vm, "rmmany", GUEST_TMP, args.entries)
            for where in ("guest_tmpfs", "map"):
                one(where, "roundtrip", "roundtrip", args.calls)
        workloads: dict[str, Any] = {}
        for w in names:
            m = median_result(samples[w]["map"])
            t = median_result(samples[w]["guest_tmpfs"])
            h = host[w]
            entry: dict[str, Any] = {
                "map": m,
                "guest_tmpfs": t,
                "host_native": h,
                "ratio_map_to_tmpfs": round(rate_of(m) / rate_of(t), 3),
                "ratio_map_to_host": round(rate_of(m) / rate_of(h), 4),
            }
            if w in GOALS:
                entry["goal_map_to_tmpfs"] = GOALS[w]
                entry["goal_met"] = entry["ratio_map_to_tmpfs"] >= GOALS[w]
            if w == "seq_read":
                entry["host_native_cold"] = host["seq_read_cold"]
            entry["server"] = servers[w][0] if len(servers[w]) == 1 else servers[w]
            entry["cpu_s"] = {k: v[0] if len(v) == 1 else v for k, v in cpu[w].items()}
            workloads[w] = entry
        out["workloads"] = workloads
        if ra_compare:
            other = median_result(ra_compare)
            out["readahead_compare"] = {
                "map_seq_read_at_kb": {str(ra_kb): rate_of(workloads["seq_read"]["map"]),
                                       str(args.compare_readahead_kb): rate_of(other)},
                f"map_seq_read_at_{args.compare_readahead_kb}_kb": other,
                "ratio": round(rate_of(workloads["seq_read"]["map"]) / rate_of(other), 2),
            }  # fmt: skip
    finally:
        t0 = time.perf_counter()
        vm.stop()
        out["vm_stop_s"] = round(time.perf_counter() - t0, 2)
    return out


def print_profiles(stats: ServerStats, mode: str) -> None:
    with stats.lock:
        profiles, stats.profiles = stats.profiles, []
    for prof in profiles:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        print(f"==== server profile, {mode} ====\n{buf.getvalue()}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--entries", type=int, default=10000)
    ap.add_argument("--calls", type=int, default=2000, help="getxattr calls (roundtrip)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--mem", type=int, default=2048, help="guest MiB (its /tmp holds the file)")
    ap.add_argument("--skip-writeback", action="store_true",
                    help="only fcvm's default (no writeback cache)")  # fmt: skip
    ap.add_argument(
        "--compare-readahead-kb",
        type=int,
        default=128,
        help="also read the map with this readahead window (0: don't)",
    )
    ap.add_argument("--profile", action="store_true", help="cProfile the server threads")
    args = ap.parse_args()
    require_root("bench_volumes", "guest assets, networking and drop_caches in the guest")
    setup_s = ensure_setup()
    out: dict[str, Any] = {
        "bench": "volumes", "image": IMAGE, "size_mib": args.size_mib, "files": args.files,
        "entries": args.entries, "calls": args.calls, "reps": args.reps, "guest_cpus": args.cpus,
        "guest_mem_mib": args.mem, "nproc": os.cpu_count(), "profiled": args.profile,
        "setup_s": round(setup_s, 2), "load_avg_start": load_avg(),
    }  # fmt: skip
    errors: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="fcvm-bench-volumes-"))
    stats = ServerStats()
    stats.install(args.profile)
    try:
        native = base / "native"
        native.mkdir()
        out["host_fs"] = host_worker("fstype", base)
        out["host_native"] = bench_host(native, args)
        modes = ["no_writeback"] + ([] if args.skip_writeback else ["writeback"])
        for mode in modes:
            backing = base / f"map-{mode}"
            backing.mkdir()
            out[mode] = bench_vm(mode, backing, out["host_native"], args, stats)
            out[mode]["load_avg"] = load_avg()
            if args.profile:
                print_profiles(stats, mode)
        out["goals"] = {
            mode: {w: {"ratio": out[mode]["workloads"][w]["ratio_map_to_tmpfs"], "goal": g,
                       "met": out[mode]["workloads"][w]["goal_met"]}
                   for w, g in GOALS.items()}
            for mode in modes
        }  # fmt: skip
        out["summary"] = summary(out, modes)
    except (RuntimeError, fcvm.FcvmError, subprocess.SubprocessError, OSError, KeyError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        left = records(PREFIX)
        shutil.rmtree(base, ignore_errors=True)
    return report(out, errors, left)


def summary(out: dict[str, Any], modes: list[str]) -> dict[str, Any]:
    """One line per workload and place: the rate (MiB/s or ops/s)."""
    rows: dict[str, Any] = {}
    for w in ("seq_write", "seq_read", "small_files", "readdir", "roundtrip"):
        row: dict[str, Any] = {"host_native": rate_of(out["host_native"][w])}
        for mode in modes:
            e = out[mode]["workloads"][w]
            row[f"{mode}.guest_tmpfs"] = rate_of(e["guest_tmpfs"])
            row[f"{mode}.map"] = rate_of(e["map"])
            row[f"{mode}.map_to_tmpfs"] = e["ratio_map_to_tmpfs"]
        rows[w] = row
    return rows


if __name__ == "__main__":
    sys.exit(main())
