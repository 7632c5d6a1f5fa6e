"""What fcvm runs left behind on the host, for bench/faults.py: processes, records,
leases, network namespaces, host links, iptables rules, mounts, loop devices and files.

Each leftover is attributed to the run it belongs to, or after which it appeared:

    processes     qemu, slirp4netns, namespace holders (any process in a VM's network
                  namespace), fcvm processes of this base directory (page servers too)
    records       VM records (vms/<id>/vm.json), the page server's `serve-NAME` too
    leases        network leases
    netns         network namespaces of the runs' VMs still alive (or named)
    links         the runs' host links (bridged veths), new tap*/veth*/fcvm* links
    iptables      rules tagged fcvm:<vm id> of the runs' VMs
    mounts        mounts under the base directory, or new since the start
    loop_devices  loop devices backed by files under the base directory, or new
    files         files under the base directory beyond the persistent caches (image
                  exports and stores, complete snapshot cache entries, lock files):
                  the page server's socket (serve/NAME.sock) and a working set's temp
                  files among them; a named snapshot's files are kept only until
                  `fcvm snapshots rm` (anything left of it then counts)

Links, rules and loop devices of VMs of other base directories running beside the
runs (a test suite: learned from their VMMs' command lines and fcvm processes'
FCVM_BASE_DIR) are others', not counted.

Runs are duck-typed (faults.Run): `index`, `server` ([pid, start] of a page server),
`server_vm_id`, and `vms()` -> [(fcvm [pid, start], what was seen of its VM)].
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from faults import Run

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
    r"^(kvm-probe\.json|vmm-versions\.json|config\.toml|assets-checked"
    r"|images/[^/]+\.(oci\.tar|store\.ext4|store\.json)|images/\.[^/]+\.lock"
    r"|images/host-refs\.json"
    r"|net/leases\.(json|lock)|vms/\.lock|snapshots/\.cache-[^/]+\.create"
    r"|snapshots/cache-[^/]+/(meta\.json|memory|vmstate|lock|last-used|workingset|disk-[^/]+))$"
)
# ... and a named snapshot's, while it exists (not after `fcvm snapshots rm`)
SNAPSHOT_FILES = r"(meta\.json|memory|vmstate|lock|last-used|workingset|disk-[^/]+)"


# -- processes ---------------------------------------------------------------------------


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


# -- what is left -----------------------------------------------------------------------


def host_state() -> dict[str, Any]:
    """What is on the host before the runs (what is new after them is theirs)."""
    return {
        "links": host_links(),
        "mounts": mounts(),
        "loops": loops(),
        "tags": set(iptables_tags()),
        "named_netns": named_netns(),
    }


def files_left(base: Path, snapshot: str | None) -> set[str]:
    """Files under base that are not kept on purpose; the named snapshot's own files
    are, if it is given (it is not removed yet)."""
    named = re.compile(rf"^snapshots/{re.escape(snapshot)}/{SNAPSHOT_FILES}$") if snapshot else None
    out = set()
    for root, _dirs, files in os.walk(base):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), base)
            if named and named.match(rel):
                continue
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
    foreign: dict[str, set[str]],
) -> dict[str, list[str]]:
    """What of run r's VMs is left: their processes, records, leases, netns, veths,
    rules; and of its page server: the process and its record."""
    left: dict[str, list[str]] = {k: [] for k in LEFT_KINDS}
    procs_left = left["processes"]
    if alive(r.server):
        procs_left.append(f"page server pid {r.server[0]}")
    if r.server_vm_id and (base / "vms" / r.server_vm_id / "vm.json").exists():
        left["records"].append(f"{r.server_vm_id} (page server)")
    for fcvm_pid, s in r.vms():
        if alive(fcvm_pid):
            procs_left.append(f"fcvm pid {fcvm_pid[0]}")
        if alive(s.vmm):
            procs_left.append(f"vmm pid {s.vmm[0]}")
        for key, seen in s.helpers.items():
            procs_left += [f"{key} pid {v[0]}" for v in seen if alive(v)]
        for ino in s.netns:
            users = [p for p, (_c, _cmd, n) in ps.items() if n == ino]
            if users and not any(str(p) in foreign["pids"] for p in users):
                left["netns"].append(f"netns {ino} (pids {users})")
                named = " ".join(procs_left)
                procs_left += [f"{ps[p][0]} pid {p} in the VM's netns"
                               for p in users if f"pid {p}" not in named]  # fmt: skip
        if s.vm_id:
            if (base / "vms" / s.vm_id / "vm.json").exists():
                left["records"].append(s.vm_id)
            if s.vm_id in leases:
                left["leases"].append(s.vm_id)
            if tags.get(s.vm_id):
                left["iptables"].append(f"{tags[s.vm_id]} rules fcvm:{s.vm_id}")
        if s.veth and s.veth not in foreign["veths"] and link_is(s.veth, s.gateway):
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
    runs: list[Run],
    base: Path,
    first_seen: dict[str, dict[str, int]],
    before: dict[str, Any],
    snapshot: str | None,
    foreign: dict[str, set[str]] | None = None,
) -> tuple[dict[int, dict[str, list[str]]], dict[str, list[str]], dict[str, list[str]]]:
    """Per run: what of its VM is left; what is left that no run can be named for; and
    what is new since the start but others' (foreign: see foreign_now).
    snapshot: a named snapshot whose files are not counted (it was not removed)."""
    foreign = foreign or {"ids": set(), "veths": set(), "bases": set(), "pids": set()}
    ps = procs()
    tags = iptables_tags()
    leases: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError, KeyError):
        leases = json.loads((base / "net" / "leases.json").read_text())["leases"]
    per = {r.index: _run_leftovers(r, base, ps, tags, leases, foreign) for r in runs}
    others: dict[str, list[str]] = {}
    unattributed: dict[str, list[str]] = {k: [] for k in LEFT_KINDS}
    named = " ".join(x for v in per.values() for x in v["processes"])
    unattributed["processes"] = _stray_processes(base, ps, named)
    ours = {s.vm_id for r in runs for _p, s in r.vms() if s.vm_id}
    new_tags = {t: n for t, n in tags.items() if t not in ours and t not in before["tags"]}
    unattributed["iptables"] = [f"{n} rules fcvm:{t}" for t, n in new_tags.items()
                                if t not in foreign["ids"]]  # fmt: skip
    others["iptables"] = [f"{n} rules fcvm:{t}" for t, n in new_tags.items()
                          if t in foreign["ids"]]  # fmt: skip
    unattributed["netns"] = [f"named {n}" for n in named_netns() - before["named_netns"]]
    # links, mounts, loop devices and files: new since the start, attributed to the run
    # after which each first appeared
    veths = {x for v in per.values() for x in v["links"]}
    links = host_links() - before["links"] - veths
    new_loops = loops() - before["loops"]
    others["links"] = sorted(links & foreign["veths"])
    others["loop_devices"] = sorted(
        x
        for x in new_loops
        if any(x.split(":", 1)[1].startswith(b + "/") for b in foreign["bases"])
    )
    now = {
        "links": links - foreign["veths"],
        "mounts": {m for m in mounts() - before["mounts"] if str(base) in m or "nsfs" in m},
        "loop_devices": new_loops - set(others["loop_devices"]),
        "files": files_left(base, snapshot),
    }
    for kind, items in now.items():
        for item in sorted(items):
            idx = first_seen.get(kind, {}).get(item)
            (per[idx][kind] if idx is not None else unattributed[kind]).append(item)
    return per, unattributed, {k: v for k, v in others.items() if v}


# -- what belongs to others ------------------------------------------------------------
# A test suite or another fcvm may run VMs beside the harness: their links, rules and
# loop devices are new since the start too, but they are theirs. Their base directories
# are learned as they run (from their VMMs' command lines, which name BASE/vms/ID/, and
# from fcvm processes' FCVM_BASE_DIR); whatever those bases' records and leases name
# when the harness counts is theirs, not left behind by the harness's runs.

DEFAULT_BASE = "/var/lib/fcvm"  # (root's, without FCVM_BASE_DIR)
VM_DIR = re.compile(rb"(/[^\s,=\0]+)/vms/([0-9a-f]{8})/")


def note_foreign(base: Path, bases: set[str], ids: set[str], pids: set[int] | None = None) -> None:
    """Add to bases the base directories of other fcvm VMs and processes alive now,
    to ids their VMs' ids, and to pids (if given) their VMMs' and helpers' pids."""
    mine = str(base).encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        for m in VM_DIR.finditer(cmd):
            if m.group(1) != mine:
                bases.add(m.group(1).decode(errors="replace"))
                ids.add(m.group(2).decode())
                if pids is not None:
                    pids.add(int(d))
        if b"-m\0fcvm" in cmd and (b := _environ_base(int(d)) or DEFAULT_BASE) != str(base):
            bases.add(b)


