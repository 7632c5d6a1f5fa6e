"""Networking of real VMs: published ports in both modes, two VMs on one guest port,
the host's loopback from inside the container, proxies. Traffic goes only to
loopback and to namespaces fcvm made."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tests.conftest import fcvm
from tests.vm.runs import start_run as _start
from tests.vm.runs import stop, wait_healthy

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300), pytest.mark.usefixtures("no_leftovers")]




def _httpd(port: int, text: str) -> tuple[str, ...]:
    """busybox httpd serving `text` on the guest port."""
    return ("sh", "-c", f"mkdir -p /tmp/w && echo {text} > /tmp/w/i.html && "
            f"exec httpd -f -p {port} -h /tmp/w")  # fmt: skip


def _get(url: str) -> str:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=10) as r:
        return r.read().decode().strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_rootless_publish_and_two_vms_on_one_guest_port(test_image: str) -> None:
    port = _free_port()
    # (healthy = httpd answers inside the guest: a started container need not listen yet)
    ready = ("--health-check", "http://127.0.0.1:80/i.html")
    a = _start("t-net-a", test_image, "--publish", f"{port}:80", *ready, cmd=_httpd(80, "vm-a"))
    b = _start("t-net-b", test_image, "-p", f"{port}:80", *ready, cmd=_httpd(80, "vm-b"))
    try:
        rec_a, rec_b = wait_healthy("t-net-a", a), wait_healthy("t-net-b", b)
        net_a, net_b = rec_a["network"], rec_b["network"]
        assert isinstance(net_a, dict) and isinstance(net_b, dict)
        assert net_a["host_ip"] != net_b["host_ip"]  # one loopback address per VM
        assert net_a["guest_ip"] == "10.0.2.100"
        assert net_a["forwards"][0]["host_port"] == port
        assert _get(f"http://{net_a['host_ip']}:{port}/i.html") == "vm-a"
        assert _get(f"http://{net_b['host_ip']}:{port}/i.html") == "vm-b"
    finally:
        stop(a, b)


def test_bridged_publish(test_image: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("bridged networking needs root")
    port = _free_port()
    p = _start("t-net-br", test_image, "--network", "bridged", "-p", f"{port}:8000",
               "--health-check", "http://127.0.0.1:8000/i.html",
               cmd=_httpd(8000, "bridged"))  # fmt: skip
    try:
        rec = wait_healthy("t-net-br", p)
        assert _get(f"http://127.0.0.1:{port}/i.html") == "bridged"
        net = rec["network"]
        assert isinstance(net, dict) and net["mode"] == "bridged"
    finally:
        stop(p)
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    assert f"fcvm:{rec['vm_id']}" not in rules


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"host-loopback"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def host_server() -> Iterator[int]:
    server = HTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def test_container_reaches_host_loopback_and_gets_proxies(
    test_image: str, host_server: int
) -> None:
    env = {"http_proxy": "http://127.0.0.1:3128", "no_proxy": "example.internal"}
    proc = fcvm("podman", "run", "--name", "t-net-out", test_image, "--", "sh", "-c",
                f"http_proxy= wget -qO- http://10.0.2.2:{host_server}/ ; echo; "
                "echo proxy=$http_proxy; echo no=$no_proxy", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "host-loopback"
    assert "proxy=http://10.0.2.2:3128" in lines  # the host's loopback, as the guest sees it
    assert "no=example.internal" in lines


def test_published_port_in_use_is_refused_before_boot(test_image: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = fcvm("podman", "run", "--name", "t-net-busy", "--network", "bridged",
                    "-p", f"127.0.0.1:{port}:80", test_image, "--", "true")  # fmt: skip
    assert proc.returncode == 125
    assert str(port) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_malformed_publish() -> None:
    proc = fcvm("podman", "run", "--name", "t-net-bad", "-p", "80:http", "img")
    assert proc.returncode == 125 and "publish" in proc.stderr.lower()


@pytest.fixture
def tun_open_to_all() -> Iterator[None]:
    """Unprivileged TAP creation needs /dev/net/tun at 0666 (udev's usual mode; it is
    0600 on our CI machines). Loosened for this test only, then restored."""
    mode = os.stat("/dev/net/tun").st_mode & 0o777
    os.chmod("/dev/net/tun", 0o666)
    yield
    os.chmod("/dev/net/tun", mode)


def test_rootless_run_as_unprivileged_user(
    image_archives: dict[str, object], host_server: int, tun_open_to_all: None
) -> None:
    """The whole run as uid 65534: user+net namespace, slirp4netns, QEMU/TCG, the
    host's loopback from the container. Assets are root's, shared via FCVM_ASSETS_DIR."""
    import shutil

    from fcvm import paths

    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs root to become an unprivileged user, setpriv and /usr/bin/python3")
    import tempfile

    home = tempfile.mkdtemp(prefix="fcvm-nobody-")  # pytest's tmp_path is root-only
    os.chmod(home, 0o755)
    os.chown(home, 65534, 65534)
    archive = f"{home}/image.oci.tar"
    shutil.copy(str(image_archives["oci-archive"]), archive)
    os.chmod(archive, 0o644)
    src = os.path.dirname(os.path.dirname(os.path.abspath(__import__("fcvm").__file__)))
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": home, "PYTHONPATH": src,
        "FCVM_BASE_DIR": f"{home}/base", "FCVM_ASSETS_DIR": str(paths.assets_dir()),
    }  # fmt: skip
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "/usr/bin/python3", "-m", "fcvm", "podman", "run", "--name", "t-nobody",
         f"oci-archive:{archive}", "--", "sh", "-c",
         f"wget -qO- http://10.0.2.2:{host_server}/; echo; id -u"],
        env=env, capture_output=True, text=True, timeout=240, cwd=home,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["host-loopback", "0"]  # root in the container only
    assert os.listdir(f"{home}/base/vms") == [".lock"]  # nothing left of the VM
    shutil.rmtree(home)
