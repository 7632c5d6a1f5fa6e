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
    pageserver   `fcvm snapshot serve fault-snap`, the page server of a named snapshot
                 the harness makes once at its start (`fcvm snapshot create` of a VM it
                 runs for that, then stops; removed at the end with `fcvm snapshots
                 rm`). Its run starts the server and, once it is serving (or dead), two
                 clones with `fcvm snapshot run --pid SERVER`: `--exec 'sleep SLEEP'`
                 (fault-I) and one attached to the snapshot's container (fault-I-a, a
                 shell loop that exits 0 on the SIGINT the harness sends SLEEP s after
                 it became healthy), in the run's network mode with a published port.
                 The kill lands from the server's spawn through the clones' life. On
                 QEMU the clones map the memory file privately and never depend on the
                 server: each must exit 0, or - only if the kill came before its record
                 existed - 125 with "no page server with pid" (it looked the server up
                 after its death). Anything else counts as an unexpected clone exit,
                 and so does the server's socket missing while it lives (nothing but
                 the server may remove it). A run's exit code and line are the exec
                 clone's; both clones' and the server's are listed under "pageserver".
                 (On Firecracker a clone would fault its memory from the server and stop
                 with one line when it dies; this backend cannot show that.)

A victim that does not exist yet at that moment (no VMM before the network is up, no
container before the guest answers) is killed as soon as it does; "missed" counts the
runs that ended first. After the runs, one `fcvm gc`, then, per victim, what was left
behind (bench/leftovers.py says what is counted and how it is attributed to a run:
processes, records, leases, netns, links, iptables rules, mounts, loop devices,
files); others' VMs running beside the harness are not counted: "others_not_counted"
lists what of theirs was seen.

Also per victim: exit codes of fcvm, the distinct last lines fcvm printed ("fcvm: ..."),
how many stderr outputs held a Python traceback, runs that hung (killed after 120 s),
and where in the VM's life the kill landed (for the page server: serve-starting,
serving, or clone-PHASE of the exec clone). The VM that made the named snapshot is
counted the same way (under "template"). Needs root (bridged mode, iptables).
Exit status 1 if anything was left behind, a run hung, a clone of a killed page server
ended otherwise than it must, or the named snapshot could not be made or removed.
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

from leftovers import (
    LEFT_KINDS,
    alive,
    foreign_now,
    host_state,
    leftovers,
    netns_inode,
    note_foreign,
    note_new,
    start_time,
)

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
IMAGE = "localhost/fcvm-busybox"
VICTIMS = ("fcvm", "vmm", "slirp4netns", "holder", "container", "pageserver")
SNAP = "fault-snap"  # the named snapshot the page servers serve
TEMPLATE = "fault-template"  # the VM it is made of
# The template's container: a loop a SIGINT ends with 0 (an attached clone goes on
# with it from where the snapshot left it, so the same SIGINT ends the clone with 0).
TEMPLATE_CMD = 'trap "exit 0" INT TERM; while :; do sleep 0.2; done'
NO_SERVER = "no page server with pid"
RUN_TIMEOUT = 120.0
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
        return "running-healthy" if self.health not in ("", "starting") else "running"


@dataclass
class Clone:
    """One `fcvm snapshot run --pid` of a page-server run."""

    name: str
    how: str  # exec | attached
    seen: Seen = field(default_factory=Seen)
    fcvm_pid: list[int] = field(default_factory=list)
    spawned: float = 0.0
    healthy_at: float | None = None
    interrupted: bool = False  # (attached: the SIGINT that ends it sent)
    before_kill: bool = False  # its record existed when the server was killed
    exit_code: int | None = None
    line: str = ""
    seconds: float = 0.0


@dataclass
class Run:
    index: int
    mode: str
    victim: str
    snapshot: str  # off | restore | write; named (the page server's clones)
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
    # a page-server run: the server ([pid, start], its record's id) and its clones
    server: list[int] = field(default_factory=list)
    server_vm_id: str = ""
    server_code: int | None = None
    clones: list[Clone] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # clone exits that must not be

    def vms(self) -> list[tuple[list[int], Seen]]:
        """(fcvm [pid, start], what was seen of its VM) of each VM of the run."""
        if self.clones:
            return [(c.fcvm_pid, c.seen) for c in self.clones]
        return [(self.fcvm_pid, self.seen)]


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
    run.line, run.traceback = last_line(err_path)


