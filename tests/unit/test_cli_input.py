"""Bad input to `fcvm podman run` gets one clear line and exit 125, before any VM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import fcvm

pytestmark = pytest.mark.unit


@pytest.fixture
def empty_base(tmp_path: Path) -> dict[str, str]:
    return {"FCVM_BASE_DIR": str(tmp_path / "base")}


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--env", "NOEQUALS-"], "malformed --env"),
        (["--env", ",A=1"], "malformed --env"),
        (["--env", "FOO\n=bar"], "malformed --env"),
        (["--env", "1A=x"], "malformed --env"),
        (["--cpu", "two"], "malformed --cpu"),
        (["--cpu", "0"], "--cpu 0"),
        (["--cpu", "65"], "must be between 1 and 64"),
        ([f"--cpu={len(os.sched_getaffinity(0)) + 1}"], "this host has"),
        (["--mem", "lots"], "malformed --mem"),
        (["--mem", "1"], "--mem 1"),
        (["--cmd", "sh -c 'unterminated"], "malformed --cmd"),
        (["--health-check", "http://loc alhost/"], "malformed --health-check"),
        (["--health-check", "http://localhost:abc/"], "a port is a number"),
        (["--health-check", "http://localhost:99999/"], "a port is a number"),
        (["--health-check", "ftp://localhost/"], "malformed --health-check"),
        (["--stop-timeout", "-1"], "must be 0 and at most"),
        (["--health-timeout", "0"], "must be more than 0"),
    ],
)
def test_malformed_flags(flags: list[str], needle: str, empty_base: dict[str, str]) -> None:
    proc = fcvm("podman", "run", "--name", "bad", *flags, "busybox", env=empty_base)
    assert proc.returncode == 125
    assert needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_command_too_large_for_the_guest_is_refused_before_any_vm(
    empty_base: dict[str, str]
) -> None:
    # (no guest assets in this base: the refusal comes before anything else)
    proc = fcvm("podman", "run", "--name", "big", "busybox", "--", "echo", "x" * 70000,
                env=empty_base)  # fmt: skip
    assert proc.returncode == 125
    assert proc.stderr == "fcvm: argv[1] is 70000 characters long: at most 65536\n"


def test_unknown_flags_point_at_their_commands_help_and_rm_is_podmans(
    empty_base: dict[str, str]
) -> None:
    for argv, prog in ((["podman", "run", "--name", "x", "-d", "img"], "fcvm podman run"),
                       (["exec", "--name", "x", "--bogus", "--", "true"], "fcvm exec"),
                       (["--bogus"], "fcvm")):  # fmt: skip
        proc = fcvm(*argv, env=empty_base)
        assert proc.returncode == 125
        assert proc.stderr.endswith(f"(see {prog} --help)\n"), proc.stderr
    # --rm is accepted (VMs are always removed): this run gets as far as the assets.
    rm = fcvm("podman", "run", "--name", "x", "--rm", "img", env=empty_base)
    assert rm.stderr == "fcvm: guest assets are not set up (run `fcvm setup`)\n"


def test_a_missing_command_is_a_usage_error(empty_base: dict[str, str]) -> None:
    """As podman: a bare `fcvm` (its help) and `fcvm snapshot` (one line) exit 125; they
    exited 0 while `fcvm podman` exited 125."""
    bare = fcvm(env=empty_base)
    assert bare.returncode == 125 and "COMMAND" in bare.stdout
    for group in ("snapshot", "podman"):
        proc = fcvm(group, env=empty_base)
        assert proc.returncode == 125
        assert proc.stderr == ("fcvm: the following arguments are required: "
                               f"{'SUBCOMMAND' if group == 'snapshot' else 'COMMAND'} "
                               f"(see fcvm {group} --help)\n")  # fmt: skip


def test_snapshots_json_before_or_after_the_subcommand(empty_base: dict[str, str]) -> None:
    """`fcvm snapshots --json rm|prune` and `... rm|prune --json` are JSON (the parent's
    flag was overwritten by the subcommand's default, and rm had none)."""
    for argv in (["--json", "rm", "nosuch"], ["rm", "--json", "nosuch"]):
        proc = fcvm("snapshots", *argv, env=empty_base)
        assert (proc.returncode, proc.stdout) == (125, "[]\n"), proc.stderr
        assert proc.stderr == "fcvm: no snapshot named 'nosuch'\n"
    for argv in (["--json", "prune"], ["prune", "--json"]):
        proc = fcvm("snapshots", *argv, env=empty_base)
        assert (proc.returncode, proc.stdout) == (0, "[]\n"), proc.stderr


def test_a_stop_timeout_of_0_is_podman_s_at_once(empty_base: dict[str, str]) -> None:
    proc = fcvm("podman", "run", "--name", "x", "--stop-timeout", "0", "img", env=empty_base)
    assert proc.stderr == "fcvm: guest assets are not set up (run `fcvm setup`)\n"


def test_invalid_name(empty_base: dict[str, str]) -> None:
    proc = fcvm("podman", "run", "--name", "-x/y", "busybox", env=empty_base)
    assert proc.returncode == 125  # argparse rejects a leading dash itself: still 125
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = fcvm("podman", "run", "--name", "x/y", "busybox", env=empty_base)
    assert proc.returncode == 125 and "invalid name" in proc.stderr
    # ("$" matches before a final newline: such a name slipped past the uniqueness check)
    proc = fcvm("podman", "run", "--name", "x\n", "busybox", env=empty_base)
    assert proc.returncode == 125 and "invalid name" in proc.stderr


@pytest.mark.parametrize(
    ("value", "entries"),
    [
        ("A=1", ["A=1"]),
        ("A=1,B=2", ["A=1", "B=2"]),
        ("A=1,2", ["A=1,2"]),  # (was: malformed --env '2')
        ("NO_PROXY=localhost,127.0.0.1,.corp", ["NO_PROXY=localhost,127.0.0.1,.corp"]),
        ("OPTS=-Xmx1g,-Dx=y,B=2", ["OPTS=-Xmx1g,-Dx=y", "B=2"]),
        ("A=,B=1", ["A=", "B=1"]),
        ("FOO,BAR", ["FOO", "BAR"]),
        ("FOO,A=1", ["FOO", "A=1"]),
        ("A=1,", ["A=1,"]),
    ],
)
def test_env_commas_belong_to_values_unless_a_new_key_follows(
    value: str, entries: list[str]
) -> None:
    from fcvm.plan import split_env

    assert split_env(value) == entries


def test_a_bare_env_key_takes_fcvm_s_value_or_is_left_out(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:  # fmt: skip
    """As podman: --env KEY passes fcvm's own KEY, and nothing when fcvm has none (the
    image's value, if any, stays). It was an error."""
    from fcvm.plan import parse_env

    monkeypatch.setenv("FCVM_T_SET", "v")
    monkeypatch.delenv("FCVM_T_UNSET", raising=False)
    assert parse_env(["FCVM_T_SET,FCVM_T_UNSET", "B=2"]) == (("FCVM_T_SET", "v"), ("B", "2"))


@pytest.mark.parametrize("value", [",A=1", "FOO,,BAR", ""])
def test_env_empty_entries_are_refused(value: str) -> None:
    from fcvm.errors import UsageError
    from fcvm.plan import split_env

    with pytest.raises(UsageError, match="empty entry"):
        split_env(value)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["podman", "run", "--name", "x", "--network", "weird", "img"], "invalid choice: 'weird'"),
        (["podman", "run", "--name", "x", "--vmm", "xen", "img"], "invalid choice: 'xen'"),
        (["ls", "--pid", "abc"], "invalid int value: 'abc'"),
        (["no-such-command"], "invalid choice: 'no-such-command'"),
        (["podman"], "required: COMMAND"),
        (["podman", "run", "img"], "required: --name"),
        (["exec", "--name", "x"], "no command given"),
        (["exec", "--name", "x", "--pid", "1", "--", "true"], "not allowed with argument"),
        (["snapshot", "serve"], "required: NAME"),
        (["setup", "--bogus"], "unrecognized arguments: --bogus"),
        (["podman", "run", "--name", "x", "--stop-timeout", "soon", "img"],
         "malformed --stop-timeout"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_and_exit_125(
    argv: list[str], needle: str, empty_base: dict[str, str]
) -> None:
    """podman's convention (argparse's own would print the usage and exit 2)."""
    proc = fcvm(*argv, env=empty_base)
    assert proc.returncode == 125, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcvm: "), proc.stderr
    assert needle in lines[0]
    assert proc.stdout == ""


def test_assets_not_set_up_says_to_run_setup(empty_base: dict[str, str]) -> None:
    proc = fcvm("podman", "run", "--name", "x", "busybox", env=empty_base)
    assert proc.returncode == 125
    assert "fcvm setup" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_ls_on_empty_base(empty_base: dict[str, str]) -> None:
    proc = fcvm("ls", "--json", env=empty_base)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]"


def test_ls_says_what_state_each_vm_is_in(
    empty_base: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running VM whose container has not started is 'running (starting)': fcvm exec
    refuses it until then (it said just 'running'). A health is named, as podman ps
    does, only for a VM with a health check ('e' has none: it said '(healthy)')."""
    from fcvm import state

    monkeypatch.setenv("FCVM_BASE_DIR", empty_base["FCVM_BASE_DIR"])
    url = {"health_check": "http://127.0.0.1/"}
    for name, status, health, extra in [
        ("a", "booting", "", {}), ("b", "running", "", {}), ("c", "running", "healthy", url),
        ("d", "running", "unhealthy", url), ("e", "running", "healthy", {"health_check": ""}),
    ]:
        state.create(state.VmRecord(vm_id=state.new_vm_id(), name=name, status=status,
                                    health=health, extra=extra))  # fmt: skip
    lines = fcvm("ls", env=empty_base, check=True).stdout.splitlines()
    status = {line.split()[0]: line[lines[0].index("STATUS"):].split("  ")[0] for line in lines[1:]}
    assert status == {"a": "booting", "b": "running (starting)", "c": "running (healthy)",
                      "d": "running (unhealthy)", "e": "running"}  # fmt: skip


def test_output_into_a_closed_pipe_ends_quietly(empty_base: dict[str, str]) -> None:
    """`fcvm ls | head -0`: exit 141 as a writer killed by SIGPIPE, nothing on stderr
    (it printed "fcvm: Broken pipe" and exited 125)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "fcvm", "ls"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **empty_base})  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    assert proc.wait(60) == 141
    assert proc.stderr.read() == b""


def test_help_is_instant_and_complete() -> None:
    proc = fcvm("--help")
    assert proc.returncode == 0
    for command in ("setup", "podman", "ls", "gc"):
        assert command in proc.stdout


@pytest.mark.parametrize(("argv", "asyncio_loaded"), [
    (["--help"], False),
    (["ls"], False),
    (["exec", "--name", "t-no-such-vm", "--", "true"], True),
])  # fmt: skip
def test_only_commands_that_run_vms_load_asyncio_and_none_loads_ssl(
    argv: list[str], asyncio_loaded: bool, empty_base: dict[str, str]
) -> None:
    """Start-up cost: asyncio (~25 ms) only for the commands that need it, and without
    ssl (~10 ms) even then."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, sys\nfrom fcvm.cli.main import main\n"
        "try:\n main(sys.argv[1:])\nexcept SystemExit:\n pass\n"
        "print(json.dumps(['asyncio' in sys.modules, 'ssl' in sys.modules]), file=sys.stderr)"
    )
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                       env={**os.environ, **empty_base}, timeout=60)  # fmt: skip
    assert json.loads(r.stderr.strip().splitlines()[-1]) == [asyncio_loaded, False], r.stderr
