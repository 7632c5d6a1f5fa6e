"""`fcvm exec`, `-i`, `-t`, health: into one long-lived VM shared by the module.

Booting under TCG costs seconds, so one service VM serves every test here that
does not need a VM of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.conftest import fcvm
from tests.vm.tty import Tmux

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

SVC = "t-exec-svc"


def _records() -> dict[str, dict[str, object]]:
    return {r["name"]: r for r in json.loads(fcvm("ls", "--json", check=True).stdout)}


def _wait_health(name: str, want: str = "healthy", timeout: float = 120) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = _records().get(name)
        if rec and rec["health"] not in ("", "starting"):
            assert rec["health"] == want, rec
            return rec
        time.sleep(0.3)
    raise AssertionError(f"{name} never reported health")


def _started(name: str, image: str, *command: str) -> subprocess.Popen[bytes]:
    """`fcvm podman run --name NAME IMAGE -- COMMAND` in the background, healthy."""
    proc = subprocess.Popen([sys.executable, "-m", "fcvm", "podman", "run", "--name", name,
                             image, "--", *command],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_health(name)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


@pytest.fixture(scope="module")
def service(test_image: str) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fcvm", "podman", "run", "--name", SVC, test_image,
         "--", "sleep", "3600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        rec = _wait_health(SVC)
        assert rec["status"] == "running"
        yield SVC
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert SVC not in _records()


def test_exec_output_and_exit_codes(service: str) -> None:
    ok = fcvm("exec", "--name", service, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (ok.returncode, ok.stdout, ok.stderr) == (7, "out\n", "err\n")
    assert fcvm("exec", "--name", service, "--", "true").returncode == 0
    not_found = fcvm("exec", "--name", service, "--", "no-such-command")
    assert not_found.returncode == 127
    cannot_run = fcvm("exec", "--name", service, "--", "/etc/passwd")
    assert cannot_run.returncode == 126
    no_dir = fcvm("exec", "--name", service, "-w", "/no-such-dir", "--", "true")
    assert no_dir.returncode == 127
    # Why, in one line of fcvm's (crun's own copy of it on the command's stderr is
    # held back until the command runs, and dropped when it never does).
    for proc, words in ((not_found, "`no-such-command` not found"),
                        (cannot_run, "Permission denied"), (no_dir, "/no-such-dir")):  # fmt: skip
        (line,) = proc.stderr.splitlines()
        assert line.startswith("fcvm: ") and words in line, proc.stderr


def test_exec_env_workdir(service: str) -> None:
    proc = fcvm("exec", "--name", service, "-e", "X=42", "-w", "/tmp", "--",
                "sh", "-c", 'echo "$X $(pwd)"')  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, "42 /tmp\n")


def test_vm_flag_runs_in_the_guest_not_the_container(service: str) -> None:
    probe = ["sh", "-c", "test -x /usr/bin/podman && echo guest || echo container"]
    assert fcvm("exec", "--name", service, "--vm", "--", *probe).stdout == "guest\n"
    assert fcvm("exec", "--name", service, "--", *probe).stdout == "container\n"


def test_guest_network_as_the_host_set_it_up(service: str) -> None:
    """eth0 carries the addresses and default routes the host passed (IPv6 too, when
    the host has it: rootless mode then gives the guest fd00::100)."""
    from fcvm.net.rootless import _host_has_ipv6

    show = fcvm("exec", "--name", service, "--vm", "--", "sh", "-c",
                "ip addr show dev eth0; ip route; ip -6 route", check=True).stdout  # fmt: skip
    assert "inet 10.0.2.100/24" in show and "default via 10.0.2.2" in show, show
    if _host_has_ipv6():
        assert "inet6 fd00::100/64" in show and "default via fd00::2" in show, show


def test_agent_reaps_orphans(service: str) -> None:
    """PID 1 (the agent) inherits orphans and must reap them: no zombies pile up."""
    script = "for i in 1 2 3 4 5; do (sleep 0.1 &) ; done; sleep 1; ps -eo stat= | grep -c ^Z"
    proc = fcvm("exec", "--name", service, "--vm", "--", "sh", "-c", script)
    assert proc.stdout.strip() == "0", proc.stdout + proc.stderr


def test_exec_by_pid(service: str) -> None:
    pid = _records()[service]["pid"]
    proc = fcvm("exec", "--pid", str(pid), "--", "hostname")
    assert (proc.returncode, proc.stdout) == (0, f"{service}\n")


def test_concurrent_execs(service: str) -> None:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fcvm",
                "exec",
                "--name",
                service,
                "--",
                "sh",
                "-c",
                f"sleep 1; echo {i}; exit {i}",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    results = [(p.communicate(timeout=120)[0], p.returncode) for p in procs]
    assert results == [(f"{i}\n", i) for i in range(4)]


def test_stdin_100mb_through_the_container(service: str, tmp_path: object) -> None:
    data = os.urandom(1 << 20) * 100
    proc = subprocess.run(
        [sys.executable, "-m", "fcvm", "exec", "-i", "--name", service, "--", "sha256sum"],
        input=data, capture_output=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_a_killed_exec_takes_its_children_with_it(service: str) -> None:
    """fcvm exec killed -9 (and the API's timeout, which sends SIGKILL the same way):
    the command's whole process group is killed, a shell's background children too.
    Only the shell went; its children lived on in the container."""

    def left() -> list[str]:
        ps = fcvm("exec", "--name", service, "--", "ps", "-o", "args").stdout
        return [line for line in ps.splitlines() if "sleep 30" in line]

    p = subprocess.Popen([sys.executable, "-m", "fcvm", "exec", "--name", service, "--",
                          "sh", "-c", "sleep 301 & echo started; sleep 302"],
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert p.stdout is not None and p.stdout.readline() == "started\n"
        assert len(left()) == 2
    finally:
        p.kill()
        p.wait()
    deadline = time.monotonic() + 10
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left() == []


def test_an_exec_whose_vm_goes_away_says_so(test_image: str) -> None:
    """The container's main process killed from an exec (--vm): the VM stops, and the
    exec ends either with its command's death (137) or with one line naming the cause
    (it said the agent had closed the process channel)."""
    name = "t-exec-gone"
    proc = _started(name, test_image, "sleep", "601")
    try:
        done = fcvm("exec", "--name", name, "--vm", "--", "sh", "-c",
                    'kill -9 $(pgrep -f "sleep 601"); sleep 30')  # fmt: skip
        assert done.returncode in (125, 137), done.stderr
        if done.returncode == 125:
            assert done.stderr == (f"fcvm: VM {name!r} went away while the command ran (its "
                                   "container exited, or it was stopped)\n")  # fmt: skip
        assert proc.wait(30) == 137
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_output_that_cannot_be_written_is_said(service: str) -> None:
    """fcvm's stdout a full disk (/dev/full): one warning, the command's own exit code.
    (The output was dropped in silence.)"""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "fcvm", "exec", "--name", service, "--",
                               "sh", "-c", "echo lost; exit 3"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 3
    assert proc.stderr == ("fcvm: warning: cannot write the container's output: No space "
                           "left on device (the rest of it is dropped)\n")  # fmt: skip


def test_stdin_eof_reaches_the_command(service: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fcvm", "exec", "-i", "--name", service, "--", "wc", "-c"],
        input=b"12345", capture_output=True, timeout=60,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout.strip()) == (0, b"5")


def test_stdin_from_dev_null_is_an_eof(service: str) -> None:
    """epoll refuses /dev/null (EPERM): it used to leave the command waiting forever."""
    with open(os.devnull, "rb") as null:
        proc = subprocess.run(
            [sys.executable, "-m", "fcvm", "exec", "-i", "--name", service, "--", "wc", "-c"],
            stdin=null, capture_output=True, timeout=60,
        )  # fmt: skip
    assert (proc.returncode, proc.stdout.strip()) == (0, b"0"), proc.stderr


def test_output_nobody_reads_ends_the_exec_as_sigpipe_would(service: str) -> None:
    """`fcvm exec ... -- yes | head`: exit 141 and the command gone from the guest."""
    argv = [sys.executable, "-m", "fcvm", "exec", "--name", service, "--", "yes", "t-exec-pipe"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.read(12) == b"t-exec-pipe\n"
        p.stdout.close()
        assert p.wait(timeout=60) == 128 + signal.SIGPIPE
    finally:
        if p.poll() is None:
            p.kill()
    left = fcvm("exec", "--name", service, "--", "ps", "-o", "args")
    assert "t-exec-pipe" not in left.stdout


def test_a_terminal_exec_ends_with_fcvm_and_with_its_input(service: str) -> None:
    """exec -t went through podman exec: interrupting fcvm killed podman and left the
    command running in the container, and piped input's end never reached it."""
    argv = [sys.executable, "-m", "fcvm", "exec", "-t", "--name", service, "--", "sleep", "207"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while "sleep 207" not in fcvm("exec", "--name", service, "--", "ps", "-o", "args").stdout:
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 130
    finally:
        if p.poll() is None:
            p.kill()
    assert "sleep 207" not in fcvm("exec", "--name", service, "--", "ps", "-o", "args").stdout
    piped = subprocess.run(
        [sys.executable, "-m", "fcvm", "exec", "-it", "--name", service, "--",
         "sh", "-c", "cat; exit 6"],
        input=b"a1\nb2\n", capture_output=True, timeout=60,
    )  # fmt: skip
    assert piped.returncode == 6, piped.stderr
    assert piped.stdout.replace(b"\r\n", b"\n").endswith(b"a1\nb2\n")


def test_tty_alone_gives_a_terminal(service: str) -> None:
    proc = fcvm("exec", "--name", service, "-t", "--", "sh", "-c", "test -t 1 && echo tty")
    assert proc.returncode == 0
    assert proc.stdout.strip() == "tty"


def test_exec_errors(service: str) -> None:
    gone = fcvm("exec", "--name", "no-such-vm", "--", "true")
    assert gone.returncode == 125
    assert "no running VM named 'no-such-vm'" in gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1
    empty = fcvm("exec", "--name", service)
    assert empty.returncode == 125 and "no command" in empty.stderr


def test_interactive_terminal(service: str, tmux: Tmux, tmp_path: object) -> None:
    """Type into sh, follow a resize, Ctrl-C and Ctrl-Z a program, edit with vi, leave
    with Ctrl-D, and find the host terminal as it was."""
    before, after = f"{tmp_path}/stty.before", f"{tmp_path}/stty.after"
    fcvm_cmd = shlex.join(
        [sys.executable, "-m", "fcvm", "exec", "--name", service, "-it", "--", "sh"]
    )
    tmux.send(f"stty -g > {before}; {fcvm_cmd}; stty -g > {after}; echo DONE-$?", "Enter")
    tmux.wait_for("/ #")  # capture-pane drops trailing spaces
    tmux.send("stty size", "Enter")
    tmux.wait_for("30 100")
    tmux.check_resize_and_ctrl_c()
    # Ctrl-Z stops the foreground job of the guest's shell (job control works).
    tmux.send("clear; sleep 200", "Enter")
    time.sleep(1.5)
    tmux.send("C-z")
    tmux.wait_for("Stopped")
    tmux.send("kill -9 %1", "Enter")
    # A full-screen editor.
    tmux.send("clear; vi /tmp/edited.txt", "Enter")
    # vi's own screen (empty lines shown as "~"), not the echo of the command: vi
    # discards input typed before it set up the terminal.
    tmux.wait_for("\n~")
    tmux.send("i")
    tmux.send("hello from vi")
    tmux.send("Escape")
    time.sleep(1.0)  # vi waits briefly to tell a lone ESC from an escape sequence
    tmux.send(":wq", "Enter")
    # Upper-cased, so neither vi's screen nor the typed command can match it.
    tmux.send("clear; tr a-z A-Z < /tmp/edited.txt", "Enter")
    tmux.wait_for("HELLO FROM VI")
    tmux.send("C-d")  # EOF to the shell ends the session
    tmux.wait_for("DONE-0")
    with open(before) as b, open(after) as a:
        assert b.read() == a.read(), "host terminal settings were not restored"
    back = fcvm("exec", "--name", service, "--", "cat", "/tmp/edited.txt")
    assert back.stdout == "hello from vi\n"


def _with_health_check(name: str, url: str, *args: str) -> subprocess.Popen[str]:
    """`fcvm podman run --name NAME --health-check URL ARGS...` in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "fcvm", "podman", "run", "--name", name, "--health-check", url,
         *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def user_image(test_image: str) -> Iterator[str]:
    """The test image with USER www-data (33) and WORKDIR /www (podman commit of a
    created, never started container: no build, no registry)."""
    image, tmp = "localhost/fcvm-busybox-user:latest", "t-exec-user-build"
    subprocess.run(["podman", "rm", "-f", tmp], capture_output=True)
    subprocess.run(["podman", "create", "--name", tmp, test_image], check=True,
                   capture_output=True)  # fmt: skip
    try:
        subprocess.run(["podman", "commit", "-q", "--change", "USER www-data", "--change",
                        "WORKDIR /www", tmp, image], check=True, capture_output=True)  # fmt: skip
    finally:
        subprocess.run(["podman", "rm", "-f", tmp], capture_output=True)
    yield image
    subprocess.run(["podman", "rmi", "-f", image], capture_output=True)


def test_exec_runs_as_the_image_s_user_in_its_workdir(user_image: str) -> None:
    """As `podman exec`: the container's user and working directory unless -u/-w say
    otherwise (crun's own defaults, root in /, gave images built to run unprivileged a
    root shell)."""
    name = "t-exec-user"
    proc = _started(name, user_image, "sleep", "600")
    try:
        who = "id -u; id -g; pwd"
        assert fcvm("exec", "--name", name, "--", "sh", "-c", who).stdout == "33\n33\n/www\n"
        root = fcvm("exec", "--name", name, "-u", "0", "-w", "/tmp", "--", "sh", "-c", who)
        assert root.stdout == "0\n0\n/tmp\n", root.stderr
        main = fcvm("exec", "--name", name, "--", "sh", "-c", "stat -c %u /proc/1")
        assert main.stdout == "33\n"  # (the container's own process, for comparison)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_health_check_url(test_image: str) -> None:
    name = "t-health"
    proc = _with_health_check(name, "http://127.0.0.1:8080/index.html", test_image,
                              "--", "httpd", "-f", "-p", "8080", "-h", "/www")  # fmt: skip
    try:
        # Right after start the VM is still booting: exec says so instead of hanging.
        deadline = time.monotonic() + 60
        while name not in _records() and time.monotonic() < deadline:
            time.sleep(0.05)
        early = fcvm("exec", "--name", name, "--", "true")
        assert early.returncode == 125
        assert "still starting" in early.stderr
        rec = _wait_health(name, "healthy")
        assert rec["status"] == "running"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_health_check_that_never_answers(test_image: str) -> None:
    name = "t-unhealthy"
    proc = _with_health_check(name, "http://127.0.0.1:9/", "--health-timeout", "3", test_image,
                              "--", "sleep", "600")  # fmt: skip
    try:
        _wait_health(name, "unhealthy")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_exec_while_the_health_check_has_not_passed(test_image: str) -> None:
    """As podman: a started container whose health check has not passed yet takes
    execs (one looks in to see why), and fcvm ls says it is starting. It was refused
    ('still starting') for the whole --health-timeout."""
    name = "t-health-wait"
    proc = _with_health_check(name, "http://127.0.0.1:9/", "--health-timeout", "120",
                              test_image, "--", "sleep", "600")  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while _records().get(name, {}).get("health") != "starting":
            assert time.monotonic() < deadline and proc.poll() is None, _records()
            time.sleep(0.2)
        looked = fcvm("exec", "--name", name, "--", "echo", "in")
        assert (looked.returncode, looked.stdout) == (0, "in\n"), looked.stderr
        rows = fcvm("ls", check=True).stdout.splitlines()
        assert "running (starting)" in next(row for row in rows if row.startswith(name))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
