#!/usr/bin/env python3
"""Fault injection: kill one part of a running fcvm VM at a random moment, N times, then
`fcvm gc` once, then count what was left behind, per victim; prints JSON.

    python bench/faults.py [--runs 100] [--modes rootless,bridged] [--victims LIST]
                           [--sleep 3] [--seed S] [--base-dir DIR] [--keep-base]

Each run is `fcvm podman run --name fault-I --network MODE -p PORT:80
localhost/fcvm-busybox -- sleep SLEEP` in a fresh base directory (one per harness run,
so nothing else's state is counted). Victims take turns, each in both network modes
(slirp4netns: rootless only) and half its runs with FCVM_NO_SNAPSHOT=1 (a cold boot);
the others use the image cache: restored from its snapshot, or (a quarter of them)
with the cache emptied first so that the run writes it.
At a moment drawn uniformly from spawn to 0.9 x the run's expected length (the
shortest whole run of its kind so far) it kills, with SIGKILL:

    fcvm         the `fcvm podman run` process
    vmm          the VMM (qemu-system-x86_64 here)
    slirp4netns  rootless mode's network helper
    holder       the namespace holder (both modes; nothing needs it once the network
                 is set up: fcvm holds and enters the namespaces by its own fds)
    container    the container's PID 1, from inside the guest: `fcvm exec --vm --
                 podman kill --signal KILL fcvm` or `pkill -KILL -x sleep`, alternately
    pageserver   not on this backend: the QEMU backend cannot restore from a page server
                 (only Firecracker's Uffd memory backend can), so no VM is ever attached
                 to one here; the output says so and no run picks it

A victim that does not exist yet at that moment (no VMM before the network is up, no
container before the guest answers) is killed as soon as it does; "missed" counts the
runs that ended first. After the runs, one `fcvm gc`, then, per victim (each leftover
is attributed to the run it belongs to, or during which it first appeared):

    processes     qemu, slirp4netns, namespace holders (any process in a VM's network
                  namespace), fcvm processes of this base directory
    records       VM records (vms/<id>/vm.json)
    leases        network leases
    netns         network namespaces of the runs' VMs still alive (or named)
    links         the runs' host links (bridged veths), new tap*/veth*/fcvm* links
    iptables      rules tagged fcvm:<vm id> of the runs' VMs
    mounts        mounts under the base directory, or new since the start
    loop_devices  loop devices backed by files under the base directory, or new
    files         files under the base directory beyond the persistent caches (image
                  exports and stores, complete snapshot cache entries, lock files)

Also per victim: exit codes of fcvm, the distinct last lines fcvm printed ("fcvm: ..."),
how many stderr outputs held a Python traceback, runs that hung (killed after 120 s),
and where in the VM's life the kill landed. Needs root (bridged mode, iptables).
Exit status 1 if anything was left behind or a run hung.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
IMAGE = "localhost/fcvm-busybox"
VICTIMS = ("fcvm", "vmm", "slirp4netns", "holder", "container", "pageserver")
NO_PAGESERVER = (
    "skipped: the QEMU backend cannot restore a VM from a page server (only "
    "Firecracker's Uffd memory backend can, and Firecracker cannot run here), so no VM "
    "is ever attached to one"
)
RUN_TIMEOUT = 120.0
LEFT_KINDS = (
    "processes",
    "records",
    "leases",
    "netns",
    "links",
    "iptables",
    "mounts",
    "loop_devices",
    "files",
)
# Files a base directory keeps on purpose (caches, locks); anything else is left behind.
KEPT = re.compile(
    r"^(kvm-probe\.json|vmm-versions\.json|config\.toml"
    r"|images/[^/]+\.(oci\.tar|store\.ext4|store\.json)|images/\.[^/]+\.lock"
    r"|net/leases\.(json|lock)|vms/\.lock|snapshots/\.cache-[^/]+\.create"
    r"|snapshots/cache-[^/]+/(meta\.json|memory|vmstate|lock|last-used|workingset|disk-[^/]+))$"
)


def fcvm_env(base: Path) -> dict[str, str]:
    env = {**os.environ, "FCVM_BASE_DIR": str(base)}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    if "FCVM_ASSETS_DIR" not in env:  # the usual assets, not a fresh base's empty ones
        env["FCVM_ASSETS_DIR"] = "/var/lib/fcvm/assets"
    env.pop("FCVM_NO_SNAPSHOT", None)
    env.pop("FCVM_LOG", None)
    return env


def fcvm(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fcvm", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def alive(pid_start: list[int] | tuple[int, int] | None) -> bool:
    return bool(pid_start) and start_time(int(pid_start[0])) == int(pid_start[1])  # type: ignore[index]


def netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def procs() -> dict[int, tuple[str, bytes, int | None]]:
    """pid -> (comm, cmdline, netns inode) of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                comm = Path(f"/proc/{d}/comm").read_text().strip()
                cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            except OSError:
                continue
            out[int(d)] = (comm, cmd, netns_inode(int(d)))
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


