#!/usr/bin/env python3
"""Clones: `fcvm snapshot create` of a running VM and `fcvm snapshot run` of it; JSON.

    python bench/bench_clone.py [--runs 5] [--clones 10] [--mem 512]

In a fresh base directory (guest assets shared): one source VM (busybox httpd, --mem
MiB, default 512) is started and becomes healthy; then

create:    `fcvm snapshot create SOURCE --tag NAME`, wall time (--runs times, a new name
           each) and the snapshot's size on disk.
restore:   clone restore to agent-ready (network-ready -> agent-ready marks of a clone
           run; goal under 150 ms).
cycle:     a whole `fcvm snapshot run --snapshot NAME --exec true` process, and the same
           with `--pid` of a page server serving the snapshot (goal: under 1 s).
parallel:  --clones clones started at once (`snapshot run` without --exec), wall time
           until every one answers an `fcvm exec -- true` (goal: 10 in under 3 s).
memory:    summed PSS of those clones, idle, against one VM's (the source; goal: 10
           clones cost less than 2x one VM).

No assertion on timing; a failed command fails the benchmark (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    ensure_setup,
    fcvm_cmd,
    load_avg,
    own_base,
    records,
    report,
    require_root,
    stats,
    stop,
)

IMAGE = "localhost/fcvm-busybox"
PREFIX = "bench-clone-"
TIMEOUT = 300.0


def fcvm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*fcvm_cmd(), *args], capture_output=True, text=True, timeout=TIMEOUT,
                          env=env)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"fcvm {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*fcvm_cmd(), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip


def wait_healthy(names: list[str]) -> dict[str, dict[str, Any]]:
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        recs = {str(r["name"]): r for r in records(PREFIX)}
        if all(recs.get(n, {}).get("health") == "healthy" for n in names):
            return recs
        time.sleep(0.05)
    raise RuntimeError(f"not healthy in time: {names}")


def pss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) // 1024
    return 0


def timed(*args: str, env: dict[str, str] | None = None) -> tuple[float, dict[str, float]]:
    marks = Path(tempfile.mktemp(prefix="fcvm-bench-marks-"))
    t0 = time.perf_counter()
    fcvm(*args, env={**(env or os.environ), "FCVM_TIMINGS": str(marks)})
    wall = time.perf_counter() - t0
    got = json.loads(marks.read_text()) if marks.exists() else {}
    marks.unlink(missing_ok=True)
    return wall, got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--clones", type=int, default=10)
    ap.add_argument("--mem", type=int, default=512)
    args = ap.parse_args()
    require_root("bench_clone", "guest assets and networking")
    ensure_setup()
    base = own_base("clone")
    out: dict[str, Any] = {"bench": "clone", "runs": args.runs, "clones": args.clones,
                           "mem_mib": args.mem, "nproc": os.cpu_count(),
                           "load_avg_start": load_avg()}  # fmt: skip
    errors: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []
    server = None
    try:
        source = f"{PREFIX}source"
        procs.append(start("podman", "run", "--name", source, "--mem", str(args.mem),
                           "--health-check", "http://127.0.0.1:80/", IMAGE, "--",
                           "httpd", "-f", "-p", "80", "-h", "/www"))  # fmt: skip
        recs = wait_healthy([source])
        time.sleep(1)
        one_vm = pss_mib(int(recs[source]["vmm_pid"]))
        creates = []
        for i in range(args.runs):
            t0 = time.perf_counter()
            fcvm("snapshot", "create", source, "--tag", f"{PREFIX}s{i}")
            creates.append(time.perf_counter() - t0)
        snap = f"{PREFIX}s0"
        sizes = {s["name"]: s["size_bytes"] for s in json.loads(fcvm("snapshots", "--json").stdout)}
        out["create"] = {"wall_s": stats(creates), "size_bytes": sizes.get(snap)}
        for i in range(1, args.runs):
            fcvm("snapshots", "rm", f"{PREFIX}s{i}")
        cycles, restores = [], []
        for _ in range(args.runs):
            wall, marks = timed("snapshot", "run", "--snapshot", snap, "--exec", "true")
            cycles.append(wall)
            restores.append(marks["agent-ready"] - marks["network-ready"])
        server = subprocess.Popen([*fcvm_cmd(), "snapshot", "serve", snap, "--json"],
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert server.stdout is not None
        spid = json.loads(server.stdout.readline())["pid"]
        pid_cycles = [timed("snapshot", "run", "--pid", str(spid), "--exec", "true")[0]
                      for _ in range(args.runs)]  # fmt: skip
        out["restore_to_agent_ready_ms"] = {**stats(restores, 1000, 1), "goal": 150}
        out["cycle_exec_true_s"] = {"snapshot": stats(cycles), "pid": stats(pid_cycles),
                                    "goal": 1.0}  # fmt: skip
        names = [f"{PREFIX}c{i}" for i in range(args.clones)]
        t0 = time.perf_counter()
        clones = [start("snapshot", "run", "--snapshot", snap, "--name", n) for n in names]
        procs += clones
        wait_healthy(names)
        execs = [subprocess.Popen([*fcvm_cmd(), "exec", "--name", n, "--", "true"])
                 for n in names]  # fmt: skip
        if any(e.wait(timeout=TIMEOUT) != 0 for e in execs):
            raise RuntimeError("an exec into a clone failed")
        parallel = time.perf_counter() - t0
        out["parallel"] = {"clones": args.clones, "wall_s": round(parallel, 3), "goal_s": 3.0}
        time.sleep(2)
        recs = {str(r["name"]): r for r in records(PREFIX)}
        pss = [pss_mib(int(recs[n]["vmm_pid"])) for n in names]
        out["memory"] = {"one_vm_pss_mib": one_vm, "clones_pss_mib": pss,
                         "clones_pss_sum_mib": sum(pss),
                         "ratio_sum_to_one_vm": round(sum(pss) / one_vm, 2),
                         "goal_ratio": 2.0}  # fmt: skip
    except (RuntimeError, subprocess.SubprocessError, OSError, KeyError, ValueError) as exc:
        errors.append(str(exc))
    finally:
        stop(*procs)
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        left = records(PREFIX)
        shutil.rmtree(base, ignore_errors=True)
    return report(out, errors, left)


if __name__ == "__main__":
    sys.exit(main())
