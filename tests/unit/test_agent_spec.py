"""ProcessSpec: one type for host and agent, validated at both ends.

The agent side runs for real over a socketpair (as in test_agent_protocol.py): a
malformed spec sent on a process channel is answered with an error event (125) and
the agent keeps serving; the exec relay refuses one from a client before the VM sees it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fcvm.agent.container import Container
from fcvm.agent.main import Agent
from fcvm.agent.procs import Reaper
from fcvm.agent.spec import (
    ContainerSetup,
    ImageSource,
    MapMount,
    ProcessSpec,
    SpecError,
    command_line,
)
from fcvm.relay import start_relay
from fcvm.remote import BufferStdio, run_remote
from fcvm.session import Frame, FrameType, Session, encode
from tests.unit.aio import arun, session_pair

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def test_round_trip() -> None:
    specs = [
        ProcessSpec(mode="vm", argv=("sh", "-c", "echo hi"), env=(("A", "1"),), workdir="/tmp"),
        ProcessSpec(mode="exec", argv=("top",), tty=True, rows=50, cols=132, user="1000"),
        ProcessSpec(mode="container", argv=("httpd",), health_check="http://localhost/",
                    health_timeout=5.5, env=(("http_proxy", "http://10.0.2.2:3128"),)),
        ProcessSpec(mode="container"),  # the image's own command
        ProcessSpec(mode="container", maps=(MapMount(0, "/data"), MapMount(7, "/a/b", True))),
        ProcessSpec(mode="exec", argv=("ls",), maps=(MapMount(1, "/x"),)),  # a clone's --exec
    ]  # fmt: skip
    for spec in specs:
        assert ProcessSpec.from_json(spec.to_json()) == spec
    setups = [
        ContainerSetup(image=ImageSource(ref="ab", store="/dev/vdb", device="/dev/vdc"),
                       privileged=True, entrypoint=("/init",), cmd=()),
        ContainerSetup(image=ImageSource(pull="quay.io/a/b:1"),
                       proxy_env=(("https_proxy", "http://10.0.2.2:3128"),)),
    ]  # fmt: skip
    for setup in setups:
        assert ContainerSetup.from_json(setup.to_json()) == setup


def test_podmans_rule_for_the_command_line() -> None:
    assert command_line(("/ep", "-x"), ("default",), ()) == ("/ep", "-x", "default")
    assert command_line(("/ep",), ("default",), ("given", "1")) == ("/ep", "given", "1")
    assert command_line((), ("/bin/sh",), ()) == ("/bin/sh",)
    assert command_line((), (), ()) == ()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("not an object", "spec must be a JSON object"),
        ({"mode": "bogus", "argv": ["x"]}, "mode must be one of"),
        ({"mode": "vm"}, "argv must not be empty"),
        ({"mode": "vm", "argv": "ls"}, "argv must be a list"),
        ({"mode": "vm", "argv": ["ls", 3]}, "argv[1] must be a string"),
        ({"mode": "vm", "argv": ["a\0b"]}, "contains a NUL"),
        ({"mode": "vm", "argv": ["ls"], "env": [["A"]]}, "env[0] must be a [KEY, VALUE] pair"),
        ({"mode": "vm", "argv": ["ls"], "env": [["A=B", "c"]]}, "contains '='"),
        ({"mode": "vm", "argv": ["ls"], "rows": 0}, "rows must be a whole number"),
        ({"mode": "vm", "argv": ["ls"], "tty": "yes"}, "tty must be true or false"),
        ({"mode": "vm", "argv": ["ls"], "user": "nobody"}, "user applies to the container"),
        ({"mode": "vm", "argv": ["ls"], "surprise": 1}, "unknown field 'surprise'"),
        ({"mode": "container", "image": {"ref": "x"}}, "unknown field 'image'"),
        ({"mode": "container", "user": "1000"}, "the container's workdir and user"),
        ({"mode": "container", "health_timeout": -1}, "health_timeout must be above 0"),
        ({"mode": "exec", "argv": ["ls"], "health_check": "http://x/"}, "for container mode"),
        ({"mode": "container", "maps": [{"channel": 8, "guest": "/d"}]}, "channel must be"),
        ({"mode": "container", "maps": [{"channel": 0, "guest": "d"}]}, "must be absolute"),
        ({"mode": "container", "maps": [{"channel": 0, "guest": "/"}]}, "must be absolute, not /"),
        ({"mode": "container", "maps": [{"channel": 0, "guest": "/a/../etc"}]}, "without '..'"),
        ({"mode": "container", "maps": [{"channel": 0, "guest": "/d", "x": 1}]}, "unknown field"),
        ({"mode": "container", "maps": [{"channel": 0, "guest": "/d", "read_only": "y"}]},
         "read_only must be true or false"),
        ({"mode": "container", "maps": [{"channel": 0, "guest": "/d"},
                                        {"channel": 0, "guest": "/e"}]}, "share a channel"),
        ({"mode": "container", "maps": [{"channel": 0, "guest": "/d"},
                                        {"channel": 1, "guest": "/d"}]}, "share a guest"),
        ({"mode": "container", "maps": [{"channel": i, "guest": f"/{i}"} for i in range(9)]},
         "at most 8 maps"),
        ({"mode": "vm", "argv": ["ls"], "maps": [{"channel": 0, "guest": "/d"}]},
         "not for vm mode"),
    ],
)  # fmt: skip
def test_malformed_specs_are_refused_with_the_field_named(data: Any, reason: str) -> None:
    with pytest.raises(SpecError) as info:
        ProcessSpec.from_json(data)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"image": {"ref": "x"}}, "needs store, device or pull"),
        ({"image": {"pull": "r", "store": "/dev/vdb"}}, "pull excludes"),
        ({"image": {"store": "/dev/vdb"}}, "needs the image ID"),
        ({"image": {"device": "/dev/vdb"}, "cmd": "sh"}, "setup.cmd must be a list"),
        ({"image": {"device": "/dev/vdb"}, "extra": 1}, "unknown field 'extra'"),
        ({}, "image must be a JSON object"),
    ],
)
def test_malformed_setups_are_refused(data: Any, reason: str) -> None:
    with pytest.raises(SpecError) as info:
        ContainerSetup.from_json(data)
    assert reason in str(info.value)


def test_the_host_cannot_build_a_malformed_spec_either() -> None:
    with pytest.raises(SpecError, match="argv must not be empty"):
        ProcessSpec(mode="exec")
    with pytest.raises(SpecError, match="rows"):
        ProcessSpec(mode="vm", argv=("ls",), rows=-3)


def test_what_fits_one_request_to_the_guest() -> None:
    """A spec travels in one channel-opening frame: it is refused, as a usage error
    (one line, exit 125 on the host), before it could fail to fit."""
    from fcvm.agent.spec import MAX_SPEC_JSON
    from fcvm.errors import UsageError
    from fcvm.session.frame import MAX_PAYLOAD

    assert MAX_SPEC_JSON + 4096 <= MAX_PAYLOAD  # room for the frame's other fields
    big = "x" * (MAX_SPEC_JSON - 200)
    assert ProcessSpec(mode="exec", argv=("echo", big)).argv[1] == big
    with pytest.raises(UsageError, match=r"take \d+ bytes: at most"):
        ProcessSpec(mode="exec", argv=("echo", big, "y" * 400))
    with pytest.raises(SpecError, match=r"argv\[1\] is 70000 characters long"):
        ProcessSpec(mode="exec", argv=("echo", "x" * 70000))
    with pytest.raises(SpecError, match="argv has 5000 items: at most 4096"):
        ProcessSpec(mode="exec", argv=("x",) * 5000)
    with pytest.raises(SpecError, match="contains a NUL"):
        ProcessSpec(mode="exec", argv=("a\0b",))


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["mode", "argv", "env", "image", "rows", "tty", "x"]), kids, max_size=5),
    max_leaves=12,
))  # fmt: skip
def test_any_json_is_a_spec_or_a_spec_error(data: Any) -> None:
    try:
        spec = ProcessSpec.from_json(data)
    except SpecError:
        return
    assert ProcessSpec.from_json(spec.to_json()) == spec


def _serve_agent(agent: Session) -> asyncio.Task[None]:
    reaper = Reaper(asyncio.get_running_loop())
    return asyncio.create_task(Agent(agent, reaper, Container(reaper)).serve())


async def _raw_proc(session: Session, spec: Any) -> dict[str, Any]:
    out = await session.open_channel({"kind": "stdio", "fd": 1})
    proc = await session.open_channel({"kind": "proc", "spec": spec, "stdio": {"1": out.id}})
    event: dict[str, Any] = await proc.recv_json()
    return event


def test_the_agent_refuses_a_malformed_spec_and_keeps_serving() -> None:
    async def main() -> None:
        host, agent = await session_pair()
        serve = _serve_agent(agent)
        event = await _raw_proc(host, {"mode": "vm", "argv": [1, 2]})
        assert event["event"] == "error" and event["code"] == 125
        assert "malformed process spec: argv[0] must be a string" in event["message"]
        stdio = BufferStdio()
        assert await run_remote(host, ProcessSpec(mode="vm", argv=("echo", "ok")), stdio) == 0
        assert bytes(stdio.stdout) == b"ok\n"
        await host.close()
        await asyncio.wait_for(serve, 5)
        await agent.close()

    arun(main())


def test_the_relay_refuses_a_malformed_spec_before_the_vm_sees_it(tmp_path: Any) -> None:
    async def main() -> None:
        host, agent = await session_pair()
        serve = _serve_agent(agent)
        sock = tmp_path / "exec.sock"
        relay = await start_relay(sock, host)
        reader, writer = await asyncio.open_unix_connection(str(sock))
        client = Session(reader, writer, role="host")
        await client.start(5)
        event = await _raw_proc(client, {"mode": "exec", "argv": []})
        assert (event["event"], event["code"]) == ("error", 125)
        assert "argv must not be empty" in event["message"]
        # ... and the same client's next, good, request goes through.
        spec = ProcessSpec(mode="vm", argv=("sh", "-c", "exit 3"))
        assert await run_remote(client, spec, BufferStdio()) == 3
        await client.close()
        relay.close()
        await host.close()
        await asyncio.wait_for(serve, 5)
        await agent.close()

    arun(main())


def test_an_exec_client_that_vanishes_is_not_a_warning(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that exits with the relay's frames unread resets the connection: the
    owner of the VM (`fcvm podman run`, printing to the user's terminal) printed that as
    a warning among the container's output."""

    async def main() -> None:
        host, agent = await session_pair()
        serve = _serve_agent(agent)
        sock = tmp_path / "exec.sock"
        relay = await start_relay(sock, host)
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(sock))
        hello = {"version": 1, "role": "host", "session": "00ff00ff00ff00ff"}
        raw.sendall(encode(Frame(FrameType.HELLO, 0, json.dumps(hello).encode())))
        await asyncio.sleep(0.3)  # the relay answers; the client never reads it
        raw.close()  # (unread data: the relay's next read is ECONNRESET)
        await asyncio.sleep(0.3)
        relay.close()
        await host.close()
        await asyncio.wait_for(serve, 5)
        await agent.close()

    caplog.set_level(logging.DEBUG, logger="fcvm")
    arun(main())
    lost = [r for r in caplog.records if "connection lost" in r.getMessage()]
    assert lost and "ConnectionResetError" in lost[0].getMessage()
    assert all(r.levelno == logging.DEBUG for r in lost), [r.levelname for r in lost]


def test_process_config_is_what_podman_gave_the_container(tmp_path: Path) -> None:
    """config.json's process: env, "UID:GID" and cwd, for `crun exec` to start from;
    anything missing or malformed is left to crun (an empty field)."""
    from fcvm.agent.proc_view import ProcessConfig, process_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"process": {"env": ["A=1", "B=x=y", "junk", 5],
                                            "user": {"uid": 33, "gid": 44, "umask": 18},
                                            "cwd": "/www"}}))  # fmt: skip
    assert process_config(str(path)) == ProcessConfig((("A", "1"), ("B", "x=y")), "33:44", "/www")
    path.write_text(json.dumps({"process": {"user": {"uid": "33"}, "cwd": "relative"}}))
    assert process_config(str(path)) == ProcessConfig()
    path.write_text("{not json")
    assert process_config(str(path)) == ProcessConfig()
    assert process_config(str(tmp_path / "missing")) == ProcessConfig()