# -- what a run's VM is, learned while it runs ------------------------------------------


@dataclass
class Seen:
    vm_id: str = ""
    vmm: list[int] = field(default_factory=list)  # [pid, start]
    helpers: dict[str, list[list[int]]] = field(default_factory=dict)  # every one seen
    netns: set[int] = field(default_factory=set)
    veth: str = ""
    gateway: str = ""
    status: str = ""
    health: str = ""

    def learn(self, base: Path, name: str) -> None:
        vms = base / "vms"
        if not self.vm_id and vms.is_dir():
            for d in vms.iterdir():
                try:
                    rec = json.loads((d / "vm.json").read_text())
                except (OSError, ValueError):
                    continue
                if rec.get("name") == name:
                    self.vm_id = d.name
        if not self.vm_id:
            return
        try:
            rec = json.loads((vms / self.vm_id / "vm.json").read_text())
            self.status, self.health = rec.get("status", ""), rec.get("health", "")
            pid = rec.get("vmm_pid")
            if pid and not self.vmm and (st := start_time(int(pid))) is not None:
                self.vmm = [int(pid), st]
        except (OSError, ValueError):
            pass
        try:  # the lease: kept current as helpers are replaced (the record is not)
            lease = json.loads((base / "net" / "leases.json").read_text())["leases"][self.vm_id]
        except (OSError, ValueError, KeyError):
            return
        self.veth, self.gateway = str(lease.get("veth") or ""), str(lease.get("gateway") or "")
        for key in ("holder", "slirp"):
            v = lease.get(key)
            if v and v not in self.helpers.setdefault(key, []):
                self.helpers[key].append(v)
                if key == "holder" and (ino := netns_inode(int(v[0]))) is not None:
                    self.netns.add(ino)

    def phase(self) -> str:
        if not self.vm_id:
            return "before-record"
        if not self.vmm:
            return "network-setup"
        if self.status != "running":
            return "booting"
        return "running-healthy" if self.health else "running"


@dataclass
class Run:
    index: int
    mode: str
    victim: str
    snapshot: str  # off | restore | write
    delay: float
    seen: Seen = field(default_factory=Seen)
    killed_at: float | None = None
    kill_phase: str = ""
    kill_how: str = ""
    exit_code: int | None = None
    line: str = ""
    traceback: bool = False
    hung: bool = False
    seconds: float = 0.0
    fcvm_pid: list[int] = field(default_factory=list)


def kill9(pid_start: list[int]) -> bool:
    if not alive(pid_start):
        return False
    try:
        os.kill(pid_start[0], signal.SIGKILL)
        return True
    except OSError:
        return False