def last_line(err_path: Path) -> tuple[str, bool]:
    """The last line fcvm printed (its own "fcvm: ..." first), and whether the output
    held a Python traceback."""
    text = err_path.read_text(errors="replace")
    lines = [x for x in text.splitlines() if x.strip()]
    ours = [x for x in lines if x.startswith("fcvm")]
    return (ours or lines or ["(no output)"])[-1][:300], "Traceback (most recent call" in text


def spawn(
    args: list[str], env: dict[str, str], err_path: Path, **kw: Any
) -> subprocess.Popen[bytes]:
    with open(err_path, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "fcvm", *args], stderr=err, env=env, **kw)


def pid_start(pid: int) -> list[int]:
    st = start_time(pid)
    return [pid, st] if st is not None else []


# -- the page server's run --------------------------------------------------------------


def make_template(base: Path, env: dict[str, str], logs: Path) -> tuple[Run, dict[str, Any]]:
    """Run a VM, `fcvm snapshot create` it as SNAP, stop it (SIGINT: its loop exits 0).
    The VM is a Run of its own (index -1) so that what it leaves is counted."""
    run = Run(-1, "rootless", "template", "off", 0.0)
    info: dict[str, Any] = {"name": SNAP}
    fcvm("snapshots", "rm", SNAP, env=env)  # (a --base-dir used before)
    cold = {**env, "FCVM_NO_SNAPSHOT": "1"}  # (the image cache is the runs' to fill)
    t0 = time.monotonic()
    proc = spawn(["podman", "run", "--name", TEMPLATE, "--network", "rootless", IMAGE, "--",
                  "sh", "-c", TEMPLATE_CMD], cold, logs / f"{TEMPLATE}.err",
                 stdout=subprocess.DEVNULL)  # fmt: skip
    run.fcvm_pid = pid_start(proc.pid)
    try:
        while proc.poll() is None and not (run.seen.status == "running" and run.seen.health):
            run.seen.learn(base, TEMPLATE)
            if time.monotonic() - t0 > RUN_TIMEOUT:
                run.hung = True
                break
            time.sleep(0.05)
        if proc.poll() is None and not run.hung:
            info["boot_seconds"] = round(time.monotonic() - t0, 3)
            made = fcvm("snapshot", "create", TEMPLATE, "--tag", SNAP, "--json", env=env,
                        timeout=600)  # fmt: skip
            info["create_exit_code"] = made.returncode
            if made.returncode == 0:
                info.update(json.loads(made.stdout))
            else:
                info["create_stderr"] = made.stderr.strip()[-300:]
            proc.send_signal(signal.SIGINT)  # (to the container: its loop exits 0)
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        run.hung = True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run.exit_code = proc.returncode
    run.seconds = round(time.monotonic() - t0, 3)
    run.line, run.traceback = last_line(logs / f"{TEMPLATE}.err")
    info["ok"] = info.get("create_exit_code") == 0 and run.exit_code == 0 and not run.hung
    return run, info


def server_phase(run: Run, ready: bool) -> str:
    if not ready:
        return "serve-starting"
    if not run.clones:
        return "serving"
    c = run.clones[0]
    return "clone-exited" if c.exit_code is not None else f"clone-{c.seen.phase()}"


