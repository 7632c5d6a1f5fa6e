#!/usr/bin/env python3
"""The image cache: cold runs against runs restored from a snapshot, in one run; JSON.

    python bench/bench_cache.py [--runs 5]

Everything happens in a fresh base directory (the guest assets are shared), so the
first run of each key is really the first:

run:       `fcvm podman run IMAGE -- true`, cold (--no-snapshot) and cached (restored from
           the prestart snapshot a warm-up run wrote), --runs each, interleaved: wall
           time end to end and the runner's phase marks ($FCVM_TIMINGS) as phases;
           ratio = cold median / cached median (goal: >= 10).
restore:   restore to agent-ready (network-ready -> agent-ready on a cached run: VMM
           restore, connect, resume, session takeover with the new identity), against
           boot to agent-ready on a cold one (goal: under 150 ms).
snapshot:  what writing the prestart snapshot cost the first run (container-ready ->
           snapshot-saved) and its size on disk (sparse) and in guest memory terms.
healthy:   a published HTTP server (`httpd` with --health-check): seconds from the fcvm
           process's start until its published port answers, cold (--no-snapshot) and
           restored from the startup snapshot (goal: >= 10x).
memory:    PSS/RSS of the QEMU process of one cold VM, one restored VM, and two VMs
           restored at once (their unwritten guest memory is the snapshot file's page
           cache: shared), all idle (`sleep`) once healthy.

No assertion on timing; a failed run fails the benchmark (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import (
    ensure_setup,
    fcvm_cmd,
    free_port,
    load_avg,
    own_base,
    records,
    report,
    require_root,
    stats,
    stop,
)

IMAGE = "localhost/fcvm-busybox"
PREFIX = "bench-cache-"
TIMEOUT = 300.0
PHASES = (  # name, from mark, to mark ("" = the runner's clock start)
    ("resolve", "", "image-ready"),
    ("network", "image-ready", "network-ready"),
    ("boot", "vmm-started", "agent-ready"),
    ("prepare", "agent-ready", "container-ready"),
    ("vmm_restore", "network-ready", "vmm-restored"),
    ("takeover", "vm-resumed", "agent-ready"),
    ("container_start", "agent-ready", "container-started"),
    ("container_run_exit", "container-started", "container-exited"),
    ("teardown", "container-exited", "vm-stopped"),
)


def run_once(name: str, args: list[str], tmp: Path, env: dict[str, str]
             ) -> tuple[float, dict[str, float]]:  # fmt: skip
    marks_file = tmp / f"{name}.json"
    argv = [*fcvm_cmd(), "podman", "run", "--name", name, *args, IMAGE, "--", "true"]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**env, "FCVM_TIMINGS": str(marks_file)})  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}: {proc.stderr.strip()}")
    marks: dict[str, float] = json.loads(marks_file.read_text())
    return wall, marks


def phases(all_marks: list[dict[str, float]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, start, end in PHASES:
        vals = [m[end] - (m[start] if start else 0.0) for m in all_marks
                if end in m and (not start or start in m)]  # fmt: skip
        if len(vals) == len(all_marks):
            out[name] = stats(vals)
    return out


def bench_runs(runs: int, tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    first_wall, first = run_once(f"{PREFIX}first", [], tmp, env)  # writes the snapshot
    cold: list[tuple[float, dict[str, float]]] = []
    cached: list[tuple[float, dict[str, float]]] = []
    for i in range(runs):
        cold.append(run_once(f"{PREFIX}cold{i}", ["--no-snapshot"], tmp, env))
        cached.append(run_once(f"{PREFIX}hit{i}", [], tmp, env))
    if not all("vmm-restored" in m for _, m in cached):
        raise RuntimeError("a cached run did not restore")
    cold_wall = stats([w for w, _ in cold])
    cached_wall = stats([w for w, _ in cached])
    boot = [m["agent-ready"] - m["vmm-started"] for _, m in cold]
    restore = [m["agent-ready"] - m["network-ready"] for _, m in cached]
    return {
        "cold": {"wall_s": cold_wall, "phases_s": phases([m for _, m in cold])},
        "cached": {"wall_s": cached_wall, "phases_s": phases([m for _, m in cached])},
        "ratio_cold_to_cached": round(float(cold_wall["median"]) / float(cached_wall["median"]), 2),
        "goal_ratio": 10,
        "restore_to_agent_ready_ms": stats(restore, 1000, 1),
        "boot_to_agent_ready_ms": stats(boot, 1000, 1),
        "goal_restore_ms": 150,
        "snapshot_write_s": round(first["snapshot-saved"] - first["container-ready"], 3),
        "first_run_wall_s": round(first_wall, 3),
    }


def snapshot_sizes(env: dict[str, str]) -> list[dict[str, object]]:
    out = subprocess.run([*fcvm_cmd(), "snapshots", "--json"], capture_output=True, text=True,
                         env=env, check=True).stdout  # fmt: skip
    return [{k: s[k] for k in ("name", "kind", "size_bytes", "memory_bytes")}
            for s in json.loads(out)]  # fmt: skip


def until_answers(url: str, proc: subprocess.Popen[bytes], t0: float) -> float:
    deadline = time.perf_counter() + TIMEOUT
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: fcvm exited {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"{url} never answered")


def serve(name: str, args: list[str], env: dict[str, str]) -> tuple[float, subprocess.Popen[bytes]]:
    port = free_port()
    argv = [*fcvm_cmd(), "podman", "run", "--name", name, "--publish", f"127.0.0.1:{port}:80",
            "--health-check", "http://127.0.0.1:80/", *args, IMAGE, "--",
            "httpd", "-f", "-p", "80", "-h", "/www"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return until_answers(f"http://127.0.0.1:{port}/", proc, t0), proc


def bench_healthy(runs: int, env: dict[str, str]) -> dict[str, Any]:
    _, first = serve(f"{PREFIX}svc0", [], env)  # writes the startup snapshot once healthy
    deadline = time.time() + TIMEOUT
    while not any(s["kind"] == "startup" for s in snapshot_sizes(env)):
        if time.time() > deadline:
            raise RuntimeError("no startup snapshot was written")
        time.sleep(0.2)
    stop(first)
    cold, warm = [], []
    for i in range(runs):
        t, p = serve(f"{PREFIX}svcc{i}", ["--no-snapshot"], env)
        stop(p)
        cold.append(t)
        t, p = serve(f"{PREFIX}svcw{i}", [], env)
        stop(p)
        warm.append(t)
    c, w = stats(cold), stats(warm)
    return {"cold_s": c, "from_startup_snapshot_s": w, "goal_ratio": 10,
            "ratio": round(float(c["median"]) / float(w["median"]), 2)}  # fmt: skip


def vm_memory(qemu_pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{qemu_pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean"):
                out[key.lower() + "_mib"] = round(int(rest.split()[0]) / 1024)
    return out


def bench_memory(env: dict[str, str]) -> dict[str, Any]:
    def idle(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        argv = [*fcvm_cmd(), "podman", "run", "--name", name, *args, IMAGE, "--", "sleep", "600"]
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def qemu_of(name: str) -> int:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:
            recs = [r for r in records(name, exact=True) if r.get("health") == "healthy"]
            if recs:
                time.sleep(1.0)  # settle
                return int(recs[0]["vmm_pid"])  # type: ignore[call-overload]
            time.sleep(0.2)
        raise RuntimeError(f"{name} never became healthy")

    out: dict[str, Any] = {}
    procs = []
    try:
        procs.append(idle(f"{PREFIX}mem-cold", ["--no-snapshot"]))
        out["cold_vm"] = vm_memory(qemu_of(f"{PREFIX}mem-cold"))
        stop(procs.pop())
        a, b = idle(f"{PREFIX}mem-a", []), idle(f"{PREFIX}mem-b", [])
        procs += [a, b]
        pa, pb = qemu_of(f"{PREFIX}mem-a"), qemu_of(f"{PREFIX}mem-b")
        out["restored_vm_a"], out["restored_vm_b"] = vm_memory(pa), vm_memory(pb)
        both = out["restored_vm_a"]["pss_mib"] + out["restored_vm_b"]["pss_mib"]
        out["two_restored_pss_mib"] = both
        out["ratio_two_restored_to_one_cold_pss"] = round(both / out["cold_vm"]["pss_mib"], 2)
    finally:
        for p in procs:
            stop(p)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-healthy", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    require_root("bench_cache", "guest assets and networking")
    ensure_setup()
    base = own_base("cache")  # (records() too)
    os.environ.pop("FCVM_NO_SNAPSHOT", None)
    env = dict(os.environ)
    out: dict[str, object] = {"bench": "cache", "image": IMAGE, "runs": args.runs,
                              "nproc": os.cpu_count(), "load_avg_start": load_avg()}  # fmt: skip
    errors: list[str] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out["run"] = bench_runs(args.runs, Path(tmp), env)
        out["snapshots"] = snapshot_sizes(env)
        if not args.skip_healthy:
            out["healthy"] = bench_healthy(max(1, args.runs // 2), env)
        if not args.skip_memory:
            out["memory"] = bench_memory(env)
    except (RuntimeError, subprocess.SubprocessError, OSError, KeyError) as exc:
        errors.append(str(exc))
    finally:
        left = records(PREFIX)
        shutil.rmtree(base, ignore_errors=True)
    return report(out, errors, left)


if __name__ == "__main__":
    sys.exit(main())