def try_kill(run: Run, proc: subprocess.Popen[bytes], env: dict[str, str], name: str) -> bool:
    """Kill run's victim if it exists now; True once done."""
    s = run.seen
    if run.victim == "fcvm":
        return kill9(run.fcvm_pid)
    if run.victim == "vmm":
        return bool(s.vmm) and kill9(s.vmm)
    if run.victim in ("slirp4netns", "holder"):
        key = "slirp" if run.victim == "slirp4netns" else "holder"
        cur = s.helpers.get(key) or []
        return bool(cur) and kill9(cur[-1])
    if run.victim == "container":
        if s.status != "running" or not s.health:
            return False  # `fcvm exec` refuses a VM still starting
        how = (
            ["podman", "kill", "--signal", "KILL", "fcvm"]
            if run.index % 2
            else ["pkill", "-KILL", "-x", "sleep"]
        )
        r = fcvm("exec", "--name", name, "--vm", "--", *how, env=env, timeout=60)
        run.kill_how = " ".join(how)
        # refused before it ran (the VM not ready, or gone): try again, or the run ends;
        # anything else ran the kill (its own exit may be odd: the VM goes down under it)
        return r.returncode == 0 or not re.search(r"still starting|no running VM", r.stderr)
    raise AssertionError(run.victim)


def one_run(run: Run, base: Path, env: dict[str, str], sleep_s: float, logs: Path) -> None:
    name = f"fault-{run.index}"
    if run.snapshot == "write":
        for d in (base / "snapshots").glob("cache-*"):
            shutil.rmtree(d, ignore_errors=True)
    run_env = dict(env)
    if run.snapshot == "off":
        run_env["FCVM_NO_SNAPSHOT"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "fcvm",
        "podman",
        "run",
        "--name",
        name,
        "--network",
        run.mode,
        "-p",
        f"{free_port()}:80",
        IMAGE,
        "--",
        "sleep",
        str(sleep_s),
    ]
    err_path = logs / f"{name}.err"
    t0 = time.monotonic()
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=run_env)
    st = start_time(proc.pid)
    run.fcvm_pid = [proc.pid, st] if st is not None else []
    while proc.poll() is None:
        now = time.monotonic() - t0
        run.seen.learn(base, name)
        if run.killed_at is None and now >= run.delay:
            phase = run.seen.phase()
            if try_kill(run, proc, env, name):
                run.killed_at, run.kill_phase = round(now, 3), phase
        if now > RUN_TIMEOUT:
            run.hung = True
            proc.kill()
        time.sleep(0.02)
    run.seconds = round(time.monotonic() - t0, 3)
    run.exit_code = proc.returncode
    text = err_path.read_text(errors="replace")
    run.traceback = "Traceback (most recent call last)" in text
    lines = [x for x in text.splitlines() if x.strip()]
    ours = [x for x in lines if x.startswith("fcvm")]
    run.line = (ours or lines or ["(no output)"])[-1][:300]


# -- what is left -----------------------------------------------------------------------


def files_left(base: Path) -> set[str]:
    out = set()
    for root, _dirs, files in os.walk(base):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), base)
            if KEPT.match(rel):
                if rel.startswith("snapshots/cache-"):  # only a complete entry is kept
                    entry = base / rel.split("/")[0] / rel.split("/")[1]
                    if not (entry / "meta.json").is_file():
                        out.add(rel)
                continue
            out.add(rel)
    return out


def mounts() -> set[str]:
    return set(Path("/proc/mounts").read_text().splitlines())


def loops() -> set[str]:
    out = set()
    for d in Path("/sys/block").glob("loop*"):
        try:
            out.add(f"{d.name}:{(d / 'loop' / 'backing_file').read_text().strip()}")
        except OSError:
            continue
    return out


def host_links() -> set[str]:
    return {n for n in os.listdir("/sys/class/net") if re.match(r"^(tap|veth|fcvm)", n)}


def iptables_tags() -> collections.Counter[str]:
    tags: collections.Counter[str] = collections.Counter()
    for table in ("nat", "filter"):
        r = subprocess.run(["iptables", "-w", "-t", table, "-S"], capture_output=True, text=True)
        for m in re.finditer(r"--comment \"?fcvm:([A-Za-z0-9_.-]+)", r.stdout):
            tags[m.group(1)] += 1
    return tags


