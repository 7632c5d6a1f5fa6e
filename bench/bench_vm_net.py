#!/usr/bin/env python3
"""Host -> container TCP throughput through a published port of a real VM, and the
network setup / teardown time of real runs, per network mode; prints JSON.

    python bench/bench_vm_net.py [--mbytes 64] [--reps 3] [--vms 2] [--modes rootless,bridged]

Per mode, --vms VMs one after another, each
`fcvm podman run --name bench-net-<mode>-N --network <mode> -p HOSTPORT:5001
 localhost/fcvm-busybox -- nc -ll -p 5001 -e wc -c`
(busybox nc as a TCP sink: one `wc -c` per connection, which answers the byte count,
so every transfer is checked). Once `fcvm ls` shows the VM healthy and a 64 KiB probe
comes back counted, --reps transfers of --mbytes each go to the published port
(rootless: the VM's own loopback address; bridged: 127.0.0.1), then the VM is stopped
with SIGTERM.

throughput.loopback          the same transfer to a Python sink on 127.0.0.1 (baseline,
                             same run, --reps times)
throughput.<mode>            MB/s and Gbit/s (median over all VMs' transfers, raw samples);
                             ratio = MB/s / loopback MB/s. A transfer is timed from the
                             first byte sent to the guest's count received.
network_setup_ms.<mode>      image-ready -> network-ready from $FCVM_TIMINGS, per VM
vm_teardown_ms.<mode>        timings written -> fcvm exit after SIGTERM (VMM stop +
                             network teardown + state removal; fcvm marks no network-only
                             teardown: bench/bench_net.py measures that without a VM)
MB = 2**20 bytes. No assertion on timing; exit 1 on a failed or miscounted transfer, a VM
that does not come up, or a bench-net-* VM left in `fcvm ls`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import (
    SINK,
    ensure_setup,
    fcvm_cmd,
    free_port,
    load_avg,
    records,
    report,
    require_root,
    stats,
    stop,
)

IMAGE = "localhost/fcvm-busybox"
PREFIX = "bench-net-"
GUEST_PORT = 5001
SINK_CMD = ("nc", "-ll", "-p", str(GUEST_PORT), "-e", "wc", "-c")
HEALTH_TIMEOUT = 180.0
READY_TIMEOUT = 60.0
IO_TIMEOUT = 300.0


class BenchError(Exception):
    pass


def transfer(host: str, port: int, nbytes: int, timeout: float = IO_TIMEOUT) -> float:
    """Seconds to send nbytes and get the sink's count back; BenchError if miscounted."""
    chunk = b"\xa5" * (1 << 20)
    with socket.create_connection((host, port), timeout=timeout) as s:
        t0 = time.perf_counter()
        sent = 0
        while sent < nbytes:
            n = min(len(chunk), nbytes - sent)
            s.sendall(chunk[:n])
            sent += n
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while part := s.recv(64):
            reply += part
        dt = time.perf_counter() - t0
    if reply.strip() != str(sent).encode():
        raise BenchError(f"sent {sent} bytes to {host}:{port}, the sink answered {reply!r}")
    return dt


