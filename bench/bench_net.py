"""Network setup/teardown time per mode, and TCP throughput through a published port.

    sudo python bench/bench_net.py [--rounds 20] [--mbytes 256] [--reps 3]

Prints one JSON object:
  setup_teardown_ms.<mode>.{p50,min,max}   setup_network + teardown, one --publish
  throughput.loopback_gbit                 host -> server on 127.0.0.1 (baseline)
  throughput.<mode>.{gbit,ratio}           host -> published port -> stand-in guest;
                                           ratio = gbit / loopback_gbit, same run
Throughput is the median of --reps transfers of --mbytes each. The "guest" is the
stand-in namespace of the host tests (a veth on the VM namespace's bridge where the
TAP would be; see tests/host/test_net_support.py), so this measures fcvm's host-side
path (slirp4netns or veth+DNAT) and not a guest's virtio-net.
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
from pathlib import Path

from common import SINK, free_port

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from fcvm.net import parse_publish, setup_network  # noqa: E402
from tests.host.test_net_support import FakeGuest  # noqa: E402


def sink(prefix: tuple[str, ...], host: str, port: int) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [*prefix, sys.executable, "-c", SINK, host, str(port)], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None and int(p.stdout.readline()) == port
    return p


def transfer(host: str, port: int, nbytes: int) -> float:
    """Gbit/s for sending nbytes and getting the byte count back."""
    chunk = b"\0" * (1 << 20)
    deadline = time.monotonic() + 10
    while True:
        try:
            s = socket.create_connection((host, port), timeout=30)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with s:
        t0 = time.perf_counter()
        sent = 0
        while sent < nbytes:
            s.sendall(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        got = int(s.recv(64) or b"0")
        dt = time.perf_counter() - t0
    if got != sent:
        raise RuntimeError(f"sent {sent} bytes, the server counted {got}")
    return sent * 8 / dt / 1e9


def bench_setup(mode: str, rounds: int, work: Path) -> dict[str, float]:
    times = []
    for i in range(rounds):
        t0 = time.perf_counter()
        h = setup_network(
            f"b{mode[0]}{i}", mode, parse_publish([f"{free_port()}:80"]), workdir=work
        )
        h.teardown()
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "p50": round(statistics.median(times), 2),
        "min": round(min(times), 2),
        "max": round(max(times), 2),
    }


def bench_throughput(mode: str, nbytes: int, reps: int, work: Path) -> float:
    port = free_port()
    h = setup_network(f"t{mode[0]}", mode, parse_publish([f"{port}:5001"]), workdir=work)
    try:
        with FakeGuest(h) as g:
            g.servers.append(sink(g.exec, "0.0.0.0", 5001))
            host = h.host_ip if mode == "rootless" else "127.0.0.1"
            transfer(host, port, 1 << 20)  # warm up (ARP, conntrack)
            return statistics.median(transfer(host, port, nbytes) for _ in range(reps))
    finally:
        h.teardown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--mbytes", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_net: run as root (bridged mode needs it)")
    nbytes = args.mbytes << 20
    with tempfile.TemporaryDirectory(prefix="fcvm-bench-net-") as tmp:
        os.environ["FCVM_BASE_DIR"] = str(Path(tmp) / "base")
        work = Path(tmp) / "vm"
        out: dict[str, object] = {
            "bench": "net",
            "rounds": args.rounds,
            "transfer_mbytes": args.mbytes,
            "reps": args.reps,
        }
        out["setup_teardown_ms"] = {
            m: bench_setup(m, args.rounds, work) for m in ("rootless", "bridged")
        }
        port = free_port()
        p = sink((), "127.0.0.1", port)
        try:
            transfer("127.0.0.1", port, 1 << 20)
            lo = statistics.median(transfer("127.0.0.1", port, nbytes) for _ in range(args.reps))
        finally:
            p.kill()
            p.wait()
        tp: dict[str, object] = {"loopback_gbit": round(lo, 3)}
        for m in ("rootless", "bridged"):
            g = bench_throughput(m, nbytes, args.reps, work)
            tp[m] = {"gbit": round(g, 3), "ratio": round(g / lo, 3)}
        out["throughput"] = tp
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
