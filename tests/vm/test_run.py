"""`fcvm podman run` end to end in a real microVM."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import fcvm
from tests.vm.conftest import fcvm_vmm_processes, vm_dirs
from tests.vm.tty import Tmux

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300), pytest.mark.usefixtures("no_leftovers")]


def test_hello_world(test_image: str) -> None:
    proc = fcvm("podman", "run", "--name", "t-hello", test_image, "--", "echo", "hello world")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello world\n"
    assert proc.stderr == ""  # fcvm says nothing of itself unless FCVM_LOG asks


def test_exit_code_and_separate_streams(test_image: str) -> None:
    proc = fcvm("podman", "run", "--name", "t-exit", "--cmd",
                "sh -c 'echo out; echo err >&2; exit 42'", test_image)  # fmt: skip
    assert proc.returncode == 42
    assert proc.stdout == "out\n"
    assert proc.stderr == "err\n"


def test_env_cpu_mem_reach_the_guest(test_image: str) -> None:
    script = 'echo "$A|$B|$C"; nproc; grep MemTotal /proc/meminfo; hostname'
    proc = fcvm("podman", "run", "--name", "t-env", "--env", "A=1,B=two words", "-e", "C=3",
                "--cpu", "2", "--mem", "768", test_image, "--",
                "sh", "-c", script)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "1|two words|3"
    assert lines[1] == "2"
    mem_kib = int(lines[2].split()[1])
    assert 600 * 1024 < mem_kib <= 768 * 1024
    assert lines[3] == "t-env"


@pytest.mark.parametrize("kind", ["oci-archive", "docker-archive"])
def test_image_from_archive(kind: str, image_archives: dict[str, Path]) -> None:
    proc = fcvm("podman", "run", "--name", f"t-{kind}", f"{kind}:{image_archives[kind]}",
                "--", "sh", "-c", "echo from $0", kind)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"from {kind}\n"


def _start(name: str, image: str, *cmd: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fcvm", "podman", "run", "--name", name, image, "--", *cmd],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_running(name: str, timeout: float = 120, *, healthy: bool = False
                  ) -> dict[str, object]:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in json.loads(fcvm("ls", "--json", check=True).stdout):
            ready = rec["status"] == "running" and (not healthy or rec["health"] == "healthy")
            if rec["name"] == name and ready:
                return rec  # type: ignore[no-any-return]
        time.sleep(0.3)
    raise AssertionError(f"{name} never reached running")


def _wait_healthy(name: str) -> dict[str, object]:
    """Until the container runs (a signal before that stops the VM instead)."""
    return _wait_running(name, healthy=True)


def test_two_vms_at_once_and_ls_json(test_image: str) -> None:
    a = _start("t-two-a", test_image, "sh", "-c", "sleep 4; echo a")
    b = _start("t-two-b", test_image, "sh", "-c", "sleep 4; echo b")
    try:
        rec_a, rec_b = _wait_running("t-two-a"), _wait_running("t-two-b")
        assert rec_a["pid"] == a.pid and rec_b["pid"] == b.pid
        assert rec_a["vmm"] in ("qemu", "firecracker")
        assert rec_a["image"] == test_image and rec_a["cpus"] == 1 and rec_a["mem_mib"] == 1024
        only_a = json.loads(fcvm("ls", "--json", "--pid", str(a.pid), check=True).stdout)
        assert [r["name"] for r in only_a] == ["t-two-a"]
        dup = fcvm("podman", "run", "--name", "t-two-a", test_image, "--", "true")
        assert dup.returncode == 125
        assert "already running" in dup.stderr and len(dup.stderr.strip().splitlines()) == 1
        assert a.communicate(timeout=120)[0] == "a\n"
        assert b.communicate(timeout=120)[0] == "b\n"
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert a.returncode == 0 and b.returncode == 0
    names = [r["name"] for r in json.loads(fcvm("ls", "--json", check=True).stdout)]
    assert "t-two-a" not in names and "t-two-b" not in names


def test_sigterm_is_forwarded_and_the_container_decides(test_image: str) -> None:
    """podman's --sig-proxy: a container that traps SIGTERM and exits 7 makes fcvm exit 7,
    and nothing but the container's own output is printed. SIGUSR1 and SIGUSR2 are
    passed on too (they killed fcvm), and a SIGTERM that arrives twice at once (a
    wrapper passing on what fcvm also got) is one signal, not a stop of the VM."""
    script = ('trap "echo got USR1" USR1; trap "echo got USR2" USR2; '
              'trap "echo got TERM; sleep 1; exit 7" TERM; '
              'echo ready; while :; do sleep 0.1; done')  # fmt: skip
    p = _start("t-sigfwd", test_image, "sh", "-c", script)
    try:
        _wait_healthy("t-sigfwd")
        assert p.stdout is not None
        # (healthy = started: the shell may not have reached its trap yet)
        first = p.stdout.readline()
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            p.send_signal(sig)
            first += p.stdout.readline()
        p.send_signal(signal.SIGTERM)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert (p.returncode, first + out, err) == (7, "ready\ngot USR1\ngot USR2\ngot TERM\n", "")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_second_signal_stops_the_vm(test_image: str, sig: int, code: int) -> None:
    """`sleep` as the container's PID 1 ignores the forwarded signal; the second one
    stops the VM at once, quietly."""
    name = f"t-sig{sig}"
    p = _start(name, test_image, "sleep", "600")
    try:
        _wait_healthy(name)
        p.send_signal(sig)
        time.sleep(0.5)
        assert p.poll() is None  # forwarded, ignored: still running
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert (p.returncode, err) == (code, "")


def test_output_nobody_reads_ends_the_run_as_sigpipe_would(test_image: str) -> None:
    """`fcvm podman run ... -- yes | head -c 4`: the reader goes, so the run ends as a
    pipeline's writer would (exit 141, quietly; the VM stopped). It ran forever: the
    output was read and dropped while `yes` went on."""
    p = _start("t-pipe", test_image, "yes")
    try:
        assert p.stdout is not None
        assert p.stdout.read(4) == "y\ny\n"
        p.stdout.close()
        code = p.wait(timeout=60)
        err = p.stderr.read() if p.stderr is not None else ""
    finally:
        if p.poll() is None:
            p.kill()
    assert (code, err) == (128 + signal.SIGPIPE, "")


def test_a_container_that_ignores_the_signal_is_stopped_after_stop_timeout(
    test_image: str,
) -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "fcvm", "podman", "run", "--name", "t-stoptimeout",
         "--stop-timeout", "1", test_image, "--", "sleep", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_healthy("t-stoptimeout")
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
        waited = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert (p.returncode, err) == (143, "")
    assert waited >= 1.0


def test_killed_vmm_ends_the_run(test_image: str) -> None:
    p = _start("t-vmmkill", test_image, "sleep", "600")
    try:
        rec = _wait_running("t-vmmkill")
        os.kill(int(rec["vmm_pid"]), signal.SIGKILL)  # type: ignore[call-overload]
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 125
    assert "stopped unexpectedly" in err


def test_kill9_of_fcvm_is_reaped_by_next_command(test_image: str) -> None:
    p = _start("t-kill9", test_image, "sleep", "600")
    rec = _wait_running("t-kill9")
    p.kill()
    p.wait()
    # The VMM dies with its parent (PDEATHSIG)...
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(rec["vm_id"] in c for c in fcvm_vmm_processes()):
        time.sleep(0.1)
    assert not any(str(rec["vm_id"]) in c for c in fcvm_vmm_processes())
    # ...so do the network helpers (slirp4netns, the namespace holder)...
    while time.monotonic() < deadline and _processes_mentioning(str(rec["vm_id"])):
        time.sleep(0.1)
    assert not _processes_mentioning(str(rec["vm_id"]))
    # ...and the next fcvm command removes the record, directory and network lease.
    assert str(rec["vm_id"]) in vm_dirs()
    listed = json.loads(fcvm("ls", "--json", check=True).stdout)
    assert all(r["name"] != "t-kill9" for r in listed)
    assert str(rec["vm_id"]) not in vm_dirs()
    from fcvm import paths

    leases = paths.net_dir() / "leases.json"
    assert not leases.exists() or str(rec["vm_id"]) not in leases.read_text()


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(cmdline.decode(errors="replace"))
    return found


def test_registry_reference_is_pulled_in_the_guest_and_fails_clearly(guest_assets: None) -> None:
    """No registry is reachable here: the pull path runs in the guest and its failure is
    one clear line (with podman's reason), exit 125."""
    proc = fcvm(
        "podman", "run", "--name", "t-pull", "docker.io/library/alpine:latest", "--", "true"
    )
    assert proc.returncode == 125
    assert "cannot pull docker.io/library/alpine:latest in the guest" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("delay", [0.2, 1.0])
def test_sigterm_while_starting_leaves_nothing(test_image: str, delay: float) -> None:
    """SIGTERM during setup (network, image, boot) unwinds everything made so far."""
    p = _start(f"t-early{int(delay * 10)}", test_image, "sleep", "600")
    time.sleep(delay)
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    # 143 once fcvm handles signals; a signal that lands before Python has even
    # started fcvm kills it outright, with nothing made yet (no_leftovers checks).
    assert p.returncode in (143, -signal.SIGTERM)


@pytest.mark.parametrize("boot", ["restored", "cold"])
def test_tty_alone_gives_the_container_a_named_terminal(test_image: str, boot: str) -> None:
    """`-t` with stdin not a terminal, as podman: the container's stdout is a terminal
    of its own devpts (so `tty` names it), CR-LF on the way out. On a booted VM and on
    one restored from the image cache: both start the container through the gate."""
    flags = ["--no-snapshot"] if boot == "cold" else []
    fcvm("podman", "run", "--name", "t-tty0", test_image, "--", "true")  # (the cache entry)
    proc = subprocess.run([sys.executable, "-m", "fcvm", "podman", "run", "--name", "t-tty",
                           "-t", *flags, test_image, "--",
                           "sh", "-c", "test -t 0 && test -t 1 && tty; exit 4"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=180)  # fmt: skip
    assert (proc.returncode, proc.stdout) == (4, b"/dev/pts/0\r\n"), proc.stderr


def test_interactive_terminal_in_the_container(test_image: str, tmux: Tmux) -> None:
    """`podman run -it -- sh` at a real terminal: a prompt, the terminal's size and its
    changes, Ctrl-C to the container's foreground program, the shell's exit code."""
    cmd = shlex.join([sys.executable, "-m", "fcvm", "podman", "run", "--name", "t-it", "-it",
                      test_image, "--", "sh"])  # fmt: skip
    tmux.send(f"{cmd}; echo DONE-$?", "Enter")
    tmux.wait_for("/ #")
    tmux.send("clear; tty; stty size", "Enter")
    tmux.wait_for("/dev/pts/0\n30 100")
    tmux.check_resize_and_ctrl_c()
    tmux.send("exit 3", "Enter")
    tmux.wait_for("DONE-3")


def test_the_end_of_piped_input_reaches_the_containers_terminal(test_image: str) -> None:
    """`printf ... | fcvm podman run -it ... -- sh -c 'cat; exit 6'`: stdin's end is typed
    on the container's terminal as its EOF character, so cat ends (it waited forever)."""
    proc = subprocess.run(
        [sys.executable, "-m", "fcvm", "podman", "run", "-it", "--name", "t-it-pipe", test_image,
         "--", "sh", "-c", "cat; exit 6"],
        input=b"a1\nb2\n", capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 6, proc.stderr
    assert proc.stdout.replace(b"\r\n", b"\n").endswith(b"a1\nb2\n")
    # As podman: a terminal fed from a pipe is said to be one (an interactive shell that
    # edits its own lines may never see the end of such input).
    assert proc.stderr.decode().splitlines() == [
        "fcvm: warning: the input device is not a TTY: -t with -i may not work as expected "
        "(without -t, the input is a pipe)"
    ]


def test_privileged_gives_all_capabilities_and_the_guests_devices(test_image: str) -> None:
    script = "grep CapEff /proc/self/status; test -e /dev/vda && echo has-vda; exit 0"
    plain = fcvm("podman", "run", "--name", "t-unpriv", test_image, "--", "sh", "-c", script)
    priv = fcvm("podman", "run", "--name", "t-priv", "--privileged", test_image, "--",
                "sh", "-c", script)  # fmt: skip
    assert plain.returncode == 0 and priv.returncode == 0, plain.stderr + priv.stderr
    caps = {name: int(p.stdout.split()[1], 16) for name, p in (("plain", plain), ("priv", priv))}
    sys_admin = 1 << 21
    assert caps["priv"] & sys_admin and not caps["plain"] & sys_admin
    assert "has-vda" in priv.stdout and "has-vda" not in plain.stdout
