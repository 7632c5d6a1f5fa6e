"""Benchmark: the userfaultfd page server against a C handler and plain anonymous faults.

One run measures, for a memory file (default 512 MiB of random bytes) touched once per
page sequentially and in random order by a Firecracker-side driver process
(tests/host/uffd_driver.py):

  anon        first-touch faults on plain anonymous memory (no userfaultfd): the floor
  c_page      bench/uffd_handler.c, page-at-a-time UFFDIO_COPY (compiled here with gcc)
  py_page     `fcvm snapshot serve --block-size 4 --no-prefetch`
  py_block64  `fcvm snapshot serve --block-size 64 --no-prefetch`
  py_prefetch `fcvm snapshot serve --block-size 64` after one VM recorded the working set
              (the whole file): measured from the handshake to the last page touched
  py_huge2m   the py_page server with the driver's memory in 2 MiB hugetlb pages
              (Firecracker's huge_pages "2M"; needs root to reserve them, given back
              after): informational, no goal - it shows what larger pages buy
  copy_floor  no faults at all: UFFDIO_COPY of the whole file into a registered anonymous
              mapping of this process, 4 MiB per ioctl from a populated source mapping
              (page allocation + copy: the ceiling for block serving), by one thread
              and by two (copy_floor_2_threads: the ceiling for prefetch, which copies
              with two threads on two CPUs)

The driver touches with a tiny C loop (tests/host/uffd_driver.py compiles it with gcc)
so the figures measure faults, not a Python loop (~0.2 us/page sequential, ~0.5 us/page
random over 512 MiB); without gcc it falls back to the Python loop (reported as
"toucher").

Every configuration is measured in two placements (placements()): the server's
fault-serving thread on one CPU and the faulting thread on another (`cross_cpu`), and
both on one (`same_cpu`); the JSON has one block per placement. Rates are pages/s (median
of --repeat runs; every run's bytes are verified against the file). Ratios are
against c_page with the same access pattern and placement: for each repetition the
rate divided by c_page's rate measured moments before, then the median.
`c_page_us_per_fault` is the C handler's time per fault as the toucher sees it (round
trip + one copy); `ceiling_x_c_page` is the block and prefetch ratio the copy floor
allows at that round trip (see ceilings()). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "host" / "uffd_driver.py"
C_SOURCE = REPO / "bench" / "uffd_handler.c"
SNAPSHOT = "bench"
PATTERNS = ("seq", "random")
GOALS = {"py_page": 0.8, "py_block64": 5.0, "py_prefetch": 20.0}
COPY_CHUNK = 4 << 20
HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
# Driver flags per configuration (the others take none), and configurations that use
# another one's server.
DRIVER_ARGS = {"py_huge2m": ["--huge"]}
SHARES_SERVER = {"py_huge2m": "py_page"}


def placements() -> dict[str, tuple[int, int]]:
    """Name -> (CPU of the server's fault-serving thread, CPU of the faulting thread).

    A fault's round trip is two wakeups; across CPUs each is an IPI to a halted vCPU,
    which on this VM host costs tens of microseconds (C: ~60 us per fault, against ~4 us
    on one CPU). Left to the scheduler, the two land on one CPU or on two and switch
    every minute or so, which made single runs swing 0.5x-2.4x; pinned, each placement
    is reproducible."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {"same_cpu": (cpus[0], cpus[0])}
    return {"cross_cpu": (cpus[0], cpus[1]), "same_cpu": (cpus[0], cpus[0])}


def copy_floor(memory: Path, threads: int = 1) -> float:
    """Pages/s of UFFDIO_COPY with no fault round trip: the whole file, 4 MiB per ioctl,
    by `threads` threads taking the pieces in turn (fcntl.ioctl drops the GIL)."""
    import ctypes
    import mmap
    import threading

    from fcvm.snapshot import uffd
    from fcvm.snapshot.source import MADV_POPULATE_READ
    from fcvm.snapshot.source import libc as _libc

    size = memory.stat().st_size
    libc = _libc()
    fd = os.open(memory, os.O_RDONLY)
    src = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    os.close(fd)
    dst = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)  # fmt: skip
    ufd = uffd.create()
    try:
        libc.madvise(ctypes.c_void_p(src), ctypes.c_size_t(size), MADV_POPULATE_READ)
        uffd.api(ufd)
        uffd.register(ufd, dst, size)
        errors: list[int] = []

        def work(first: int) -> None:
            res = uffd.Resolver()
            for off in range(first * COPY_CHUNK, size, threads * COPY_CHUNK):
                n = min(COPY_CHUNK, size - off)
                _, err = res.copy(ufd, dst + off, src + off, n, uffd.UFFDIO_COPY_MODE_DONTWAKE)
                if err:
                    errors.append(err)
                    return

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        t0 = time.perf_counter()
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        elapsed = time.perf_counter() - t0
        if errors:
            raise OSError(errors[0], "UFFDIO_COPY")
        return size / 4096 / elapsed
    finally:
        os.close(ufd)
        libc.munmap(ctypes.c_void_p(dst), size)
        libc.munmap(ctypes.c_void_p(src), size)


