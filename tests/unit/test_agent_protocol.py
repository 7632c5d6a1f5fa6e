"""The agent and the host's process client, end to end over a socketpair.

No VM: the agent's request loop runs in this process and executes guest-OS
commands ("vm" mode) locally, exactly as it does as PID 1 in the guest. What is
real: the session protocol, the agent's process plumbing, and the host client.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from fcvm.agent.container import Container
from fcvm.agent.main import Agent
from fcvm.agent.procs import Reaper
from fcvm.agent.spec import ProcessSpec
from fcvm.remote import LocalStdio, RemoteProcessError, run_remote
from fcvm.session import Session

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


async def _pair() -> tuple[Session, Session, asyncio.Task[None]]:
    a, b = socket.socketpair()
    hr, hw = await asyncio.open_connection(sock=a)
    ar, aw = await asyncio.open_connection(sock=b)
    host = Session(hr, hw, role="host")
    agent = Session(ar, aw, role="agent")
    await asyncio.gather(host.start(timeout=5), agent.start(timeout=5))
    reaper = Reaper(asyncio.get_running_loop())
    serve = asyncio.create_task(Agent(agent, reaper, Container(reaper)).serve())
    return host, agent, serve


def run(coro_fn: Callable[[Session], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        host, agent, serve = await _pair()
        try:
            return await coro_fn(host)
        finally:
            await host.close()
            await asyncio.wait_for(serve, 5)
            await agent.close()

    return asyncio.run(main())


class Capture:
    """A pipe whose read end is drained in a thread; .data() after the write end closes."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self._chunks: list[bytes] = []
        import threading

        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while chunk := os.read(self.r, 65536):
            self._chunks.append(chunk)
        os.close(self.r)

    def data(self) -> bytes:
        os.close(self.w)
        self._thread.join(10)
        return b"".join(self._chunks)


def vm_spec(*argv: str, **extra: Any) -> ProcessSpec:
    return ProcessSpec(mode="vm", argv=argv, **extra)


def test_stdout_stderr_and_exit_code_are_kept_apart() -> None:
    out, err = Capture(), Capture()

    async def body(host: Session) -> int:
        spec = vm_spec("sh", "-c", "echo to-out; echo to-err >&2; exit 7")
        return await run_remote(host, spec, LocalStdio(stdout=out.w, stderr=err.w))

    assert run(body) == 7
    assert out.data() == b"to-out\n"
    assert err.data() == b"to-err\n"


def test_env_and_workdir_reach_the_process(tmp_path: Any) -> None:
    out = Capture()

    async def body(host: Session) -> int:
        spec = vm_spec("sh", "-c", 'echo "$GREETING $(pwd)"', env=[["GREETING", "hi"]],
                       workdir=str(tmp_path))  # fmt: skip
        return await run_remote(host, spec, LocalStdio(stdout=out.w, stderr=2))

    assert run(body) == 0
    assert out.data() == f"hi {tmp_path}\n".encode()


@pytest.mark.parametrize(("argv", "code"), [(["/nonexistent/cmd"], 127), (["/etc/hostname"], 126)])
def test_command_that_cannot_run(argv: list[str], code: int) -> None:
    async def body(host: Session) -> int:
        return await run_remote(host, vm_spec(*argv), LocalStdio())

    with pytest.raises(RemoteProcessError) as info:
        run(body)
    assert info.value.exit_code == code


def test_signal_death_is_reported_as_128_plus_signal() -> None:
    async def body(host: Session) -> int:
        return await run_remote(host, vm_spec("sh", "-c", "kill -TERM $$"), LocalStdio())

    assert run(body) == 128 + 15


def test_stdin_stream_is_complete_and_checksummed(tmp_path: Any) -> None:
    """20 MB through `sha256sum` in the 'guest': nothing lost, EOF delivered."""
    payload = os.urandom(1 << 20) * 20
    src = tmp_path / "in.bin"
    src.write_bytes(payload)
    out = Capture()
    r, w = os.pipe()  # a pipe, like `cat file | fcvm exec -i`

    async def body(host: Session) -> int:
        async def feed() -> None:
            await asyncio.to_thread(_write_file_to_fd, src, w)

        feeder = asyncio.create_task(feed())
        code = await run_remote(host, vm_spec("sha256sum"), LocalStdio(stdin=r, stdout=out.w))
        await feeder
        return code

    assert run(body) == 0
    os.close(r)
    assert out.data().split()[0].decode() == hashlib.sha256(payload).hexdigest()


