"""Helpers shared by the benchmarks in this directory.

A script run as `python3 bench/bench_X.py` has its own directory on sys.path, so it
imports this module as `common`, whatever the current directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A TCP sink for `python -c SINK HOST PORT` (PORT 0: any free port): prints the port it
# listens on, then per connection reads to EOF and answers the byte count ("%d\n").
SINK = r"""
import socket, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2]))); l.listen(4); print(l.getsockname()[1], flush=True)
buf = bytearray(1 << 20)
while True:
    c, _ = l.accept(); n = 0
    while True:
        k = c.recv_into(buf)
        if not k: break
        n += k
    c.sendall(b"%d\n" % n); c.close()
"""


def fcvm_cmd() -> list[str]:
    """The installed console script next to this interpreter, else `python -m fcvm`."""
    script = Path(sys.executable).parent / "fcvm"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fcvm"]


def require_root(bench: str, why: str) -> None:
    if os.geteuid() != 0:
        sys.exit(f"{bench}: run as root ({why})")


def ensure_setup(timeout: float = 900.0) -> float:
    """`fcvm setup` (a no-op when the assets are current); its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run([*fcvm_cmd(), "setup"], check=True, capture_output=True, timeout=timeout)
    return time.perf_counter() - t0


def own_base(bench: str) -> Path:
    """A fresh FCVM_BASE_DIR for this process and the fcvm commands it runs (records,
    snapshots and caches of its own), sharing the built guest assets
    (FCVM_ASSETS_DIR); the caller removes it."""
    base = Path(tempfile.mkdtemp(prefix=f"fcvm-bench-{bench}-"))
    code = "from fcvm import paths; print(paths.assets_dir())"
    assets = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    os.environ.update(FCVM_BASE_DIR=str(base), FCVM_ASSETS_DIR=assets)
    return base


def records(name: str, *, exact: bool = False) -> list[dict[str, object]]:
    """The `fcvm ls --json` records whose name starts with `name` (is `name` if exact)."""
    out = subprocess.run(
        [*fcvm_cmd(), "ls", "--json"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return [
        r
        for r in json.loads(out)
        if (str(r.get("name", "")) == name if exact else str(r.get("name", "")).startswith(name))
    ]


def stop(*procs: subprocess.Popen[bytes]) -> None:
    """Stop fcvm runs in the background as Ctrl-C at their terminals would: the first
    signal goes to the container (podman's sig-proxy; a `sleep` or `httpd` as PID 1
    ignores it), the second stops the VM at once; SIGKILL after 30 s (the next fcvm
    reaps what that leaves)."""
    for _ in range(2):
        live = [p for p in procs if p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGINT)
        if live:
            time.sleep(0.05)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stats(samples: list[float], scale: float = 1.0, nd: int = 4) -> dict[str, object]:
    """Median, min, max and the samples, each times `scale`, rounded to `nd` places."""
    vals = [v * scale for v in samples]
    return {
        "median": round(statistics.median(vals), nd),
        "min": round(min(vals), nd),
        "max": round(max(vals), nd),
        "samples": [round(v, nd) for v in vals],
    }


def pct(samples: list[float], scale: float = 1000.0, nd: int = 2) -> dict[str, object]:
    """p50, p95, min, max and the samples (in order), each times `scale` (default: ms)."""
    vals = sorted(v * scale for v in samples)
    p95 = statistics.quantiles(vals, n=20, method="inclusive")[18] if len(vals) > 1 else vals[0]
    return {
        "p50": round(statistics.median(vals), nd),
        "p95": round(p95, nd),
        "min": round(vals[0], nd),
        "max": round(vals[-1], nd),
        "samples": [round(v * scale, nd) for v in samples],
    }


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def dumps(obj: object, indent: int = 0) -> str:
    """JSON with leaf objects and lists on one line each."""
    pad = " " * indent
    if isinstance(obj, dict) and any(isinstance(v, dict) for v in obj.values()):
        inner = ",\n".join(f"{pad} {json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in obj.items())
        return "{\n" + inner + "\n" + pad + "}"
    return json.dumps(obj)


def report(out: dict[str, object], errors: list[str], left: list[dict[str, object]]) -> int:
    """Add the leftovers (each one an error), the end load and the errors to `out`, print
    it; the exit status (1 on any error)."""
    if left:
        errors.append(f"left behind: {[r['name'] for r in left]}")
    out["leftovers"] = [r["name"] for r in left]
    out["load_avg_end"] = load_avg()
    if errors:
        out["errors"] = errors
    print(dumps(out))
    return 1 if errors else 0