def ceilings(c_page: dict[str, list[float]], floor1: float, floor2: float) -> dict[str, Any]:
    """What the kernel allows in this run, as multiples of c_page: the ratios a server
    could reach if it answered each fault exactly as fast as the C handler does.
    Block serving: one C-fast round trip per 16 pages, 15 of them more at the
    one-thread copy floor. Prefetch: the two-thread copy floor (no faults at all).
    The goals are ratios to c_page, so they are reachable only when a C round trip
    is slow enough: these say whether they were in this run."""
    out: dict[str, Any] = {"c_page_us_per_fault": {}, "ceiling_x_c_page": {}}
    for p, rates in c_page.items():
        c = statistics.median(rates)
        out["c_page_us_per_fault"][p] = round(1e6 / c, 1)
        block = 16 / (1 / c + 15 / floor1)
        out["ceiling_x_c_page"][p] = {
            "py_block64": round(block / c, 2),
            "py_prefetch": round(floor2 / c, 2),
        }
    return out


def place(pid: int, cpu: int) -> None:
    """Pin a server's fault-serving thread (its main thread: the C handler has no
    other, the Python server answers faults on it) to `cpu`; its other threads
    (prefetch, source population) may run on any CPU."""
    anywhere = os.sched_getaffinity(0)
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), {cpu} if int(task) == pid else anywhere)


def reserve_hugepages(count: int) -> tuple[int | None, str]:
    """Add `count` 2 MiB hugetlb pages to the pool; (the previous count, "") or
    (None, why not)."""
    if os.geteuid() != 0:
        return None, "reserving hugetlb pages needs root"
    before = int(HUGEPAGES.read_text())
    HUGEPAGES.write_text(f"{before + count}\n")
    if int(HUGEPAGES.read_text()) < before + count:
        HUGEPAGES.write_text(f"{before}\n")
        return None, f"the kernel could not reserve {count} hugetlb pages"
    return before, ""


def summarize(
    samples: dict[str, dict[str, list[float]]],
    pair_ratios: dict[str, dict[str, list[float]]],
    floor1: float,
    floor2: float,
) -> dict[str, Any]:
    """One placement's rates, ratios, goals, ceilings and raw samples."""
    ratios = {
        name: {p: round(statistics.median(v), 2) for p, v in by.items()}
        for name, by in pair_ratios.items()
    }
    return {
        "rates": {
            name: {p: round(statistics.median(v)) for p, v in by.items()}
            for name, by in samples.items()
        },
        "ratio_vs_c_page": ratios,
        "goals_met": {
            name: {"goal_x_c_page": goal, **{p: ratios[name][p] >= goal for p in PATTERNS}}
            for name, goal in GOALS.items()
        },
        **ceilings(samples["c_page"], floor1, floor2),
        "samples": {
            n: {p: [round(x) for x in v] for p, v in by.items()} for n, by in samples.items()
        },
    }


