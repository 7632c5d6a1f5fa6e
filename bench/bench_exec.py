#!/usr/bin/env python3
"""`fcvm exec` latency (split into its steps) and `exec -i` stdin throughput; prints JSON.

    python bench/bench_exec.py [--runs 20] [--mbytes 50] [--reps 3]

Starts one VM (`fcvm podman run --name bench-exec localhost/fcvm-busybox -- sleep 3600`),
waits until `fcvm ls` shows it healthy, then, for the container (`exec`) and the guest
(`exec --vm`):

latency.<mode>.inproc_ms   `true` run in this process with fcvm's own pieces, as the
                           CLI does it, each step timed (p50, p95, raw samples):
                             connect    connect_unix(<vm dir>/exec.sock)
                             handshake  Session(role="host").start() (HELLO both ways
                                        through the owning fcvm's relay)
                             command    run_remote(spec) (channels opened, relayed to the
                                        agent, process spawned, exit event back)
                             close      session.close()
                             total      the four together
latency.<mode>.cli_ms      `fcvm exec [--vm] --name bench-exec -- true` wall time
                           (a process: interpreter + imports + the above).
stdin                      --mbytes of random data piped into `fcvm exec -i ... -- sha256sum`
                           (container and --vm), MB/s per transfer (median of --reps),
                           against `cat | sha256sum` on the host in the same run
                           (ratio = MB/s / host MB/s). mb_s includes the exec's own
                           start-up; mb_s_net subtracts the CLI `true` p50 of that mode.
                           Every checksum is checked: a mismatch fails the benchmark.
                           vm_dd_zero_sha256sum_no_stdin: `exec --vm -- sh -c 'dd if=/dev/zero
                           | sha256sum'` of the same size, no stdin: the guest's own hashing
                           speed under emulation, the ceiling for the two -i figures.

MB = 2**20 bytes. No assertion on timing; exit 1 on a failed command, a wrong checksum,
or the VM left in `fcvm ls` afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ensure_setup, fcvm_cmd, load_avg, pct, records, report, require_root, stop

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src")]

from fcvm import paths  # noqa: E402
from fcvm.remote import LocalStdio, run_remote  # noqa: E402
from fcvm.session import Session  # noqa: E402
from fcvm.session.transport import connect_unix  # noqa: E402

IMAGE = "localhost/fcvm-busybox"
NAME = "bench-exec"
HEALTH_TIMEOUT = 180.0
STEP_TIMEOUT = 5.0


class BenchError(Exception):
    pass


def start_vm(log: Path) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [*fcvm_cmd(), "podman", "run", "--name", NAME, IMAGE, "--", "sleep", "3600"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    deadline = time.monotonic() + HEALTH_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{NAME} exited {proc.returncode}: {log.read_text().strip()}")
        for rec in records(NAME, exact=True):
            if rec.get("pid") == proc.pid and rec.get("health") not in (None, "", "starting"):
                if rec["health"] != "healthy":
                    raise BenchError(f"{NAME} is {rec['health']}")
                return proc, rec
        time.sleep(0.3)
    return proc, {}


async def inproc(sock: Path, mode: str, runs: int) -> dict[str, list[float]]:
    """`true` through exec.sock, timing connect / handshake / command / close."""
    spec = {"mode": mode, "argv": ["true"], "env": [], "interactive": False, "tty": False}
    devnull = os.open(os.devnull, os.O_WRONLY)
    steps: dict[str, list[float]] = {
        k: [] for k in ("connect", "handshake", "command", "close", "total")
    }
    try:
        for i in range(runs + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            reader, writer = await connect_unix(str(sock), STEP_TIMEOUT)
            t1 = time.perf_counter()
            session = Session(reader, writer, role="host")
            await session.start(timeout=STEP_TIMEOUT)
            t2 = time.perf_counter()
            code = await asyncio.wait_for(
                run_remote(session, spec, LocalStdio(stdout=devnull, stderr=devnull)), 60
            )
            t3 = time.perf_counter()
            await session.close()
            t4 = time.perf_counter()
            if code != 0:
                raise BenchError(f"in-process exec ({mode}) of true exited {code}")
            if i:
                for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                    steps[k].append(v)
    finally:
        os.close(devnull)
    return steps


def cli_exec(vm: bool, runs: int) -> list[float]:
    argv = [*fcvm_cmd(), "exec", *(["--vm"] if vm else []), "--name", NAME, "--", "true"]
    times = []
    for i in range(runs + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, timeout=120)
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(argv[1:])}: exit {proc.returncode}: {proc.stderr!r}")
        if i:
            times.append(dt)
    return times


def pipe_sha(argv: list[str], data: bytes, want: str) -> float:
    """Seconds to pipe data into argv (which prints a sha256sum line); checks the sum."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, input=data, capture_output=True, timeout=900)
    dt = time.perf_counter() - t0
    got = proc.stdout.split()[0].decode() if proc.stdout.split() else ""
    if proc.returncode != 0 or got != want:
        raise BenchError(
            f"{' '.join(argv)}: exit {proc.returncode}, sha256 {got or '(none)'} != {want}: "
            f"{proc.stderr.decode(errors='replace').strip()}"
        )
    return dt