def wait_ready(host: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    """Until a 64 KiB probe is counted (the sink may lag the health report)."""
    deadline = time.monotonic() + READY_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the VM exited {proc.returncode} before its sink answered")
        try:
            transfer(host, port, 64 << 10, timeout=10)
            return
        except (OSError, BenchError) as exc:
            last = exc
            time.sleep(0.5)
    raise BenchError(f"no answer from the sink at {host}:{port} within {READY_TIMEOUT}s: {last}")


@dataclass
class VmResult:
    secs: list[float]  # per transfer
    net_setup: float  # image-ready -> network-ready
    teardown: float  # timings written -> exit


def one_vm(mode: str, name: str, nbytes: int, reps: int, tmp: Path) -> VmResult:
    timings = tmp / f"{name}.json"
    log = tmp / f"{name}.log"
    port = free_port()
    argv = [*fcvm_cmd(), "podman", "run", "--name", name, "--network", mode,
            "-p", f"{port}:{GUEST_PORT}", IMAGE, "--", *SINK_CMD]  # fmt: skip
    with log.open("wb") as err:
        proc = subprocess.Popen(
            argv,
            env={**os.environ, "FCVM_TIMINGS": str(timings)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        rec: dict[str, object] = {}
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while not rec and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited {proc.returncode}: {log.read_text().strip()}")
            rec = next((r for r in records(PREFIX) if r["pid"] == proc.pid
                        and r["health"] not in ("", "starting")), {})  # fmt: skip
            time.sleep(0.3)
        if rec.get("health") != "healthy":
            raise BenchError(f"{name}: not healthy within {HEALTH_TIMEOUT:.0f}s ({rec})")
        net = rec["network"]
        assert isinstance(net, dict)
        host = str(net["host_ip"]) if mode == "rootless" else "127.0.0.1"
        wait_ready(host, port, proc)
        secs = [transfer(host, port, nbytes) for _ in range(reps)]
    finally:
        stop(proc)
        exited = time.time()
    marks = json.loads(timings.read_text())
    if mode == "bridged":
        tag = str(net["tag"])
        rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
        if tag in rules:
            raise BenchError(f"{name}: iptables rules tagged {tag} left behind")
    net_setup = marks["network-ready"] - marks["image-ready"]
    return VmResult(secs, net_setup, exited - timings.stat().st_mtime)


def loopback(nbytes: int, reps: int) -> list[float]:
    p = subprocess.Popen(
        [sys.executable, "-c", SINK, "127.0.0.1", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None
        port = int(p.stdout.readline())
        transfer("127.0.0.1", port, 1 << 20)  # warm-up
        return [transfer("127.0.0.1", port, nbytes) for _ in range(reps)]
    finally:
        p.kill()
        p.wait()


def rate(mbytes: int, secs: list[float]) -> dict[str, object]:
    mbs = [mbytes / t for t in secs]
    med = statistics.median(mbs)
    return {
        "mb_s": round(med, 2),
        "gbit_s": round(med * (1 << 20) * 8 / 1e9, 4),
        "mb_s_samples": [round(v, 2) for v in mbs],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbytes", type=int, default=64, help="MB per transfer (default 64)")
    ap.add_argument("--reps", type=int, default=3, help="transfers per VM (default 3)")
    ap.add_argument("--vms", type=int, default=2, help="VMs per mode (default 2)")
    ap.add_argument("--modes", default="rootless,bridged", help="comma-separated modes")
    args = ap.parse_args()
    require_root("bench_vm_net", "bridged mode and VMs here need it")
    modes = [m for m in args.modes.split(",") if m]
    ensure_setup()
    nbytes = args.mbytes << 20
    out: dict[str, object] = {
        "bench": "vm_net",
        "nproc": os.cpu_count(),
        "load_avg_start": load_avg(),
        "transfer_mbytes": args.mbytes,
        "reps_per_vm": args.reps,
        "vms_per_mode": args.vms,
        "guest_sink": " ".join(SINK_CMD),
    }
    errors: list[str] = []
    lo = loopback(nbytes, args.reps)
    lo_mbs = statistics.median(args.mbytes / t for t in lo)
    tp: dict[str, object] = {"loopback": rate(args.mbytes, lo)}
    setup_ms: dict[str, object] = {}
    teardown_ms: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="fcvm-bench-vm-net-") as tmp:
        for mode in modes:
            runs = []
            for i in range(args.vms):
                try:
                    runs.append(one_vm(mode, f"{PREFIX}{mode}-{i}", nbytes, args.reps, Path(tmp)))
                except (BenchError, OSError, subprocess.SubprocessError) as exc:
                    errors.append(f"{mode} VM {i}: {exc}")
            if not runs:
                continue
            secs = [t for r in runs for t in r.secs]
            entry = rate(args.mbytes, secs)
            mbs = statistics.median(args.mbytes / t for t in secs)
            entry["ratio_to_loopback"] = round(mbs / lo_mbs, 4)
            tp[mode] = entry
            setup_ms[mode] = stats([r.net_setup for r in runs], scale=1000, nd=2)
            teardown_ms[mode] = stats([r.teardown for r in runs], scale=1000, nd=2)
    out["throughput"] = tp
    out["network_setup_ms"] = setup_ms
    out["vm_teardown_ms"] = teardown_ms
    return report(out, errors, records(PREFIX))


if __name__ == "__main__":
    sys.exit(main())
