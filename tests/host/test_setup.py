"""Real `fcvm setup` on this host: builds into a private FCVM_BASE_DIR.

To keep the run short the download cache (the kernel .deb and the mmdebstrap base
tarball with the current key) is seeded by hard link from the default base directory
when a previous `fcvm setup` left them there; otherwise the first setup here runs
apt and mmdebstrap for real (a minute or more).

The boot test at the end starts the built kernel/initrd/rootfs under QEMU/TCG with a
check script as init (fcvm.init=) and runs podman in the guest on the test image.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, fcvm

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(os.geteuid() != 0, reason="fcvm setup builds the rootfs as root"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("mmdebstrap", "apt-get", "lz4", "mkfs.ext4")),
        reason="mmdebstrap/apt-get/lz4/mkfs.ext4 missing",
    ),
]

DEFAULT_CACHE = Path("/var/lib/fcvm/assets/cache")
GUARDED_TOOLS = ("apt-get", "apt-cache", "mmdebstrap", "dpkg-deb", "depmod", "lz4",
                 "mkfs.ext4", "tar", "chroot")  # fmt: skip


def seed_cache(base: Path) -> None:
    from fcvm.assets.rootfs import base_key

    dl = base / "assets" / "cache"
    dl.mkdir(parents=True, exist_ok=True)
    if not DEFAULT_CACHE.is_dir():
        return
    wanted = [DEFAULT_CACHE / f"base-{base_key()}.tar", *DEFAULT_CACHE.glob("linux-image-*.deb")]
    for src in wanted:
        if src.is_file():
            try:
                os.link(src, dl / src.name)
            except OSError:
                shutil.copyfile(src, dl / src.name)


def env_for(base: Path) -> dict[str, str]:
    return {
        "FCVM_BASE_DIR": str(base),
        "FCVM_CONFIG": str(base / "no-config.toml"),
        "FCVM_KERNEL": "",
        "FCVM_INITRD": "",
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A base dir after one real `fcvm setup`."""
    base = tmp_path_factory.mktemp("fcvm-base")
    seed_cache(base)
    proc = fcvm("setup", env=env_for(base), timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "rootfs" in proc.stdout
    yield base
    shutil.rmtree(base, ignore_errors=True)


def snapshot(base: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every asset and cache file (not the kernel tree's contents)."""
    out = {}
    for d in (base / "assets", base / "assets" / "cache"):
        for p in d.iterdir():
            if p.is_file() and not p.name.startswith(".setup.lock"):
                st = p.stat()
                out[str(p.relative_to(base))] = (st.st_ino, st.st_mtime_ns)
    return out


def guard_path(tmp: Path) -> tuple[dict[str, str], Path]:
    """A PATH whose apt/mmdebstrap/... log their call and fail."""
    shim = tmp / "shim"
    shim.mkdir(exist_ok=True)
    log = tmp / "calls.log"
    for tool in GUARDED_TOOLS:
        s = shim / tool
        s.write_text(
            f'#!/bin/sh\necho "{tool} $*" >>{log}\necho "E: {tool} blocked" >&2\nexit 100\n'
        )
        s.chmod(0o755)
    return {"PATH": f"{shim}:{os.environ['PATH']}"}, log


def test_setup_builds_all_assets(built: Path) -> None:
    adir = built / "assets"
    names = sorted(p.name for p in adir.iterdir())
    assert [n for n in names if n.startswith("vmlinux-")]
    assert [n for n in names if n.startswith("vmlinuz-")]
    assert [n for n in names if n.startswith("initrd-") and n.endswith(".cpio")]
    assert [n for n in names if n.startswith("rootfs-") and n.endswith(".ext4")]
    assert not [n for n in names if n.startswith(".tmp-")]
    vmlinux = next(adir.glob("vmlinux-*"))
    assert vmlinux.read_bytes()[:4] == b"\x7fELF"
    from fcvm.assets.kernel import has_pvh_note

    assert has_pvh_note(vmlinux)


def test_second_setup_is_a_noop(built: Path, tmp_path: Path) -> None:
    before = snapshot(built)
    env, log = guard_path(tmp_path)
    t0 = time.monotonic()
    proc = fcvm("setup", env={**env_for(built), **env}, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert not log.exists(), log.read_text()  # no apt, mmdebstrap, mkfs, ...
    assert snapshot(built) == before
    assert "up to date" in proc.stderr
    print(f"no-op fcvm setup took {elapsed:.2f}s")


def test_resolve_assets_matches_setup(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in env_for(built).items():
        monkeypatch.setenv(k, v)
    from fcvm.assets import resolve_assets

    a = resolve_assets()
    assert a.rootfs.parent == built / "assets"
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-cloud-amd64", a.kernel_version)


def debugfs_cat(image: Path, path: str) -> str:
    proc = subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, text=True
    )
    return proc.stdout


def test_changed_agent_rebuilds_only_the_rootfs(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in env_for(built).items():
        monkeypatch.setenv(k, v)
    from fcvm import assets
    from fcvm.assets import cache

    src = tmp_path / "fcvm"
    shutil.copytree(cache.package_root(), src, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "agent").mkdir(exist_ok=True)
    probe = f"PROBE = {time.time_ns()}\n"
    (src / "agent" / "zz_probe.py").write_text(probe)
    monkeypatch.setattr(cache, "package_root", lambda: src)

    before = snapshot(built)
    old_rootfs = assets.cache.load_manifest().rootfs
    assert old_rootfs is not None
    with pytest.raises(assets.NotSetUp):
        assets.resolve_assets()
    stages: list[str] = []
    a = assets.setup(progress=lambda stage, msg: stages.append(stage))
    after = snapshot(built)

    assert "kernel" not in stages and "initrd" not in stages and "base" not in stages
    assert "rootfs" in stages
    assert a.rootfs.name != old_rootfs.file
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {f"assets/{a.rootfs.name}", "assets/manifest.json"}, changed
    assert debugfs_cat(a.rootfs, "/opt/fcvm/fcvm/agent/zz_probe.py") == probe
    assert assets.resolve_assets() == a


def test_rootfs_contents(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fcvm.assets import cache

    for k, v in env_for(built).items():
        monkeypatch.setenv(k, v)
    m = cache.load_manifest()
    assert m.rootfs is not None and m.kernel is not None
    img = built / "assets" / m.rootfs.file
    assert debugfs_cat(img, "/usr/sbin/fcvm-agent").startswith("#!/usr/bin/python3 -I")
    assert 'cgroup_manager = "cgroupfs"' in debugfs_cat(img, "/etc/containers/containers.conf")
    storage_conf = debugfs_cat(img, "/etc/containers/storage.conf")
    assert "graphroot" in storage_conf
    # podman refuses to start when a listed additional image store is missing.
    from fcvm.agent.protocol import IMAGE_STORE_DIR

    assert f'additionalimagestores = ["{IMAGE_STORE_DIR}"]' in storage_conf
    listing = subprocess.run(["debugfs", "-R", f"stat {IMAGE_STORE_DIR}", str(img)],
                             capture_output=True, text=True).stdout  # fmt: skip
    assert "Type: directory" in listing, listing
    assert "overlay.ko" in debugfs_cat(img, f"/lib/modules/{m.kernel.release}/modules.dep")
    stat = subprocess.run(
        ["debugfs", "-R", "stat /usr/bin/podman", str(img)], capture_output=True, text=True
    ).stdout
    assert re.search(r"User:\s+0\s+Group:\s+0", stat), stat


def test_setup_failure_is_one_line(tmp_path: Path) -> None:
    """No network / apt failure: exit 125 and one clear line, nothing half-written."""
    base = tmp_path / "base"
    env, _ = guard_path(tmp_path)
    proc = fcvm("setup", env={**env_for(base), **env}, timeout=60)
    assert proc.returncode == 125
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("fcvm:")]
    assert len(lines) == 1, proc.stderr
    assert "apt" in lines[0] and "blocked" in lines[0]
    assert not (base / "assets" / "manifest.json").exists()


# --- boot the built assets -----------------------------------------------------------------

CHECK_SCRIPT = r"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
up() { cut -d' ' -f1 /proc/uptime; }
echo "CHECK pid=$$ uptime=$(up)"
echo "CHECK root: $(grep ' / ' /proc/mounts)"
echo "CHECK modules: $(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
echo "CHECK agent: $(test -x /usr/sbin/fcvm-agent && echo ok)"
echo "CHECK podman: $(podman --version)"
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /var/lib/containers/storage
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
podman load -q -i /dev/vdb >/dev/null 2>&1; echo "CHECK load rc=$?"
podman run --rm --network none localhost/fcvm-busybox:latest cat /www/index.html
echo "CHECK run rc=$? uptime=$(up)"
python3 -c 'import ctypes,os; os.sync(); ctypes.CDLL(None).reboot(0x4321FEDC)'
"""


def host_tsc_khz() -> int:
    m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.M)
    return int(float(m.group(1)) * 1000) if m else 0


def qemu_cmd(
    vmlinux: Path, initrd: Path, rootfs: Path | None, image: Path | None, init: str, extra: str = ""
) -> list[str]:
    tsc = host_tsc_khz()
    append = (
        "console=ttyS0 quiet 8250.nr_uarts=1 no_timer_check pci=off panic=-1 "
        + (f"tsc_early_khz={tsc} " if tsc else "")
        + f"fcvm.init={init} fcvm.debug=1 {extra}"
    )
    drives: list[str] = []
    for name, path in (("root", rootfs), ("img", image)):
        if path is not None:
            drives += ["-drive", f"id={name},file={path},format=raw,if=none,readonly=on",
                       "-device", f"virtio-blk-device,drive={name}"]  # fmt: skip
    return [
        "qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-m", "1024", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
        "-kernel", str(vmlinux), "-initrd", str(initrd), "-append", append,
        *drives, "-device", "virtio-rng-device", "-device", "virtio-serial-device",
    ]  # fmt: skip


@pytest.mark.vm
@pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or shutil.which("podman") is None,
    reason="qemu-system-x86_64/podman missing",
)
def test_assets_boot_and_run_podman(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in env_for(built).items():
        monkeypatch.setenv(k, v)
    from fcvm.assets import cache

    m = cache.load_manifest()
    assert m.kernel is not None and m.initrd is not None and m.rootfs is not None
    adir = built / "assets"
    image = tmp_path / "busybox.oci.tar"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make-test-image"), "--oci-archive", str(image)],
        check=True, capture_output=True,
    )  # fmt: skip
    rootfs = tmp_path / "rootfs.ext4"
    subprocess.run(["cp", "--sparse=always", str(adir / m.rootfs.file), str(rootfs)], check=True)
    script = tmp_path / "check.sh"
    script.write_text(CHECK_SCRIPT)
    for req in (f"write {script} check.sh", "set_inode_field /check.sh mode 0100755"):
        subprocess.run(["debugfs", "-w", "-R", req, str(rootfs)], check=True, capture_output=True)

    cmd = qemu_cmd(adir / m.kernel.vmlinux, adir / m.initrd.file, rootfs, image, "/check.sh")
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL
    )
    wall = time.monotonic() - t0
    out = proc.stdout
    print(out)
    print(f"wall {wall:.1f}s")
    assert "CHECK pid=1 " in out
    assert re.search(r"CHECK root: overlay / overlay .*lowerdir=/lower", out)
    mods = re.search(r"CHECK modules: (.*)", out)
    assert mods
    for mod in ("virtio_blk", "virtio_mmio", "virtio_rng", "vsock", "vmw_vsock_virtio_transport",
                "fuse", "overlay", "virtio_console", "virtio_net"):  # fmt: skip
        assert mod in mods.group(1).split(), mod
    assert "CHECK agent: ok" in out
    assert re.search(r"CHECK podman: podman version \d", out)
    assert "CHECK load rc=0" in out
    assert "hello from fcvm-busybox" in out
    assert "CHECK run rc=0" in out


@pytest.mark.vm
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu missing")
def test_boot_failures_power_off_with_one_line(built: Path, tmp_path: Path) -> None:
    from fcvm.assets import cache

    m = cache.Manifest.from_json(json.loads((built / "assets" / "manifest.json").read_text()))
    assert m.kernel is not None and m.initrd is not None and m.rootfs is not None
    adir = built / "assets"
    cmd = qemu_cmd(
        adir / m.kernel.vmlinux, adir / m.initrd.file, adir / m.rootfs.file,
        adir / m.rootfs.file, "/no/such/init",
    )  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert "fcvm-init: init /no/such/init not found in the root filesystem" in proc.stdout
    assert "Kernel panic" not in proc.stdout
    # no root disk at all: one line after fcvm.rootwait seconds, then power-off
    cmd = qemu_cmd(
        adir / m.kernel.vmlinux, adir / m.initrd.file, None, None, "/x", "fcvm.rootwait=1"
    )
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert "fcvm-init: root device /dev/vda did not appear within 1s" in proc.stdout
    assert "Kernel panic" not in proc.stdout