def named_netns() -> set[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}


def link_is(name: str, gateway: str) -> bool:
    if not Path(f"/sys/class/net/{name}").exists():
        return False
    r = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "dev", name], capture_output=True, text=True
    )
    return not gateway or f" {gateway}/" in r.stdout


def _run_leftovers(
    r: Run,
    base: Path,
    ps: dict[int, tuple[str, bytes, int | None]],
    tags: collections.Counter[str],
    leases: dict[str, Any],
) -> dict[str, list[str]]:
    """What of run r's VM is left: its processes, record, lease, netns, veth, rules."""
    s = r.seen
    left: dict[str, list[str]] = {k: [] for k in LEFT_KINDS}
    procs_left = left["processes"]
    if alive(r.fcvm_pid):
        procs_left.append(f"fcvm pid {r.fcvm_pid[0]}")
    if alive(s.vmm):
        procs_left.append(f"vmm pid {s.vmm[0]}")
    for key, seen in s.helpers.items():
        procs_left += [f"{key} pid {v[0]}" for v in seen if alive(v)]
    for ino in s.netns:
        users = [p for p, (_c, _cmd, n) in ps.items() if n == ino]
        if users:
            left["netns"].append(f"netns {ino} (pids {users})")
            named = " ".join(procs_left)
            procs_left += [
                f"{ps[p][0]} pid {p} in the VM's netns" for p in users if f"pid {p}" not in named
            ]
    if s.vm_id:
        if (base / "vms" / s.vm_id / "vm.json").exists():
            left["records"].append(s.vm_id)
        if s.vm_id in leases:
            left["leases"].append(s.vm_id)
        if tags.get(s.vm_id):
            left["iptables"].append(f"{tags[s.vm_id]} rules fcvm:{s.vm_id}")
    if s.veth and link_is(s.veth, s.gateway):
        left["links"].append(s.veth)
    return left


def _stray_processes(
    base: Path, ps: dict[int, tuple[str, bytes, int | None]], named: str
) -> list[str]:
    """qemu/slirp4netns/fcvm processes of this base directory no run accounts for."""
    out = []
    for pid, (comm, cmd, _n) in ps.items():
        if pid == os.getpid() or f"pid {pid}" in named:
            continue
        text = cmd.replace(b"\0", b" ").decode(errors="replace")
        if comm.startswith("qemu") and str(base) in text:
            out.append(f"qemu pid {pid}")
        elif comm == "slirp4netns" and str(base) in text:
            out.append(f"slirp4netns pid {pid}")
        elif "-m fcvm" in text and _environ_base(pid) == str(base):
            out.append(f"fcvm pid {pid}")
    return out


def leftovers(
    runs: list[Run], base: Path, first_seen: dict[str, dict[str, int]], before: dict[str, Any]
) -> tuple[dict[int, dict[str, list[str]]], dict[str, list[str]]]:
    """Per run: what of its VM is left; and what is left that no run can be named for."""
    ps = procs()
    tags = iptables_tags()
    leases: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError, KeyError):
        leases = json.loads((base / "net" / "leases.json").read_text())["leases"]
    per = {r.index: _run_leftovers(r, base, ps, tags, leases) for r in runs}
    unattributed: dict[str, list[str]] = {k: [] for k in LEFT_KINDS}
    named = " ".join(x for v in per.values() for x in v["processes"])
    unattributed["processes"] = _stray_processes(base, ps, named)
    ours = {r.seen.vm_id for r in runs if r.seen.vm_id}
    unattributed["iptables"] = [
        f"{n} rules fcvm:{t}" for t, n in tags.items() if t not in ours and t not in before["tags"]
    ]
    unattributed["netns"] = [f"named {n}" for n in named_netns() - before["named_netns"]]
    # links, mounts, loop devices and files: new since the start, attributed to the run
    # after which each first appeared
    veths = {x for v in per.values() for x in v["links"]}
    now = {
        "links": host_links() - before["links"] - veths,
        "mounts": {m for m in mounts() - before["mounts"] if str(base) in m or "nsfs" in m},
        "loop_devices": loops() - before["loops"],
        "files": files_left(base),
    }
    for kind, items in now.items():
        for item in sorted(items):
            idx = first_seen.get(kind, {}).get(item)
            (per[idx][kind] if idx is not None else unattributed[kind]).append(item)
    return per, unattributed