def one_pageserver_run(
    run: Run, base: Path, env: dict[str, str], sleep_s: float, logs: Path
) -> None:
    """`fcvm snapshot serve SNAP`, two clones of it by --pid once it serves (or is dead),
    the server killed at run.delay; the clones must end as they would without it."""
    name = f"fault-{run.index}"
    t0 = time.monotonic()
    server = spawn(["snapshot", "serve", SNAP, "--json"], env, logs / f"{name}.serve.err",
                   stdout=subprocess.PIPE)  # fmt: skip
    assert server.stdout is not None
    out_fd = server.stdout.fileno()
    os.set_blocking(out_fd, False)
    run.server = pid_start(server.pid)
    out = b""
    ready = False
    sock: Path | None = None  # the server's socket, once it serves
    procs: list[subprocess.Popen[bytes]] = []
    try:
        while True:
            now = time.monotonic() - t0
            if not ready:
                with contextlib.suppress(BlockingIOError):
                    out += os.read(out_fd, 4096)
                if b"\n" in out:
                    ready = True
                    with contextlib.suppress(ValueError, KeyError):
                        info = json.loads(out.splitlines()[0])
                        run.server_vm_id, sock = str(info["vm_id"]), Path(info["socket"])
            # (a live server's socket is there for its whole life: nothing else unlinks it)
            if sock and run.killed_at is None and alive(run.server) and not sock.exists():
                run.unexpected.append(f"the page server's socket {sock} vanished while it served")
                sock = None
            if not procs and (ready or server.poll() is not None):
                # (a dead server's pid too: the clones must refuse it in one line)
                for c_name, how, extra in (
                    (name, "exec", ["--exec", f"sleep {sleep_s:g}"]),
                    (f"{name}-a", "attached", []),
                ):
                    c = Clone(c_name, how, spawned=now)
                    procs.append(spawn(
                        ["snapshot", "run", "--pid", str(server.pid), "--name", c_name,
                         "--network", run.mode, "-p", f"{free_port()}:80", *extra],
                        env, logs / f"{c_name}.err", stdout=subprocess.DEVNULL,
                    ))  # fmt: skip
                    c.fcvm_pid = pid_start(procs[-1].pid)
                    run.clones.append(c)
            for c, proc in zip(run.clones, procs, strict=True):
                if c.exit_code is not None:
                    continue
                c.seen.learn(base, c.name)
                if (code := proc.poll()) is not None:
                    c.exit_code, c.seconds = code, round(now - c.spawned, 3)
                    continue
                if c.healthy_at is None and c.seen.status == "running" and c.seen.health:
                    c.healthy_at = now
                if (c.how == "attached" and not c.interrupted and c.healthy_at is not None
                        and now - c.healthy_at >= sleep_s):  # fmt: skip
                    proc.send_signal(signal.SIGINT)  # (forwarded: the loop exits 0)
                    c.interrupted = True
            if run.killed_at is None and now >= run.delay and kill9(run.server):
                run.killed_at, run.kill_phase = round(now, 3), server_phase(run, ready)
                for c in run.clones:
                    c.before_kill = bool(c.seen.vm_id)
            if procs and all(c.exit_code is not None for c in run.clones):
                break
            if now > RUN_TIMEOUT:
                run.hung = True
                break
            time.sleep(0.02)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if server.poll() is None:  # (the kill missed: stopped as a user would)
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                run.hung = True
                server.kill()
                server.wait()
        server.stdout.close()
    run.server_code = server.returncode
    run.seconds = round(time.monotonic() - t0, 3)
    for c, proc in zip(run.clones, procs, strict=True):
        if c.exit_code is None:
            c.exit_code = proc.returncode
        c.line, tb = last_line(logs / f"{c.name}.err")
        run.traceback |= tb
        ok = c.exit_code == 0 or (
            c.exit_code == 125
            and NO_SERVER in c.line
            and run.killed_at is not None
            and not c.before_kill
        )
        if not ok:
            run.unexpected.append(f"{c.how} clone {c.name}: exit {c.exit_code}: {c.line}")
    run.traceback |= last_line(logs / f"{name}.serve.err")[1]
    run.exit_code = run.clones[0].exit_code if run.clones else None
    run.line = run.clones[0].line if run.clones else "(no clone)"




# -- the plan and the report ------------------------------------------------------------


