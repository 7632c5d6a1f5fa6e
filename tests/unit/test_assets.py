"""Guest assets without building anything real: hashing and naming, the manifest and
its staleness, kernel/initrd override precedence, the initrd cpio (module order from
a fake modules.dep, /init), vmlinux extraction from a synthetic bzImage."""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from fcvm import assets
from fcvm.assets import cache, initrd, kernel, rootfs
from fcvm.errors import FcvmError, NotSetUp, UsageError

pytestmark = pytest.mark.unit

RELEASE = "6.1.0-99-cloud-amd64"


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    b = tmp_path / "base"
    monkeypatch.setenv("FCVM_BASE_DIR", str(b))
    monkeypatch.setenv("FCVM_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.delenv("FCVM_KERNEL", raising=False)
    monkeypatch.delenv("FCVM_INITRD", raising=False)
    return b


@pytest.fixture
def agent_src(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake fcvm package root with agent sources; cache.package_root points at it."""
    root = tmp_path / "src" / "fcvm"
    (root / "agent").mkdir(parents=True)
    (root / "session").mkdir()
    (root / "cli").mkdir()
    (root / "__init__.py").write_text("__version__ = 'x'\n")
    (root / "errors.py").write_text("class FcvmError(Exception): pass\n")
    (root / "agent" / "main.py").write_text("def main():\n    return 0\n")
    (root / "session" / "frame.py").write_text("X = 1\n")
    (root / "cli" / "main.py").write_text("host only\n")
    (root / "agent" / "__pycache__").mkdir()
    (root / "agent" / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"junk")
    monkeypatch.setattr(cache, "package_root", lambda: root)
    return root


# --- hashing and naming ---------------------------------------------------------


def test_short_hash_is_stable_and_order_and_boundary_sensitive() -> None:
    h = cache.short_hash("a", "bc")
    assert h == cache.short_hash("a", "bc")
    assert len(h) == cache.HASH_LEN
    assert h != cache.short_hash("bc", "a")
    assert h != cache.short_hash("ab", "c")  # lengths are part of the hash
    assert cache.short_hash(b"x") == cache.short_hash("x")


def test_agent_sources_are_agent_session_init_errors_only(agent_src: Path) -> None:
    rels = [rel for rel, _ in cache.agent_sources()]
    assert rels == ["__init__.py", "agent/main.py", "errors.py", "session/frame.py"]


def test_agent_hash_follows_content_and_new_files(agent_src: Path) -> None:
    h0 = cache.agent_hash()
    assert h0 == cache.agent_hash()
    (agent_src / "cli" / "main.py").write_text("changed, but host only\n")
    assert cache.agent_hash() == h0
    (agent_src / "agent" / "main.py").write_text("def main():\n    return 1\n")
    h1 = cache.agent_hash()
    assert h1 != h0
    (agent_src / "session" / "new.py").write_text("")
    assert cache.agent_hash() != h1


def test_agent_hash_tolerates_missing_dirs(tmp_path: Path) -> None:
    root = tmp_path / "fcvm"
    root.mkdir()
    assert cache.agent_sources(root) == []
    assert len(cache.agent_hash(root)) == cache.HASH_LEN


def test_keys_chain_through_stages() -> None:
    k1, k2 = "aaaaaaaaaaaa", "bbbbbbbbbbbb"
    assert initrd.initrd_key(k1, "bb") != initrd.initrd_key(k2, "bb")
    assert initrd.initrd_key(k1, "bb") != initrd.initrd_key(k1, "bb2")
    assert initrd.initrd_key(k1, "bb", ["virtio_blk"]) != initrd.initrd_key(k1, "bb")
    b = rootfs.base_key()
    assert b == rootfs.base_key()
    r = rootfs.rootfs_key(b, k1, "agent1")
    assert r != rootfs.rootfs_key(b, k1, "agent2")
    assert r != rootfs.rootfs_key(b, k2, "agent1")
    assert r != rootfs.rootfs_key("other", k1, "agent1")
    pkg = kernel.KernelPackage("linux-image-6.1.0-1-cloud-amd64", "6.1.1-1")
    assert pkg.release == "6.1.0-1-cloud-amd64"
    assert kernel.kernel_key(pkg) != kernel.kernel_key(kernel.KernelPackage(pkg.name, "6.1.1-2"))


def test_base_package_list_has_what_the_guest_needs() -> None:
    for pkg in ("podman", "crun", "conmon", "fuse-overlayfs", "python3", "iproute2", "kmod"):
        assert pkg in rootfs.BASE_PACKAGES
    assert list(rootfs.BASE_PACKAGES) == sorted(rootfs.BASE_PACKAGES)


# --- manifest and staleness -----------------------------------------------------------


def fake_setup(base: Path) -> cache.Manifest:
    """Write fake asset files plus a manifest whose keys match the current recipes."""
    adir = base / "assets"
    adir.mkdir(parents=True, exist_ok=True)
    kkey = kernel.kernel_key(kernel.KernelPackage(f"linux-image-{RELEASE}", "1"))
    m = cache.Manifest(
        kernel=cache.KernelRecord(
            key=kkey,
            package=f"linux-image-{RELEASE}",
            version="1",
            release=RELEASE,
            vmlinux=f"vmlinux-{kkey}",
            bzimage=f"vmlinuz-{kkey}",
        ),
    )
    ikey = initrd.initrd_key(kkey, "bbsha")
    m.initrd = cache.InitrdRecord(key=ikey, file=f"initrd-{ikey}.cpio", busybox_sha256="bbsha")
    bkey = rootfs.base_key()
    m.base = cache.BaseRecord(key=bkey, file=f"base-{bkey}.tar")
    ahash = cache.agent_hash()
    rkey = rootfs.rootfs_key(bkey, kkey, ahash)
    m.rootfs = cache.RootfsRecord(key=rkey, file=f"rootfs-{rkey}.ext4", agent_hash=ahash)
    for name in (f"vmlinux-{kkey}", f"vmlinuz-{kkey}", m.initrd.file, m.rootfs.file):
        (adir / name).write_bytes(b"x")
    cache.save_manifest(m)
    return m


def test_resolve_without_setup_raises_not_set_up(base: Path) -> None:
    with pytest.raises(NotSetUp) as exc:
        assets.resolve_assets()
    assert exc.value.hint == "run `fcvm setup`"
    assert exc.value.exit_code == 125


def test_manifest_roundtrip_and_resolve(base: Path, agent_src: Path) -> None:
    m = fake_setup(base)
    assert cache.load_manifest() == m
    a = assets.resolve_assets()
    adir = base / "assets"
    assert m.kernel is not None and m.initrd is not None and m.rootfs is not None
    assert a.vmlinux == adir / m.kernel.vmlinux
    assert a.bzimage == adir / m.kernel.bzimage
    assert a.initrd == adir / m.initrd.file
    assert a.rootfs == adir / m.rootfs.file
    assert a.kernel_version == RELEASE
    for p in (a.vmlinux, a.initrd, a.rootfs):
        assert m.kernel.key in p.name or p.name.endswith((".cpio", ".ext4"))


def test_changed_agent_source_makes_assets_stale(base: Path, agent_src: Path) -> None:
    fake_setup(base)
    assets.resolve_assets()
    (agent_src / "agent" / "main.py").write_text("def main():\n    return 2\n")
    with pytest.raises(NotSetUp):
        assets.resolve_assets()


def _age(paths: list[Path], seconds: float) -> None:
    for p in paths:
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def test_a_checked_source_tree_is_not_hashed_again_until_a_file_changes(
    base: Path, agent_src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_setup(base)
    files = [p for p in agent_src.rglob("*") if p.is_file()] + [cache.manifest_path()]
    _age(files, 60)
    assets.resolve_assets()
    assert (base / "assets-checked").is_file()
    calls: list[int] = []
    real = assets._keys_stale_reason
    monkeypatch.setattr(assets, "_keys_stale_reason", lambda m: calls.append(1) or real(m))
    assets.resolve_assets()
    assert calls == []  # nothing changed: the stamp matched
    main = agent_src / "agent" / "main.py"
    main.write_text("def main():\n    return 7\n")  # same size, a new mtime
    with pytest.raises(NotSetUp):
        assets.resolve_assets()
    assert calls == [1]


def test_a_stamp_of_just_changed_files_is_not_kept(base: Path, agent_src: Path) -> None:
    fake_setup(base)  # files written just now: their mtimes could hide a change
    assets.resolve_assets()
    assert not (base / "assets-checked").exists()


def test_missing_file_or_changed_recipe_makes_assets_stale(
    base: Path, agent_src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = fake_setup(base)
    assert m.rootfs is not None
    with monkeypatch.context() as mp:
        mp.setattr(initrd, "INITRD_RECIPE", "initrd-v999")
        with pytest.raises(NotSetUp):
            assets.resolve_assets()
    with monkeypatch.context() as mp:
        mp.setattr(rootfs, "BASE_PACKAGES", (*rootfs.BASE_PACKAGES, "vim"))
        with pytest.raises(NotSetUp):
            assets.resolve_assets()
    assets.resolve_assets()
    (base / "assets" / m.rootfs.file).unlink()
    with pytest.raises(NotSetUp):
        assets.resolve_assets()


def test_corrupt_or_foreign_manifest_reads_as_empty(base: Path) -> None:
    p = cache.manifest_path()
    p.parent.mkdir(parents=True)
    p.write_text("{not json")
    assert cache.load_manifest() == cache.Manifest()
    p.write_text('{"version": 999, "kernel": {"key": 1}}')
    assert cache.load_manifest() == cache.Manifest()
    p.write_text('{"version": 1, "kernel": {"unknown_field": 1}}')
    assert cache.load_manifest() == cache.Manifest()


def test_atomic_output_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "asset"
    with pytest.raises(RuntimeError), cache.atomic_output(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with cache.atomic_output(final) as tmp:
        tmp.write_bytes(b"whole")
    assert final.read_bytes() == b"whole"
    assert [p.name for p in tmp_path.iterdir()] == ["asset"]


def test_remove_stale_temps(tmp_path: Path) -> None:
    (tmp_path / ".tmp-rootfs-x.ext4.abc").write_bytes(b"")
    (tmp_path / ".tmp-rootfs-dir").mkdir()
    (tmp_path / ".tmp-rootfs-dir" / "f").write_bytes(b"")
    (tmp_path / "rootfs-x.ext4").write_bytes(b"")
    cache.remove_stale_temps([tmp_path, tmp_path / "missing"])
    assert [p.name for p in tmp_path.iterdir()] == ["rootfs-x.ext4"]


# --- user kernel/initrd precedence ------------------------------------------------------


def test_override_precedence_flag_env_config(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {}
    for name in ("flag-k", "env-k", "cfg-k", "flag-i", "env-i", "cfg-i"):
        files[name] = tmp_path / name
        files[name].write_bytes(b"")
    cfg = tmp_path / "config.toml"
    # a relative path (to the config file's directory) and an absolute one
    cfg.write_text(f'kernel = "cfg-k"\ninitrd = "{files["cfg-i"]}"\n')
    assert assets.user_overrides() == (files["cfg-k"], files["cfg-i"])
    monkeypatch.setenv("FCVM_KERNEL", str(files["env-k"]))
    assert assets.user_overrides() == (files["env-k"], files["cfg-i"])
    monkeypatch.setenv("FCVM_INITRD", str(files["env-i"]))
    assert assets.user_overrides() == (files["env-k"], files["env-i"])
    assert assets.user_overrides(kernel=files["flag-k"]) == (files["flag-k"], files["env-i"])
    assert assets.user_overrides(files["flag-k"], files["flag-i"]) == (
        files["flag-k"],
        files["flag-i"],
    )


def test_override_errors(base: Path, tmp_path: Path) -> None:
    assert assets.user_overrides() == (None, None)  # no config file at all
    with pytest.raises(UsageError, match="does not exist"):
        assets.user_overrides(kernel=tmp_path / "nope")
    cfg = tmp_path / "config.toml"
    cfg.write_text("kernel = [1]\n")
    with pytest.raises(UsageError, match="path string"):
        assets.user_overrides()
    cfg.write_text("kernel = \n")
    with pytest.raises(UsageError, match="cannot read config"):
        assets.user_overrides()


def test_resolve_applies_overrides(
    base: Path, agent_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = fake_setup(base)
    assert m.rootfs is not None
    k = tmp_path / "my-bzImage"
    k.write_bytes(fake_bzimage(b"\x7fELF" + b"\0" * 100, version_string=b"6.9.0-test (me@x) #1"))
    i = tmp_path / "my-initrd"
    i.write_bytes(b"")
    monkeypatch.setenv("FCVM_INITRD", str(i))
    a = assets.resolve_assets(kernel=k)
    assert a.vmlinux == a.bzimage == k
    assert a.initrd == i
    assert a.rootfs == base / "assets" / m.rootfs.file
    assert a.kernel_version == "6.9.0-test"


# --- kernel image -----------------------------------------------------------------------


def fake_bzimage(elf: bytes, version_string: bytes = b"6.1.0-x (b@h) #1") -> bytes:
    """A bzImage-shaped file: boot protocol 2.15 header, lz4 legacy payload + size."""
    if shutil.which("lz4") is None:
        pytest.skip("lz4 CLI missing")
    comp = subprocess.run(["lz4", "-l", "-9", "-c"], input=elf, capture_output=True).stdout
    assert comp.startswith(kernel.LZ4_LEGACY_MAGIC)
    payload = comp + struct.pack("<I", len(elf))
    setup_sects = 3
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    struct.pack_into("<H", setup, 0x20E, 0x300 - 0x200)  # kernel_version string pointer
    setup[0x300 : 0x300 + len(version_string) + 1] = version_string + b"\0"
    pm = b"\0" * 64  # the decompressor stub before the payload
    struct.pack_into("<II", setup, 0x248, len(pm), len(payload))
    return bytes(setup) + pm + payload + b"\0" * 32


def test_extract_vmlinux_from_synthetic_bzimage(tmp_path: Path) -> None:
    elf = b"\x7fELF\x02\x01\x01" + os.urandom(4096) + b"\0" * 20000
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(fake_bzimage(elf))
    out = tmp_path / "vmlinux"
    kernel.extract_vmlinux(bz, out)
    assert out.read_bytes() == elf
    assert not kernel.has_pvh_note(out)  # not a real ELF with notes
    assert assets.kernel_release_of(bz) == "6.1.0-x"


def test_extract_vmlinux_rejects_non_elf(tmp_path: Path) -> None:
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(fake_bzimage(b"not an elf" * 100))
    with pytest.raises(FcvmError, match="no ELF"):
        kernel.extract_vmlinux(bz, tmp_path / "vmlinux")
    bz.write_bytes(b"\0" * 4096)
    with pytest.raises(FcvmError, match="no lz4"):
        kernel.extract_vmlinux(bz, tmp_path / "vmlinux")


def test_resolve_package_parses_apt(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], what: str, **kw: object) -> str:
        calls.append(cmd)
        if cmd[:2] == ["apt-cache", "policy"]:
            return f"{cmd[2]}:\n  Installed: (none)\n  Candidate: 6.1.192-2\n"
        assert cmd[:2] == ["apt-cache", "show"]
        return (
            "Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\n"
            "Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\n"
        )

    monkeypatch.setattr(kernel, "run", fake_run)
    pkg = kernel.resolve_package(lambda s, m: None)
    assert pkg == kernel.KernelPackage("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2")
    assert pkg.release == "6.1.0-56-cloud-amd64"
    assert ["apt-get", "update"] not in calls


def test_resolve_package_runs_apt_update_when_lists_are_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    updated: list[bool] = []

    def fake_run(cmd: list[str], what: str, **kw: object) -> str:
        if cmd == ["apt-get", "update"]:
            updated.append(True)
            return ""
        if cmd[:2] == ["apt-cache", "policy"]:
            cand = "6.1.1-1" if updated else "(none)"
            return f"{cmd[2]}:\n  Candidate: {cand}\n"
        return "Depends: linux-image-6.1.0-1-cloud-amd64 (= 6.1.1-1)\n"

    monkeypatch.setattr(kernel, "run", fake_run)
    assert kernel.resolve_package(lambda s, m: None).version == "6.1.1-1"
    assert updated == [True]


def test_tool_failure_is_one_clear_line() -> None:
    with pytest.raises(FcvmError) as exc:
        kernel.run(["sh", "-c", "echo noise >&2; echo 'E: Unable to fetch' >&2; exit 100"], "dl")
    assert exc.value.line() == "dl: E: Unable to fetch"
    with pytest.raises(FcvmError, match="not installed"):
        kernel.run(["/nonexistent-tool-xyz"], "x")


# --- initrd -------------------------------------------------------------------------------


def fake_modules(tmp_path: Path) -> Path:
    """A modules tree: dependencies listed in modules.dep, one builtin, one .ko.xz."""
    moddir = tmp_path / "lib" / "modules" / RELEASE
    files = {
        "kernel/drivers/virtio/virtio_ring.ko": b"RING",
        "kernel/drivers/virtio/virtio.ko": b"VIRTIO",
        "kernel/drivers/virtio/virtio_mmio.ko": b"MMIO",
        "kernel/drivers/block/virtio_blk.ko": b"BLK",
        "kernel/net/core/failover.ko": b"FAILOVER",
        "kernel/drivers/net/net_failover.ko": b"NETFAILOVER",
        "kernel/drivers/net/virtio_net.ko": b"NET",
        "kernel/drivers/char/hw_random/virtio-rng.ko": b"RNG",
        "kernel/fs/overlayfs/overlay.ko.xz": lzma.compress(b"OVERLAY"),
        "kernel/drivers/virtio/virtio_pci.ko": b"PCI",
    }
    for rel, data in files.items():
        (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        (moddir / rel).write_bytes(data)
    (moddir / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko"
        " kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko"
        " kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko"
        " kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/net/core/failover.ko:\n"
        "kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"
        "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko"
        " kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko"
        " kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko"
        " kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/fs/overlayfs/overlay.ko.xz:\n"
    )
    (moddir / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\nkernel/fs/fuse/fuse.ko\n")
    return moddir


WANTED = ("virtio_net", "virtio_blk", "virtio_mmio", "virtio_pci", "virtio_rng", "overlay",
          "ext4", "fuse")  # fmt: skip


def test_load_order_respects_modules_dep(tmp_path: Path) -> None:
    idx = initrd.ModuleIndex.load(fake_modules(tmp_path))
    order = idx.load_order(WANTED)
    names = [initrd.module_name(p) for p in order]
    assert "ext4" not in names and "fuse" not in names  # builtin
    assert len(names) == len(set(names)) == 10
    for rel in order:
        for dep in idx.deps[rel]:
            assert order.index(dep) < order.index(rel), (dep, rel)
    assert names[:2] == ["virtio_ring", "virtio"]


def test_load_order_unknown_module_fails(tmp_path: Path) -> None:
    idx = initrd.ModuleIndex.load(fake_modules(tmp_path))
    with pytest.raises(FcvmError, match="neither a module nor built in"):
        idx.load_order(["vsock"])
    with pytest.raises(FcvmError, match="depmod"):
        initrd.ModuleIndex.load(tmp_path / "nowhere")


def test_module_names() -> None:
    assert initrd.module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"
    assert initrd.module_name("a/overlay.ko.zst") == "overlay"
    assert initrd.stored_name("a/overlay.ko.xz") == "a/overlay.ko"
    assert initrd.stored_name("a/b.ko") == "a/b.ko"


def test_initrd_cpio_contents(tmp_path: Path) -> None:
    moddir = fake_modules(tmp_path)
    bb = tmp_path / "busybox"
    bb.write_bytes(b"BUSYBOX")
    data, order = initrd.build_cpio(
        moddir, RELEASE, busybox=bb, modules=WANTED,
        applets=["bin/sh", "sbin/switch_root", "usr/bin/env", "linuxrc"],
    )  # fmt: skip
    assert len(data) % 4 == 0
    entries = {name: (mode, body) for name, mode, body in initrd.parse_cpio(data)}
    mode, body = entries["init"]
    assert stat.S_ISREG(mode) and mode & 0o111
    assert body == initrd.init_script()
    assert body.startswith(b"#!/bin/sh")
    assert entries["bin/busybox"][1] == b"BUSYBOX"
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"/bin/busybox"
    assert stat.S_ISLNK(entries["sbin/switch_root"][0])
    assert "linuxrc" not in entries
    assert stat.S_ISCHR(entries["dev/console"][0])
    for d in ("proc", "sys", "dev", "lower", "upper", "newroot", "usr", "usr/bin"):
        assert stat.S_ISDIR(entries[d][0]), d
    base = f"lib/modules/{RELEASE}"
    assert entries[f"{base}/kernel/fs/overlayfs/overlay.ko"][1] == b"OVERLAY"  # decompressed
    assert f"{base}/kernel/fs/overlayfs/overlay.ko.xz" not in entries
    lines = entries[f"{base}/{initrd.LOAD_ORDER_FILE}"][1].decode().splitlines()
    assert [ln.split()[1] for ln in lines] == order
    assert "virtio_rng kernel/drivers/char/hw_random/virtio-rng.ko" in lines
    assert "virtio_pci kernel/drivers/virtio/virtio_pci.ko pci" in lines
    # every directory appears before its children
    names = [n for n, _, _ in initrd.parse_cpio(data)]
    for i, n in enumerate(names):
        if "/" in n:
            assert n.rsplit("/", 1)[0] in names[:i], n


def test_init_script_contract() -> None:
    s = initrd.init_script().decode()
    for needle in (
        "fcvm.init=",
        "/usr/sbin/fcvm-agent",
        "switch_root /newroot",
        "poweroff -f",
        "lowerdir=/lower",
        "mount --move /dev",
        "-t ext4 -o ro",
    ):
        assert needle in s, needle


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox missing")
def test_init_script_parses(tmp_path: Path) -> None:
    script = Path(initrd.__file__).parent / "data" / "init.sh"
    proc = subprocess.run(["busybox", "sh", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- rootfs second stage (no root needed for these parts) ---------------------------------------


def test_install_agent_and_configure(tmp_path: Path, agent_src: Path) -> None:
    root = tmp_path / "root"
    copied = rootfs.install_agent(root)
    assert copied == ["__init__.py", "agent/main.py", "errors.py", "session/frame.py"]
    pkg = root / "opt/fcvm/fcvm"
    assert (pkg / "agent" / "main.py").read_text() == "def main():\n    return 0\n"
    assert (pkg / "agent" / "__init__.py").exists()  # made importable
    assert not (pkg / "cli").exists()
    wrapper = root / "usr/sbin/fcvm-agent"
    assert wrapper.read_text().startswith("#!/usr/bin/python3 -IS\n")
    assert wrapper.stat().st_mode & 0o111
    assert "fcvm.agent.main" in wrapper.read_text()
    compile(wrapper.read_text(), "fcvm-agent", "exec")
    rootfs.configure(root)
    conf = (root / "etc/containers/containers.conf").read_text()
    for needle in ('cgroup_manager = "cgroupfs"', 'events_logger = "file"', 'runtime = "crun"',
                   'log_driver = "k8s-file"'):  # fmt: skip
        assert needle in conf
    storage = (root / "etc/containers/storage.conf").read_text()
    assert 'driver = "overlay"' in storage
    assert 'graphroot = "/var/lib/containers/storage"' in storage
    assert (root / "etc/hostname").read_text() == "fcvm\n"


def test_agent_wrapper_runs_main(tmp_path: Path) -> None:
    """The wrapper's logic, run with this Python against a fake /opt/fcvm."""
    opt = tmp_path / "opt"
    (opt / "fcvm" / "agent").mkdir(parents=True)
    (opt / "fcvm" / "__init__.py").write_text("")
    (opt / "fcvm" / "agent" / "__init__.py").write_text("")
    (opt / "fcvm" / "agent" / "main.py").write_text("def main():\n    print('hi')\n    return 7\n")
    script = rootfs.AGENT_WRAPPER_TEXT.replace('"/opt/fcvm"', repr(str(opt)))
    proc = subprocess.run(["python3", "-I", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 7 and proc.stdout == "hi\n"
    (opt / "fcvm" / "agent" / "main.py").write_text("raise ImportError('boom')\n")
    proc = subprocess.run(["python3", "-I", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "fcvm-agent: cannot start: ImportError: boom"


def test_prune_superseded_keeps_live_and_newest(base: Path, agent_src: Path) -> None:
    m = fake_setup(base)
    assert m.rootfs is not None
    adir = base / "assets"
    old = []
    for n in range(4):
        p = adir / f"rootfs-old{n}.ext4"
        p.write_bytes(b"")
        os.utime(p, (1000 + n, 1000 + n))
        old.append(p)
    (adir / "notes.txt").write_text("not an asset")
    removed = assets.prune_superseded(keep=2)
    assert sorted(removed) == sorted(old[:2])
    assert old[2].exists() and old[3].exists()
    assert (adir / m.rootfs.file).exists() and (adir / "notes.txt").exists()
    assets.resolve_assets()


def test_setup_leaves_every_fcvm_module_byte_compiled() -> None:
    """`fcvm setup` compiles the host's fcvm modules (an editable install has none, and
    every command would compile what it imports from source)."""
    import importlib.util

    import fcvm
    from fcvm.cli.setup import compile_own_modules

    package = Path(fcvm.__file__).parent
    victim = Path(importlib.util.cache_from_source(str(package / "cli" / "setup.py")))
    victim.unlink(missing_ok=True)
    compile_own_modules()
    modules = [p for p in package.rglob("*.py") if "__pycache__" not in p.parts]
    missing = [p for p in modules if not Path(importlib.util.cache_from_source(str(p))).is_file()]
    assert modules and not missing
    assert victim.is_file()
