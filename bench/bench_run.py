#!/usr/bin/env python3
"""End to end `fcvm podman run` and CLI latency; prints JSON.

    python bench/bench_run.py [--runs 5] [--cli-runs 10] [--cold-setup]

cached_setup:  `fcvm setup` with current assets (a no-op), wall time per process.
cli:           `fcvm --help` and `fcvm ls` wall time (median of --cli-runs, interleaved)
               against `python -c pass` in the same run (ratio = cli / baseline);
               target_ms is the goal (150 ms), under_target says whether the median is.
podman_run:    `fcvm podman run --name bench-run-N localhost/fcvm-busybox -- true`, cold
               (FCVM_NO_SNAPSHOT=1: every run boots; bench_cache.py measures restores),
               --runs times after one uncounted warm-up: wall time, and the runner's marks
               ($FCVM_TIMINGS, seconds since the runner's clock started) turned into
               phases (medians and raw samples):
                 cli_startup        process spawn -> runner clock start (derived, below)
                 resolve            -> image-ready (reap, resolve assets, host image)
                 network            image-ready -> network-ready
                 vmm_start          network-ready -> vmm-started
                 boot               vmm-started -> agent-ready (kernel, init, agent)
                 image              agent-ready -> image-loaded (image store mounted)
                 container_create   image-loaded -> container-ready (`podman run -d` with
                                    the gate as entrypoint, until the gate answers)
                 container_start    container-ready -> container-started (the gate execs)
                 container_run_exit container-started -> container-exited
                 teardown           timings written -> process exit (VMM stop, network,
                                    state; derived, below)
               The runner writes $FCVM_TIMINGS right after the session ends, before
               teardown; the file's mtime (wall clock) anchors the marks, so
               cli_startup = mtime - last mark - spawn time and teardown = exit - mtime.
               outside_marks = wall - last mark (= cli_startup + teardown + the write).
               health-healthy (container seen running by the agent's poll) is reported
               apart, relative to container-started, when the run got that far.
--cold-setup:  `fcvm setup --force` in a temporary FCVM_BASE_DIR (minutes; needs network).

No assertion on timing. A failed run (non-zero exit) fails the benchmark (exit 1), as
does a VM named bench-run-* left in `fcvm ls`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import ensure_setup, fcvm_cmd, load_avg, records, report, require_root, stats, stop

IMAGE = "localhost/fcvm-busybox"
PREFIX = "bench-run-"
TARGET_MS = 150.0
RUN_TIMEOUT = 300.0
MARKS = (
    "image-ready",
    "network-ready",
    "vmm-started",
    "agent-ready",
    "image-loaded",
    "container-ready",
    "container-started",
    "container-exited",
)
PHASES = (  # name, from mark, to mark ("" = runner clock start)
    ("resolve", "", "image-ready"),
    ("network", "image-ready", "network-ready"),
    ("vmm_start", "network-ready", "vmm-started"),
    ("boot", "vmm-started", "agent-ready"),
    ("image", "agent-ready", "image-loaded"),
    ("container_create", "image-loaded", "container-ready"),
    ("container_start", "container-ready", "container-started"),
    ("container_run_exit", "container-started", "container-exited"),
)


def wall(argv: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env, timeout=600)
    return time.perf_counter() - t0


@dataclass
class RunResult:
    wall: float
    marks: dict[str, float]
    cli_startup: float  # spawn -> runner clock start
    teardown: float  # timings written -> exit
    outside_marks: float  # wall - last mark


def one_run(name: str, timings: Path) -> RunResult | str:
    """One `podman run ... -- true`; a string says why it failed."""
    timings.unlink(missing_ok=True)
    env = {**os.environ, "FCVM_TIMINGS": str(timings), "FCVM_NO_SNAPSHOT": "1"}
    argv = [*fcvm_cmd(), "podman", "run", "--name", name, IMAGE, "--", "true"]
    spawn_wall = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(proc)
        return f"timed out after {RUN_TIMEOUT:.0f}s"
    wall_s = time.perf_counter() - t0
    exit_wall = time.time()
    if proc.returncode != 0:
        return f"exit {proc.returncode}: {err.decode(errors='replace').strip()}"
    marks: dict[str, float] = json.loads(timings.read_text())
    written = timings.stat().st_mtime
    last = max(marks.values())
    return RunResult(wall_s, marks, written - last - spawn_wall, exit_wall - written, wall_s - last)


def bench_podman_run(runs: int, tmp: Path) -> tuple[dict[str, object], list[str]]:
    errors: list[str] = []
    results: list[RunResult] = []
    out: dict[str, object] = {"command": f"fcvm podman run --name {PREFIX}N {IMAGE} -- true"}
    for i in range(runs + 1):  # run 0 is the warm-up (image export, page cache)
        r = one_run(f"{PREFIX}{i}", tmp / f"timings-{i}.json")
        if isinstance(r, str) and "not set up" in r:
            ensure_setup()  # someone changed the agent sources meanwhile: once more
            r = one_run(f"{PREFIX}{i}", tmp / f"timings-{i}.json")
        if isinstance(r, str):
            errors.append(f"{PREFIX}{i}: {r}")
        elif i == 0:
            out["warmup_wall_s"] = round(r.wall, 3)
        else:
            results.append(r)
    out["runs"] = len(results)
    if not results:
        return out, errors
    marks = [r.marks for r in results]
    out["wall_s"] = stats([r.wall for r in results])
    out["marks_s"] = {
        m: stats([mk[m] for mk in marks]) for m in MARKS if all(m in mk for mk in marks)
    }
    phases: dict[str, object] = {"cli_startup": stats([r.cli_startup for r in results])}
    for name, a, b in PHASES:
        if all(b in mk and (not a or a in mk) for mk in marks):
            phases[name] = stats([mk[b] - (mk[a] if a else 0.0) for mk in marks])
    phases["teardown"] = stats([r.teardown for r in results])
    out["phases_s"] = phases
    out["outside_marks_s"] = stats([r.outside_marks for r in results])
    health = [
        mk["health-healthy"] - mk["container-started"]
        for mk in marks
        if "health-healthy" in mk and "container-started" in mk
    ]
    out["health_healthy_after_container_started_s"] = stats(health) if health else None
    out["boot_to_agent_ready_s"] = phases.get("boot")
    agent = [mk["agent-ready"] for mk in marks if "agent-ready" in mk]
    out["runner_start_to_agent_ready_s"] = stats(agent) if agent else None
    return out, errors


def bench_cli(runs: int) -> dict[str, object]:
    cmds = {
        "baseline_python_pass": [sys.executable, "-c", "pass"],
        "fcvm_help": [*fcvm_cmd(), "--help"],
        "fcvm_ls": [*fcvm_cmd(), "ls"],
    }
    for argv in cmds.values():
        wall(argv)  # warm the page cache
    samples: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(runs):  # interleaved, so drift in host load hits all alike
        for k, argv in cmds.items():
            samples[k].append(wall(argv))
    base = statistics.median(samples["baseline_python_pass"])
    out: dict[str, object] = {"runs": runs, "target_ms": TARGET_MS}
    for k, s in samples.items():
        entry: dict[str, object] = {"ms": stats(s, 1000, 1)}
        if k != "baseline_python_pass":
            med = statistics.median(s) * 1000
            entry["ratio_to_baseline"] = round(med / (base * 1000), 2)
            entry["under_target"] = med < TARGET_MS
        out[k] = entry
    return out


def cold_setup() -> dict[str, object]:
    """`fcvm setup --force` in a fresh base dir (apt download, mmdebstrap, every stage)."""
    with tempfile.TemporaryDirectory(prefix="fcvm-bench-cold-", dir="/var/tmp") as d:
        env = {
            **os.environ,
            "FCVM_BASE_DIR": str(Path(d) / "base"),
            "FCVM_CONFIG": str(Path(d) / "none.toml"),
        }
        t0 = time.perf_counter()
        proc = subprocess.run(
            [*fcvm_cmd(), "setup", "--force"], capture_output=True, text=True, env=env, timeout=3600
        )
        t = time.perf_counter() - t0
        shutil.rmtree(d, ignore_errors=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return {"wall_s": round(t, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="counted podman runs (default 5)")
    ap.add_argument("--cli-runs", type=int, default=10, help="runs per CLI command (default 10)")
    ap.add_argument("--cold-setup", action="store_true", help="also time a cold setup (minutes)")
    args = ap.parse_args()
    require_root("bench_run", "fcvm setup and VMs here need it")

    out: dict[str, object] = {"bench": "run", "fcvm": " ".join(fcvm_cmd()), "nproc": os.cpu_count()}
    out["load_avg_start"] = load_avg()
    out["first_setup_s"] = round(ensure_setup(), 3)  # builds if the agent changed
    ensure_setup()
    out["cached_setup_s"] = stats([ensure_setup() for _ in range(args.cli_runs)])
    out["cli"] = bench_cli(args.cli_runs)
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fcvm-bench-run-") as tmp:
        try:
            out["podman_run"], errors = bench_podman_run(args.runs, Path(tmp))
        finally:
            left = records(PREFIX)
    if args.cold_setup:
        cold = cold_setup()
        out["cold_setup"] = cold
        if "error" in cold:
            errors.append(f"cold setup: {cold['error']}")
    return report(out, errors, left)


if __name__ == "__main__":
    sys.exit(main())