def plan(args: argparse.Namespace, rng: random.Random) -> list[tuple[str, str, str]]:
    """(mode, victim, snapshot) per run. Victims take turns (each round of them in a new
    random order, so a short run still meets every one); a victim's k-th run is in mode
    k % 2 (slirp4netns: rootless only) and without the image cache for k // 2 even, so
    each victim meets both modes and both paths. "on" is a restore, or for a quarter of
    them a write (the cache emptied first). A page server's run is "named": its clones
    restore the named snapshot."""
    modes = args.modes.split(",")
    victims = args.victims.split(",")
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
        elif victim == "pageserver":  # (its clones restore the named snapshot)
            mode, snap = modes[(k + first_mode[victim]) % len(modes)], "named"
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
        if r.victim == "pageserver":
            ps = v.setdefault("pageserver", {
                "server_exit_codes": collections.Counter(),
                "clone_exit_codes": collections.Counter(),
                "clone_lines": collections.Counter(),
                "clone_seconds": {"exec": [], "attached": []},
                "unexpected_clone_exits": [],
            })  # fmt: skip
            ps["server_exit_codes"][str(r.server_code)] += 1
            for c in r.clones:
                ps["clone_exit_codes"][f"{c.how}:{c.exit_code}"] += 1
                ps["clone_lines"][re.sub(r"\bpid \d+", "pid N", f"{c.how}: {c.line}")] += 1
                ps["clone_seconds"][c.how].append(c.seconds)
            ps["unexpected_clone_exits"] += [f"run {r.index}: {x}" for x in r.unexpected]
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
        if ps := v.get("pageserver"):
            for k in ("server_exit_codes", "clone_exit_codes", "clone_lines"):
                ps[k] = dict(ps[k].most_common())
            for how, secs in ps["clone_seconds"].items():
                secs.sort()
                ps["clone_seconds"][how] = (
                    {"median": secs[len(secs) // 2], "max": secs[-1]} if secs else {}
                )
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
    before = host_state()
    t_start = time.monotonic()
    runs_plan = plan(args, rng)
    first_seen: dict[str, dict[str, int]] = {}
    foreign_bases: set[str] = set()  # (others' VMs beside the harness: not counted)
    foreign_ids: set[str] = set()
    note_foreign(base, foreign_bases, foreign_ids)
    template: Run | None = None
    named: dict[str, Any] = {}
    if any(victim == "pageserver" for _m, victim, _s in runs_plan):
        template, named = make_template(base, env, logs)
        note_new(first_seen, template.index, base, before, SNAP)
        print(f"template: {named}", file=sys.stderr, flush=True)
    # how long a run lasts, per (mode, kind): the shortest whole run of each kind so far;
    # until there is one, a guess (cold boot ~6 s under TCG, a restore ~1 s; a page
    # server's: its start, two clones restored, sleep, the attached one interrupted)
    guesses = {"boot": 7.0, "restore": 1.5, "pageserver": 3.0}
    expected: dict[tuple[str, str], float] = {}
    runs: list[Run] = []
    for i, (mode, victim, snap) in enumerate(runs_plan):
        kind = (mode, "pageserver" if victim == "pageserver"
                else "restore" if snap == "restore" else "boot")  # fmt: skip
        guess = expected.get(kind, args.sleep + guesses[kind[1]])
        run = Run(i, mode, victim, snap, delay=round(rng.uniform(0, 0.9 * guess), 3))
        if victim == "pageserver":
            one_pageserver_run(run, base, env, args.sleep, logs)
        else:
            one_run(run, base, env, args.sleep, logs)
        if run.exit_code == 0 and all(c.exit_code == 0 for c in run.clones):
            expected[kind] = min(run.seconds, expected.get(kind, run.seconds))
        note_new(first_seen, i, base, before, SNAP)
        note_foreign(base, foreign_bases, foreign_ids)
        runs.append(run)
        clones = "".join(f" [{c.how} {c.exit_code}]" for c in run.clones[1:])
        print(
            f"run {i}: {mode} {snap} {victim} at {run.delay:.2f}s "
            f"({run.kill_phase or 'missed'}) -> {run.exit_code}{clones} {run.line}",
            file=sys.stderr,
            flush=True,
        )
    gc = fcvm("gc", env=env)
    if template is not None:  # the named snapshot goes (refused if a clone still held it)
        rm = fcvm("snapshots", "rm", SNAP, env=env)
        named["rm_exit_code"] = rm.returncode
        if rm.returncode != 0:
            named["rm_stderr"] = rm.stderr.strip()[-300:]
    time.sleep(0.5)  # (helpers ending at EOF of their pipes take a moment)
    counted = runs + ([template] if template is not None else [])
    per, unattributed, others = leftovers(
        counted, base, first_seen, before,
        snapshot=SNAP if named.get("rm_exit_code", 0) != 0 else None,
        foreign=foreign_now(base, foreign_bases, foreign_ids),
    )  # fmt: skip
    victims = summarize(runs, per)
    total = {
        k: sum(len(per[r.index][k]) for r in counted) + len(unattributed[k]) for k in LEFT_KINDS
    }
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
        # new since the start but of other base directories' VMs (a test suite beside)
        "others_not_counted": others,
        "other_base_dirs": sorted(foreign_bases),
        "expected_run_seconds": {f"{m}/{k}": s for (m, k), s in expected.items()},
    }
    if template is not None:
        named["template"] = {
            "exit_code": template.exit_code,
            "seconds": template.seconds,
            "line": template.line,
            "hung": template.hung,
            "left_behind": {k: len(v) for k, v in per[template.index].items()},
        }
        if any(per[template.index].values()):
            named["template"]["left_detail"] = per[template.index]
        out["named_snapshot"] = named
    bad = (
        any(total.values())
        or any(r.hung for r in runs)
        or gc.returncode != 0
        or any(r.unexpected for r in runs)
        or (template is not None and not (named["ok"] and named["rm_exit_code"] == 0))
    )
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
