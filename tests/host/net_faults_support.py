"""Run as a normal user by test_net_faults.py: a rootless network whose slirp4netns is
killed and restarted (inside the VM's user namespace), printed as JSON. Not a test."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[2] / "src"
sys.path.insert(0, str(SRC))
sys.path.insert(0, str(SRC.parent))

from fcvm.net import parse_publish, setup_network  # noqa: E402
from fcvm.net.proc import start_time  # noqa: E402
from tests.host.test_net_support import FakeGuest, expect, roundtrip  # noqa: E402


def main(workdir: Path) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    h = setup_network("unpriv-f", "rootless", parse_publish([f"{port}:8080"]), workdir=workdir)
    out: dict[str, Any] = {"userns": bool(h.record().get("userns")), "expected": expect("g", 4096)}
    try:
        with FakeGuest(h) as g:
            g.serve("g", 8080)
            old = h.record()["slirp"]
            os.kill(old[0], signal.SIGKILL)
            time.sleep(0.1)
            deadline = time.monotonic() + 5
            line = h.check()
            while line is None and h._watch and h._watch.pending and time.monotonic() < deadline:
                time.sleep(0.05)
                line = h.check()
            out["check"] = line
            out["restarted"] = h.record()["slirp"][0] != old[0]
            out["answer_after"] = roundtrip(h.host_ip, port, n=4096)
    finally:
        h.teardown()
    rec = h.record()
    out["alive_after_teardown"] = [
        k for k in ("holder", "slirp") if rec.get(k) and start_time(rec[k][0]) == rec[k][1]
    ]
    leases = json.loads((Path(rec["net_dir"]) / "leases.json").read_text())["leases"]
    out["leases_left"] = list(leases)
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