def bench_stdin(mbytes: int, reps: int, cli_p50: dict[str, float]) -> dict[str, object]:
    data = os.urandom(mbytes << 20)
    want = hashlib.sha256(data).hexdigest()
    cmds = {
        "host_cat_sha256sum": ["sh", "-c", "cat | sha256sum"],
        "container": [*fcvm_cmd(), "exec", "-i", "--name", NAME, "--", "sha256sum"],
        "vm": [*fcvm_cmd(), "exec", "-i", "--vm", "--name", NAME, "--", "sha256sum"],
    }
    secs: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(reps):  # interleaved, so drift in host load hits all alike
        for k, argv in cmds.items():
            secs[k].append(pipe_sha(argv, data, want))
    # The guest's own sha256sum speed with no stdin at all (zeros from dd in the guest;
    # the hash costs the same for any data): what the transport is up against.
    guest = [*fcvm_cmd(), "exec", "--vm", "--name", NAME, "--", "sh", "-c",
             f"dd if=/dev/zero bs=1M count={mbytes} 2>/dev/null | sha256sum"]  # fmt: skip
    zeros = hashlib.sha256(bytes(mbytes << 20)).hexdigest()
    guest_s = [pipe_sha(guest, b"", zeros) for _ in range(reps)]
    host = mbytes / statistics.median(secs["host_cat_sha256sum"])
    out: dict[str, object] = {"mbytes": mbytes, "reps": reps, "checksums_ok": True}
    for k, s in secs.items():
        mbs = [mbytes / t for t in s]
        entry: dict[str, object] = {
            "mb_s": round(statistics.median(mbs), 2),
            "mb_s_samples": [round(v, 2) for v in mbs],
            "seconds_samples": [round(t, 3) for t in s],
        }
        if k != "host_cat_sha256sum":
            entry["ratio_to_host"] = round(statistics.median(mbs) / host, 4)
            net = [mbytes / max(t - cli_p50[k], 1e-6) for t in s]
            entry["mb_s_net"] = round(statistics.median(net), 2)
        out[k] = entry
    out["vm_dd_zero_sha256sum_no_stdin"] = {
        "mb_s": round(mbytes / statistics.median(guest_s), 2),
        "mb_s_net": round(mbytes / max(statistics.median(guest_s) - cli_p50["vm"], 1e-6), 2),
        "seconds_samples": [round(t, 3) for t in guest_s],
    }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="exec latency samples (default 20)")
    ap.add_argument("--mbytes", type=int, default=50, help="MB piped per transfer (default 50)")
    ap.add_argument("--reps", type=int, default=3, help="transfers per path (default 3)")
    args = ap.parse_args()
    require_root("bench_exec", "VMs here need it")
    ensure_setup()
    out: dict[str, object] = {
        "bench": "exec",
        "fcvm": " ".join(fcvm_cmd()),
        "nproc": os.cpu_count(),
        "load_avg_start": load_avg(),
        "runs": args.runs,
    }
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fcvm-bench-exec-") as tmp:
        proc: subprocess.Popen[bytes] | None = None
        try:
            t0 = time.perf_counter()
            proc, rec = start_vm(Path(tmp) / "vm.log")
            if not rec:
                raise BenchError(f"{NAME} not healthy within {HEALTH_TIMEOUT:.0f}s")
            out["vm_healthy_after_s"] = round(time.perf_counter() - t0, 2)
            sock = paths.exec_socket(str(rec["vm_id"]))
            latency: dict[str, object] = {}
            cli_p50: dict[str, float] = {}
            for mode, key, vm in (("exec", "container", False), ("vm", "vm", True)):
                steps = asyncio.run(inproc(sock, mode, args.runs))
                cli = cli_exec(vm, args.runs)
                cli_p50[key] = statistics.median(cli)
                latency[key] = {
                    "inproc_ms": {k: pct(v) for k, v in steps.items()},
                    "cli_ms": pct(cli),
                }
            out["latency"] = latency
            out["stdin"] = bench_stdin(args.mbytes, args.reps, cli_p50)
        except (BenchError, subprocess.SubprocessError, OSError) as exc:
            errors.append(str(exc))
        finally:
            if proc is not None:
                stop(proc)
    return report(out, errors, records(NAME, exact=True))


if __name__ == "__main__":
    sys.exit(main())
