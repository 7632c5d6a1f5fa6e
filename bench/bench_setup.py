#!/usr/bin/env python3
"""Benchmark `fcvm setup`; prints JSON.

    python bench/bench_setup.py [--runs N] [--cold] [--warm-rootfs]

cached:       `fcvm setup` with everything current (a no-op), as a separate process;
              baseline: `fcvm --version` in the same run (ratio = cached / baseline).
resolve:      in-process resolve_assets() (what every VM start pays).
--warm-rootfs: a fresh base dir with the download cache seeded (kernel .deb, base tar):
              kernel unpack + initrd + rootfs second stage, per stage.
--cold:       a fresh base dir with an empty cache: apt download + mmdebstrap + all
              stages (takes minutes; needs network and root).
Uses the assets of $FCVM_BASE_DIR (default /var/lib/fcvm) for `cached`; runs
`fcvm setup` there first if needed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_fcvm(*args: str, env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "fcvm", *args],
        check=True,
        capture_output=True,
        env={**os.environ, **(env or {})},
    )
    return time.perf_counter() - t0


def staged_setup(base: Path, seed_from: Path | None) -> dict[str, float]:
    """Full setup in a fresh base dir (in a child process), with per-stage times."""
    if seed_from is not None:
        from fcvm.assets.rootfs import base_key

        dl = base / "assets" / "cache"
        dl.mkdir(parents=True)
        for src in [seed_from / f"base-{base_key()}.tar", *seed_from.glob("linux-image-*.deb")]:
            if src.is_file():
                os.link(src, dl / src.name)
    code = (
        "import json, time\n"
        "from fcvm.assets import setup\n"
        "t0 = time.perf_counter(); marks = {}\n"
        "def p(stage, msg):\n"
        "    marks.setdefault(stage, time.perf_counter() - t0)\n"
        "setup(progress=p)\n"
        "marks['total'] = time.perf_counter() - t0\n"
        "print(json.dumps(marks))\n"
    )
    env = {**os.environ, "FCVM_BASE_DIR": str(base), "FCVM_CONFIG": str(base / "none.toml")}
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env
    ).stdout
    marks: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    # stage start times -> durations
    order = sorted(marks.items(), key=lambda kv: kv[1])
    result = {}
    for (name, start), (_, end) in itertools.pairwise(order):
        if name != "total":
            result[f"{name}_s"] = round(end - start, 3)
    result["total_s"] = round(marks["total"], 3)
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cold", action="store_true", help="also time a cold setup (minutes)")
    ap.add_argument("--warm-rootfs", action="store_true", help="setup with a seeded cache")
    args = ap.parse_args()

    from fcvm import paths
    from fcvm.assets import NotSetUp, resolve_assets

    result: dict[str, object] = {"base_dir": str(paths.base_dir())}
    try:
        resolve_assets()
    except NotSetUp:
        result["initial_setup_s"] = round(run_fcvm("setup"), 3)

    run_fcvm("setup")  # warm the page cache
    cached = [run_fcvm("setup") for _ in range(args.runs)]
    baseline = [run_fcvm("--version") for _ in range(args.runs)]
    t = []
    for _ in range(args.runs * 20):
        t0 = time.perf_counter()
        resolve_assets()
        t.append(time.perf_counter() - t0)
    result["cached_setup_s"] = round(statistics.median(cached), 4)
    result["baseline_fcvm_version_s"] = round(statistics.median(baseline), 4)
    result["cached_over_baseline"] = round(
        statistics.median(cached) / statistics.median(baseline), 2
    )
    result["resolve_assets_ms"] = round(statistics.median(t) * 1000, 3)

    if args.warm_rootfs:
        with tempfile.TemporaryDirectory(prefix="fcvm-bench-", dir="/var/tmp") as d:
            result["seeded_setup"] = staged_setup(Path(d), paths.download_cache_dir())
    if args.cold:
        with tempfile.TemporaryDirectory(prefix="fcvm-bench-", dir="/var/tmp") as d:
            result["cold_setup"] = staged_setup(Path(d), None)
            shutil.rmtree(d, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
