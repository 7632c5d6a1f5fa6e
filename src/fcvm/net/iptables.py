"""fcvm's own iptables chains for bridged mode.

    nat    PREROUTING  -m addrtype --dst-type LOCAL -j FCVM-PREROUTING   (DNAT, --publish)
    nat    OUTPUT      -m addrtype --dst-type LOCAL -j FCVM-OUTPUT       (DNAT from the host itself)
    nat    POSTROUTING -j FCVM-POSTROUTING                               (MASQUERADE)
    filter FORWARD     -j FCVM-FORWARD                                   (ACCEPT to/from the VM)

Every per-VM rule carries `-m comment --comment fcvm:<vm_id>`; teardown deletes
exactly the rules with its own tag, and the chains and jumps go away with the last
rule. All changes are made with one `iptables-restore --noflush` (never flushing
anything) while the caller holds the net lease lock, so concurrent fcvm processes
never race on chain creation.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from fcvm.net.proc import run, try_run
from fcvm.net.publish import PortForward


@dataclass(frozen=True)
class _Chain:
    table: str
    name: str
    parent: str
    match: tuple[str, ...]


CHAINS = (
    _Chain("nat", "FCVM-PREROUTING", "PREROUTING", ("-m", "addrtype", "--dst-type", "LOCAL")),
    _Chain("nat", "FCVM-OUTPUT", "OUTPUT", ("-m", "addrtype", "--dst-type", "LOCAL")),
    _Chain("nat", "FCVM-POSTROUTING", "POSTROUTING", ()),
    _Chain("filter", "FCVM-FORWARD", "FORWARD", ()),
)
_OURS = {c.name for c in CHAINS}


def _join(tokens: list[str]) -> str:
    """A rule line as iptables-restore reads it (double quotes, not shell quoting)."""
    return " ".join(f'"{t}"' if (not t or any(c.isspace() for c in t)) else t for t in tokens)


def tag_for(vm_id: str) -> str:
    return f"fcvm:{vm_id}"


def _dump(table: str) -> list[list[str]]:
    out = run(["iptables", "-w", "-t", table, "-S"], f"cannot read iptables table {table}")
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def _tag_of(rule: list[str]) -> str | None:
    for i, tok in enumerate(rule[:-1]):
        if tok == "--comment":
            return rule[i + 1]
    return None


def _jump_line(c: _Chain) -> str:
    return _join(["-I", c.parent, "1", *c.match, "-j", c.name])


def _restore(tables: dict[str, list[str]], what: str) -> None:
    body = "".join(
        f"*{t}\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n"
        for t, lines in tables.items()
        if lines
    )
    if body:
        run(["iptables-restore", "-w", "--noflush"], what, input=body)


def vm_rules(
    tag: str, veth: str, subnet: str, guest_ip: str, forwards: list[PortForward]
) -> dict[str, list[str]]:
    """The -A lines (per table) for one VM."""
    c = ["-m", "comment", "--comment", tag]
    nat = [
        ["-A", "FCVM-POSTROUTING", "-s", subnet, "!", "-o", veth, *c, "-j", "MASQUERADE"],
        # connections from the host's loopback to a published port (OUTPUT DNAT) leave
        # with a 127.x source: masquerade them to the veth address (route_localnet is on).
        ["-A", "FCVM-POSTROUTING", "-s", "127.0.0.0/8", "-o", veth, *c, "-j", "MASQUERADE"],
    ]
    for f in forwards:
        dst = [] if f.host_ip in ("", "0.0.0.0") else ["-d", f"{f.host_ip}/32"]
        for chain in ("FCVM-PREROUTING", "FCVM-OUTPUT"):
            nat.append(
                ["-A", chain, *dst, "-p", f.proto, "--dport", str(f.host_port), *c,
                 "-j", "DNAT", "--to-destination", f"{guest_ip}:{f.guest_port}"]
            )  # fmt: skip
    filt = [
        ["-A", "FCVM-FORWARD", "-i", veth, *c, "-j", "ACCEPT"],
        ["-A", "FCVM-FORWARD", "-o", veth, "-m", "conntrack", "--ctstate",
         "RELATED,ESTABLISHED,DNAT", *c, "-j", "ACCEPT"],
    ]  # fmt: skip
    return {"nat": [_join(r) for r in nat], "filter": [_join(r) for r in filt]}


def add_vm(tag: str, veth: str, subnet: str, guest_ip: str, forwards: list[PortForward]) -> None:
    """Create the chains/jumps if missing and append this VM's rules (lock held)."""
    lines: dict[str, list[str]] = {"nat": [], "filter": []}
    for table in lines:
        rules = _dump(table)
        chains = {r[1] for r in rules if r[:1] == ["-N"]}
        for c in CHAINS:
            if c.table != table:
                continue
            if c.name not in chains:
                lines[table].append(f"-N {c.name}")
            if not any(r[:2] == ["-A", c.parent] and r[-2:] == ["-j", c.name] for r in rules):
                lines[table].append(_jump_line(c))
    for table, new in vm_rules(tag, veth, subnet, guest_ip, forwards).items():
        lines[table].extend(new)
    _restore(lines, "cannot add iptables rules")


def remove_vm(tag: str) -> None:
    """Delete every rule tagged `tag`; drop chains and jumps left empty. Never raises."""
    try:
        lines: dict[str, list[str]] = {"nat": [], "filter": []}
        for table in lines:
            rules = _dump(table)
            remaining = 0
            for r in rules:
                if r[:1] != ["-A"] or r[1] not in _OURS:
                    continue
                if _tag_of(r) == tag:
                    lines[table].append(_join(["-D", *r[1:]]))
                else:
                    remaining += 1
            chains = {r[1] for r in rules if r[:1] == ["-N"]}
            if remaining == 0:
                for c in CHAINS:
                    if c.table != table:
                        continue
                    for r in rules:
                        if r[:2] == ["-A", c.parent] and r[-2:] == ["-j", c.name]:
                            lines[table].append(_join(["-D", *r[1:]]))
                    if c.name in chains:
                        lines[table].append(f"-X {c.name}")
        body = "".join(
            f"*{t}\n" + "".join(f"{x}\n" for x in ls) + "COMMIT\n" for t, ls in lines.items() if ls
        )
        if body:
            try_run(["iptables-restore", "-w", "--noflush"], input=body)
    except Exception:  # teardown never raises
        return


def rules_tagged(tag: str) -> list[str]:
    """Every rule carrying `tag` (for tests and diagnostics)."""
    out: list[str] = []
    for table in ("nat", "filter"):
        out += [_join(r) for r in _dump(table) if _tag_of(r) == tag]
    return out