def _environ_base(pid: int) -> str:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return ""
    for kv in env:
        if kv.startswith(b"FCVM_BASE_DIR="):
            return kv.split(b"=", 1)[1].decode(errors="replace")
    return ""


def note_new(
    first_seen: dict[str, dict[str, int]], index: int, base: Path, before: dict[str, Any]
) -> None:
    """After run `index`: what appeared (links, mounts, loops, files) is noted as its."""
    current = {
        "links": host_links() - before["links"],
        "mounts": mounts() - before["mounts"],
        "loop_devices": loops() - before["loops"],
        "files": files_left(base),
    }
    for kind, items in current.items():
        seen = first_seen.setdefault(kind, {})
        for item in items:
            seen.setdefault(item, index)


# -- the plan and the report ------------------------------------------------------------


def plan(args: argparse.Namespace, rng: random.Random) -> list[tuple[str, str, str]]:
    """(mode, victim, snapshot) per run. Victims take turns (each round of them in a new
    random order, so a short run still meets every one); a victim's k-th run is in mode
    k % 2 (slirp4netns: rootless only) and without the image cache for k // 2 even, so
    each victim meets both modes and both paths. "on" is a restore, or for a quarter of
    them a write (the cache emptied first)."""
    modes = args.modes.split(",")
    victims = [v for v in args.victims.split(",") if v != "pageserver"]
    if "rootless" not in modes and "slirp4netns" in victims:
        victims.remove("slirp4netns")
    count: collections.Counter[str] = collections.Counter()
    out: list[tuple[str, str, str]] = []
    rng.shuffle(victims)
    first_mode = {v: i for i, v in enumerate(victims)}  # (so a short run has both modes)
    order: list[str] = []
    for _ in range(args.runs):
        if not order:
            order = victims[:]
            rng.shuffle(order)
        victim = order.pop()
        k = count[victim]
        count[victim] += 1
        if victim == "slirp4netns":
            mode, snap = "rootless", "off" if k % 2 == 0 else "on"
        else:
            mode = modes[(k + first_mode[victim]) % len(modes)]
            snap = "off" if (k // len(modes)) % 2 == 0 else "on"
        if snap == "on":
            snap = "write" if rng.random() < 0.25 else "restore"
        out.append((mode, victim, snap))
    return out


def summarize(runs: list[Run], per: dict[int, dict[str, list[str]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in runs:
        v = out.setdefault(
            r.victim,
            {
                "runs": 0,
                "killed": 0,
                "missed": 0,
                "hung": 0,
                "tracebacks": 0,
                "left_behind": {k: 0 for k in LEFT_KINDS},
                "left_detail": [],
                "exit_codes": collections.Counter(),
                "lines": collections.Counter(),
                "kill_phase": collections.Counter(),
                "modes": collections.Counter(),
                "snapshot": collections.Counter(),
                "seconds": [],
            },
        )
        v["runs"] += 1
        v["killed" if r.killed_at is not None else "missed"] += 1
        v["hung"] += int(r.hung)
        v["tracebacks"] += int(r.traceback)
        v["exit_codes"][str(r.exit_code)] += 1
        v["lines"][re.sub(r"\bpid \d+", "pid N", r.line)] += 1
        v["kill_phase"][r.kill_phase or "missed"] += 1
        v["modes"][r.mode] += 1
        v["snapshot"][r.snapshot] += 1
        v["seconds"].append(r.seconds)
        for kind, items in per[r.index].items():
            v["left_behind"][kind] += len(items)
            v["left_detail"] += [
                f"run {r.index} ({r.mode}, {r.snapshot}): {kind}: {x}" for x in items
            ]
    for v in out.values():
        secs = sorted(v.pop("seconds"))
        v["run_seconds"] = {"median": secs[len(secs) // 2], "max": secs[-1]}
        for k in ("exit_codes", "lines", "kill_phase", "modes", "snapshot"):
            v[k] = dict(v[k].most_common())
        if not v["left_detail"]:
            del v["left_detail"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--modes", default="rootless,bridged")
    ap.add_argument("--victims", default=",".join(VICTIMS))
    ap.add_argument("--sleep", type=float, default=3.0, help="the container's `sleep` (s)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--base-dir", type=Path, default=None, help="(default: a fresh one)")
    ap.add_argument("--keep-base", action="store_true", help="do not remove the base dir")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("faults.py: run as root (bridged networking, iptables, other users' /proc)")
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    rng = random.Random(seed)
    base = args.base_dir or Path(tempfile.mkdtemp(prefix="fcvm-faults-", dir="/var/lib"))
    base.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="fcvm-faults-logs-"))
    env = fcvm_env(base)
    before = {
        "links": host_links(),
        "mounts": mounts(),
        "loops": loops(),
        "tags": set(iptables_tags()),
        "named_netns": named_netns(),
    }
    t_start = time.monotonic()
    # how long a run lasts, per (mode, snapshot use): the shortest whole run of each kind
    # so far; until there is one, a guess (cold boot ~6 s under TCG, a restore ~1 s)
    expected: dict[tuple[str, bool], float] = {}
    runs: list[Run] = []
    first_seen: dict[str, dict[str, int]] = {}
    for i, (mode, victim, snap) in enumerate(plan(args, rng)):
        kind = (mode, snap == "restore")
        guess = expected.get(kind, args.sleep + (1.5 if snap == "restore" else 7.0))
        run = Run(i, mode, victim, snap, delay=round(rng.uniform(0, 0.9 * guess), 3))
        one_run(run, base, env, args.sleep, logs)
        if run.exit_code == 0:  # (the shortest whole run of its kind seen)
            expected[kind] = min(run.seconds, expected.get(kind, run.seconds))
        note_new(first_seen, i, base, before)
        runs.append(run)
        print(
            f"run {i}: {mode} {snap} {victim} at {run.delay:.2f}s "
            f"({run.kill_phase or 'missed'}) -> {run.exit_code} {run.line}",
            file=sys.stderr,
            flush=True,
        )
    gc = fcvm("gc", env=env)
    time.sleep(0.5)  # (helpers ending at EOF of their pipes take a moment)
    per, unattributed = leftovers(runs, base, first_seen, before)
    victims = summarize(runs, per)
    if "pageserver" in args.victims.split(","):
        victims["pageserver"] = {"runs": 0, "note": NO_PAGESERVER}
    total = {k: sum(len(per[r.index][k]) for r in runs) + len(unattributed[k]) for k in LEFT_KINDS}
    out: dict[str, Any] = {
        "runs": args.runs,
        "seed": seed,
        "sleep_s": args.sleep,
        "modes": args.modes,
        "base_dir": str(base),
        "seconds": round(time.monotonic() - t_start, 1),
        "gc": {
            "exit_code": gc.returncode,
            "reaped": len(gc.stdout.splitlines()),
            "stderr": gc.stderr.strip()[-300:],
        },
        "per_victim": victims,
        "left_behind_total": total,
        "unattributed": {k: v for k, v in unattributed.items() if v},
        "expected_run_seconds": {
            f"{m}/{'restore' if r else 'boot'}": s for (m, r), s in expected.items()
        },
    }
    bad = any(total.values()) or any(r.hung for r in runs) or gc.returncode != 0
    if bad:
        out["logs"] = str(logs)  # fcvm's stderr of every run, kept to look into
    print(json.dumps(out, indent=1))
    if not bad and not args.keep_base and args.base_dir is None:
        shutil.rmtree(base, ignore_errors=True)
    if not bad:
        shutil.rmtree(logs, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