def foreign_now(base: Path, bases: set[str], ids: set[str]) -> dict[str, set[str]]:
    """ids (VMs), veths, base directories and processes (VMMs, helpers) of others'
    VMs, as far as known now. (A namespace's inode number is reused once it is freed:
    one of a dead VM of the harness's may be another's live VM's now.)"""
    pids: set[int] = set()
    note_foreign(base, bases, ids, pids)
    out: dict[str, set[str]] = {"ids": set(ids), "veths": set(), "bases": set(bases)}
    out["pids"] = {str(p) for p in pids}
    for b in bases:
        with contextlib.suppress(OSError):
            out["ids"] |= {d.name for d in Path(b, "vms").iterdir() if d.is_dir()}
        with contextlib.suppress(OSError, ValueError, KeyError, AttributeError):
            leases = json.loads(Path(b, "net", "leases.json").read_text())["leases"]
            out["ids"] |= set(leases)
            out["veths"] |= {str(v["veth"]) for v in leases.values() if v.get("veth")}
            out["pids"] |= {str(v[k][0]) for v in leases.values() for k in ("holder", "slirp")
                            if isinstance(v.get(k), list) and v[k]}  # fmt: skip
    return out


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
    first_seen: dict[str, dict[str, int]],
    index: int,
    base: Path,
    before: dict[str, Any],
    snapshot: str | None,
) -> None:
    """After run `index`: what appeared (links, mounts, loops, files) is noted as its.
    What is gone is forgotten, so that the same name appearing again (a page server's
    socket, a reused loop device) is put down to the run after which it did."""
    current = {
        "links": host_links() - before["links"],
        "mounts": mounts() - before["mounts"],
        "loop_devices": loops() - before["loops"],
        "files": files_left(base, snapshot),
    }
    for kind, items in current.items():
        seen = first_seen.setdefault(kind, {})
        for item in set(seen) - items:
            del seen[item]
        for item in items:
            seen.setdefault(item, index)