def make_memory(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n
    with open(path, "rb") as f:  # warm the page cache
        while f.read(16 << 20):
            pass


def run_driver(
    sock: Path | None,
    memory: Path,
    pattern: str,
    seed: int,
    extra: list[str] | None = None,
    cpu: int | None = None,
) -> dict[str, Any]:
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    cmd = [*pin, sys.executable, str(DRIVER), "--memory", str(memory), "--pattern", pattern]
    cmd += ["--seed", str(seed), *(extra or [])]
    cmd += ["--anon"] if sock is None else ["--socket", str(sock)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"driver failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if out.get("mismatched_pages"):
        raise RuntimeError(f"driver saw {out['mismatched_pages']} wrong pages: {out}")
    return out


class Server:
    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server {cmd} did not start")
        self.info = json.loads(line) if line.startswith("{") else {}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, help="default: a temporary directory, removed")
    args = ap.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]

    work = args.workdir or Path(tempfile.mkdtemp(prefix="fcvm-bench-ps-"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    env = {**os.environ, "FCVM_BASE_DIR": str(base), "PYTHONPATH": str(REPO / "src")}
    env.pop("FCVM_LOG", None)
    hugepages_before: int | None = None
    try:
        sys.path.insert(0, str(REPO / "src"))
        os.environ["FCVM_BASE_DIR"] = str(base)
        from fcvm.snapshot import layout

        snap = layout.layout(SNAPSHOT)
        size = args.size_mib << 20
        snap.dir.mkdir(parents=True, exist_ok=True)
        make_memory(snap.memory, size)
        layout.save_meta(snap, layout.SnapshotMeta(name=SNAPSHOT, memory_size=size))
        handler = work / "uffd_handler"
        subprocess.run(["gcc", "-O2", "-o", str(handler), str(C_SOURCE)], check=True)

        # One server per configuration, all running for the whole benchmark (each its
        # own snapshot sharing the memory file by hard link), so the runs of one
        # repetition follow each other closely and ratios are taken pairwise: this
        # host's speed drifts a lot under other load.
        py = [sys.executable, "-m", "fcvm", "snapshot", "serve", "--json"]
        c_sock = work / "c.sock"
        configs: dict[str, list[str] | None] = {
            "anon": None,
            "c_page": [str(handler), str(c_sock), str(snap.memory)],
            "py_page": [*py, "page", "--block-size", "4", "--no-prefetch", "--no-record"],
            "py_block64": [*py, "block64", "--block-size", "64", "--no-prefetch", "--no-record"],
            "py_prefetch": [*py, "prefetch", "--block-size", "64"],
        }
        # Informational, not a goal: the py_page server with the guest memory in 2 MiB
        # hugetlb pages (Firecracker's huge_pages "2M"): one whole-huge-page copy per fault.
        hugepages_before, huge_skipped = reserve_hugepages(size // (2 << 20) + 8)
        if hugepages_before is not None:
            configs["py_huge2m"] = None
        for name in ("page", "block64", "prefetch"):
            other = layout.layout(name)
            other.dir.mkdir(parents=True, exist_ok=True)
            os.link(snap.memory, other.memory)
            layout.save_meta(other, layout.SnapshotMeta(name=name, memory_size=size))
        # Where the fault-serving thread and the faulting thread run: see placements().
        where_cpus = placements()
        samples: dict[str, dict[str, dict[str, list[float]]]] = {
            where: {name: {p: [] for p in PATTERNS} for name in configs} for where in where_cpus
        }
        pair_ratios: dict[str, dict[str, dict[str, list[float]]]] = {
            where: {name: {p: [] for p in PATTERNS} for name in configs if name != "c_page"}
            for where in where_cpus
        }
        floor: list[float] = []
        floor2: list[float] = []
        toucher: set[str] = set()
        servers: dict[str, Server] = {}
        socks: dict[str, Path | None] = {"anon": None}
        try:
            for name, cmd in configs.items():
                if cmd is not None:
                    servers[name] = Server(cmd, env)
                    socks[name] = Path(servers[name].info.get("socket", c_sock))
            for name, owner in SHARES_SERVER.items():
                if name in configs:
                    socks[name] = socks[owner]
            if "py_huge2m" in configs:
                # A fresh pool's pages are slow on first use (this VM host reclaims free
                # memory: page_reporting), ~10x on one pass; later VMs reuse the pool.
                run_driver(socks["py_huge2m"], snap.memory, "random", 98, ["--huge"])
            # The prefetch server's first VM records the working set (the whole file);
            # the second starts its prefetch threads (unpinned from then on).
            run_driver(socks["py_prefetch"], snap.memory, "random", 99)
            run_driver(socks["py_prefetch"], snap.memory, "none", 99)
            for rep in range(args.repeat):
                floor.append(copy_floor(snap.memory))
                floor2.append(copy_floor(snap.memory, threads=2))
                for where, (server_cpu, vm_cpu) in where_cpus.items():
                    for server in servers.values():
                        place(server.proc.pid, server_cpu)
                    for pattern in PATTERNS:
                        got = {}
                        for name in configs:
                            out = run_driver(socks[name], snap.memory, pattern, rep,
                                             DRIVER_ARGS.get(name), vm_cpu)  # fmt: skip
                            got[name] = out["touched"] / out["connect_to_done_seconds"]
                            toucher.add(out.get("toucher", "python"))
                            samples[where][name][pattern].append(got[name])
                        for name in pair_ratios[where]:
                            pair_ratios[where][name][pattern].append(got[name] / got["c_page"])
        finally:
            for server in servers.values():
                server.stop()

        f1, f2 = statistics.median(floor), statistics.median(floor2)
        result = {
            "benchmark": "pageserver",
            "memory_mib": args.size_mib,
            "pages": size // 4096,
            "repeat": args.repeat,
            "unit": "pages/s (median)",
            "ratio_note": "median over repetitions of (rate / c_page rate of the same repetition)",
            "placements": {
                where: {
                    "server_cpu_vm_cpu": list(where_cpus[where]),
                    **summarize(samples[where], pair_ratios[where], f1, f2),
                }
                for where in where_cpus
            },
            "copy_floor": {
                "pages_per_s": round(f1),
                "samples": [round(x) for x in floor],
            },
            "copy_floor_2_threads": {
                "pages_per_s": round(statistics.median(floor2)),
                "samples": [round(x) for x in floor2],
            },
            "toucher": sorted(toucher),
            "py_huge2m_skipped": huge_skipped or None,
            "load_before": load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "host": {"cpus": os.cpu_count(), "kernel": os.uname().release, "time": time.time()},
        }
        print(json.dumps(result, indent=1))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        if hugepages_before is not None:
            HUGEPAGES.write_text(f"{hugepages_before}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