def _write_file_to_fd(path: Any, fd: int) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            os.write(fd, chunk)
    os.close(fd)


def test_concurrent_processes_share_one_session() -> None:
    captures = [Capture() for _ in range(6)]

    async def body(host: Session) -> list[int]:
        return list(
            await asyncio.gather(
                *(
                    run_remote(host, vm_spec("sh", "-c", f"sleep 0.2; echo {i}; exit {i}"),
                               LocalStdio(stdout=c.w))
                    for i, c in enumerate(captures)
                )
            )
        )  # fmt: skip

    assert run(body) == list(range(6))
    assert [c.data() for c in captures] == [f"{i}\n".encode() for i in range(6)]


def test_tty_mode_gives_a_terminal_of_the_requested_size() -> None:
    out = Capture()

    async def body(host: Session) -> int:
        spec = vm_spec("sh", "-c", "tty >/dev/null && stty size", tty=True, rows=33, cols=101)
        return await run_remote(host, spec, LocalStdio(stdout=out.w, tty=True))

    assert run(body) == 0
    assert out.data().strip() == b"33 101"


def test_resize_reaches_the_terminal() -> None:
    out = Capture()

    async def body(host: Session) -> int:
        procs: list[Any] = []
        spec = vm_spec("sh", "-c", "sleep 0.5; stty size", tty=True, rows=24, cols=80)
        task = asyncio.create_task(
            run_remote(host, spec, LocalStdio(stdout=out.w, tty=True), on_start=procs.append)
        )
        while not procs:
            await asyncio.sleep(0.01)
        await procs[0].resize(50, 132)
        return await task

    assert run(body) == 0
    assert out.data().strip() == b"50 132"


@pytest.mark.parametrize("text", [b"a1\nb2\n", b"a1\nno newline"])
def test_the_end_of_input_reaches_a_terminal(tmp_path: Any, text: bytes) -> None:
    """`echo ... | fcvm exec -it -- cat`: stdin's end is typed as the terminal's EOF
    character (twice after a partial line), so cat ends; it waited forever."""
    out = Capture()
    (tmp_path / "in").write_bytes(text)
    fd = os.open(tmp_path / "in", os.O_RDONLY)

    async def body(host: Session) -> int:
        spec = vm_spec("sh", "-c", "cat; exit 6", tty=True)
        return await asyncio.wait_for(
            run_remote(host, spec, LocalStdio(stdin=fd, stdout=out.w, tty=True)), 20
        )

    try:
        assert run(body) == 6
    finally:
        os.close(fd)
    assert out.data().replace(b"\r\n", b"\n").endswith(text)  # (cat's copy, after the echo)


def test_guest_network_commands() -> None:
    from fcvm.agent.system import network_commands

    assert network_commands({}) == ["link set lo up"]
    assert all("-6" not in c for c in network_commands({"ip": "10.0.2.100/24", "ip6": "x"}))


def test_health_probe_never_raises() -> None:
    """An answer that is not HTTP raised BadStatusLine out of the probe, which ended the
    health watch: the container stayed 'starting' and exec was refused for good."""
    import socket
    import threading

    from fcvm.agent.container import probe_url

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def answer(reply: bytes) -> None:
        conn, _ = server.accept()
        conn.recv(4096)
        conn.sendall(reply)
        conn.close()

    for reply, expected in [
        (b"garbage\r\n\r\n", (False, "not an HTTP answer (BadStatusLine)")),
        (b"HTTP/1.0 204 No Content\r\n\r\n", (True, "HTTP 204")),
        (b"HTTP/1.0 500 Oops\r\n\r\n", (False, "HTTP 500")),
    ]:
        t = threading.Thread(target=answer, args=(reply,))
        t.start()
        assert probe_url(f"http://127.0.0.1:{port}/") == expected
        t.join()
    server.close()
    assert probe_url(f"http://127.0.0.1:{port}/") == (False, "Connection refused")
    assert probe_url("http://localhost:abc/")[0] is False
