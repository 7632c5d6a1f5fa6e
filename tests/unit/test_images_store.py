"""Image stores (images.py): keys, the cache and its validation, fallbacks when a
store cannot be built, the guest spec and drives; and (as root, with podman and
e2fsprogs) a real build of a layered archive whose whiteouts, opaque directories,
ownership, hard links and xattrs must survive in the ext4."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from fcvm import images
from fcvm.plan import ImageSpec
from tests.conftest import dead_pid

pytestmark = pytest.mark.unit


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    b = tmp_path / "base"
    monkeypatch.setenv("FCVM_BASE_DIR", str(b))
    monkeypatch.delenv("FCVM_IMAGE_STORE", raising=False)
    return b


def _fake_store(key: str, image_id: str = "ab" * 32, archive: str = "/x.tar") -> Path:
    """What build_store leaves behind, without podman or mkfs."""
    ext4, meta = images.store_paths(key)
    ext4.parent.mkdir(parents=True, exist_ok=True)
    ext4.write_bytes(b"\0" * 4096)
    st = ext4.stat()
    meta.write_text(json.dumps({
        "version": images.STORE_VERSION, "key": key, "source": archive, "archive": archive,
        "image_id": image_id, "names": ["localhost/x:latest"],
        "size": st.st_size, "mtime_ns": st.st_mtime_ns,
    }))  # fmt: skip
    return ext4


# --- keys -------------------------------------------------------------------------


def test_archive_key_follows_the_files_identity(tmp_path: Path) -> None:
    a = tmp_path / "a.tar"
    a.write_bytes(b"x" * 100)
    k1 = images.archive_store_key(a)
    assert k1 == images.archive_store_key(a)
    assert k1.startswith("a-") and len(k1) == 34
    link = tmp_path / "link.tar"
    link.symlink_to(a)
    assert images.archive_store_key(link) == k1  # real path
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    k2 = images.archive_store_key(a)
    assert k2 != k1  # touched
    a.write_bytes(b"x" * 101)
    assert images.archive_store_key(a) not in (k1, k2)  # rewritten
    b = tmp_path / "b.tar"
    b.write_bytes(a.read_bytes())
    os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    assert images.archive_store_key(b) != images.archive_store_key(a)  # other path
    key_a = images.archive_store_key(a)
    os.replace(b, a)  # same path, size and mtime, another inode
    assert images.archive_store_key(a) != key_a


def test_host_key_is_the_image_id() -> None:
    key = images.host_store_key("0123456789abcdef" * 4)
    assert key == f"i-{images.STORE_VERSION}-" + "0123456789abcdef" * 2
    assert images.host_store_key("ff" * 32) != key


# --- cache --------------------------------------------------------------------------


def test_cached_store_round_trip_and_validation(base: Path) -> None:
    assert images.cached_store("a-1") is None
    ext4 = _fake_store("a-1", image_id="cd" * 32)
    store = images.cached_store("a-1")
    assert store == images.ImageStore(ext4, "cd" * 32, ("localhost/x:latest",))
    # Changed behind our back (size or mtime): not used.
    with ext4.open("ab") as f:
        f.write(b"\0")
    assert images.cached_store("a-1") is None
    _fake_store("a-1")
    st = ext4.stat()
    os.utime(ext4, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert images.cached_store("a-1") is None
    # Another layout version, bad JSON, missing ext4: not used.
    _fake_store("a-1")
    _, meta = images.store_paths("a-1")
    m = json.loads(meta.read_text())
    meta.write_text(json.dumps({**m, "version": images.STORE_VERSION + 1}))
    assert images.cached_store("a-1") is None
    meta.write_text("{")
    assert images.cached_store("a-1") is None
    _fake_store("a-1")
    ext4.unlink()
    assert images.cached_store("a-1") is None


def test_image_store_builds_once_then_uses_the_cache(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def fake_build(key: str, archive: Path, source: str) -> images.ImageStore:
        calls.append(key)
        _fake_store(key, archive=str(archive))
        store = images.cached_store(key)
        assert store is not None
        return store

    monkeypatch.setattr(images, "build_store", fake_build)
    monkeypatch.setattr(images, "store_disabled_reason", lambda: None)
    archive = tmp_path / "img.tar"
    archive.write_bytes(b"x")
    s1 = images.image_store("a-7", archive, "test")
    s2 = images.image_store("a-7", archive, "test")
    assert s1 is not None and s1 == s2
    assert calls == ["a-7"]
    monkeypatch.setenv("FCVM_IMAGE_STORE", "off")  # switched off: even a cached one is unused
    assert images.image_store("a-7", archive, "test") is None


def test_unbuildable_store_falls_back_with_the_reason(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def failing_build(key: str, archive: Path, source: str) -> images.ImageStore:
        raise images.StoreBuildError("mkfs.ext4 failed: no space")

    monkeypatch.setattr(images, "build_store", failing_build)
    monkeypatch.setattr(images, "store_disabled_reason", lambda: None)
    with caplog.at_level(logging.INFO, logger="fcvm.images"):
        assert images.image_store("a-8", tmp_path / "img.tar", "oci-archive:img.tar") is None
    assert "no image store for oci-archive:img.tar: mkfs.ext4 failed: no space" in caplog.text
    monkeypatch.setattr(images, "store_disabled_reason", lambda: "building one needs root")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fcvm.images"):
        assert images.image_store("a-9", tmp_path / "img.tar", "x") is None
    assert "needs root" in caplog.text


def test_disabled_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in (images.store_disabled_reason() or "")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "mkfs.ext4" else tool)
    assert images.store_disabled_reason() == "mkfs.ext4 is not installed"


def test_superseded_and_orphaned_stores_are_pruned(base: Path, tmp_path: Path) -> None:
    archive = tmp_path / "img.tar"
    archive.write_bytes(b"x")
    _fake_store("a-old", archive=str(archive))
    _fake_store("a-gone", archive=str(tmp_path / "deleted.tar"))
    _fake_store("a-other", archive=str(tmp_path / "other.tar"))
    (tmp_path / "other.tar").write_bytes(b"y")
    _fake_store("a-new", archive=str(archive))
    (images.images_dir() / ".a-old.lock").touch()
    images._prune_superseded("a-new", str(archive))
    left = sorted(p.name for p in images.images_dir().iterdir())
    assert left == [
        "a-new.store.ext4", "a-new.store.json", "a-other.store.ext4", "a-other.store.json",
    ]  # fmt: skip


def test_resolve_attaches_store_and_archive(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "img.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("index.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    seen: list[tuple[str, Path, str]] = []

    def fake_store(key: str, path: Path, source: str) -> images.ImageStore:
        seen.append((key, path, source))
        return images.ImageStore(tmp_path / "s.ext4", "ab" * 32)

    monkeypatch.setattr(images, "image_store", fake_store)
    got = images.resolve(ImageSpec("oci-archive", str(archive)))
    assert got.archive == archive and got.store is not None
    assert seen == [(images.archive_store_key(archive), archive, f"oci-archive:{archive}")]


def test_image_source_names_the_drives_it_attached(tmp_path: Path) -> None:
    """The guest is told where the image is by drive name -> device, from the one place
    that assigns devices (MachineSpec.device), whatever other drives come first."""
    from fcvm.agent.spec import ImageSource
    from fcvm.container import ARCHIVE_DRIVE, IMAGES_DRIVE, image_source
    from fcvm.machine import DriveSpec, MachineSpec
    from fcvm.vmm.select import Choice

    def spec(*drives: str) -> MachineSpec:
        return MachineSpec(name="t", backend=Choice("qemu", "tcg", "test"), kernel=tmp_path,
                           initrd=tmp_path, rootfs=tmp_path,
                           drives=tuple(DriveSpec(d, tmp_path / d) for d in drives))  # fmt: skip

    store = images.ImageStore(tmp_path / "s.ext4", "ab" * 32)
    with_store = images.GuestImage(archive=tmp_path / "a.tar", ref="", store=store)
    assert image_source(spec(IMAGES_DRIVE, ARCHIVE_DRIVE), with_store) == ImageSource(
        ref="ab" * 32, store="/dev/vdb", device="/dev/vdc"
    )
    assert image_source(spec("storage", IMAGES_DRIVE, ARCHIVE_DRIVE), with_store) == ImageSource(
        ref="ab" * 32, store="/dev/vdc", device="/dev/vdd"
    )
    without = images.GuestImage(archive=tmp_path / "a.tar", ref="")
    assert image_source(spec(ARCHIVE_DRIVE), without) == ImageSource(device="/dev/vdb")
    pull = images.GuestImage(archive=None, ref="quay.io/x/y", pull="quay.io/x/y")
    assert image_source(spec(), pull) == ImageSource(pull="quay.io/x/y")


# --- a real build -------------------------------------------------------------------


def _tar_bytes(entries: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info, data = e if isinstance(e, tuple) else (e, b"")
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    uid: int = 0,
    gid: int = 0,
    mode: int = 0o644,
    link: str = "",
    pax: dict[str, str] | None = None,
) -> tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.uid, info.gid, info.mode, info.linkname = kind, uid, gid, mode, link
    info.mtime = 1_700_000_000
    info.pax_headers = pax or {}
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    if data:
        info.size = len(data)
        return info, data
    return info


LAYERED_REF = "localhost/fcvm-layers:test"


def make_layered_archive(out: Path, base_layer: bytes | None = None) -> Path:
    """A docker-archive with (optionally a base layer, then) two layers exercising
    ownership, a hard link, an xattr, a whiteout and an opaque directory."""
    d = tarfile.DIRTYPE
    layer1 = _tar_bytes([
        _entry("data/", d),
        _entry("data/a", data=b"one\n", uid=1234, gid=5678, pax={"SCHILY.xattr.user.fcvm": "yes"}),
        _entry("data/a-link", tarfile.LNKTYPE, link="data/a", uid=1234, gid=5678),
        _entry("data/gone", data=b"two\n"),
        _entry("data/sub/", d, uid=42, gid=43),
        _entry("data/sub/f", data=b"x\n", uid=42, gid=43),
        _entry("data/opq/", d),
        _entry("data/opq/old", data=b"old\n"),
    ])  # fmt: skip
    layer2 = _tar_bytes([
        _entry("data/", d),
        _entry("data/.wh.gone"),
        _entry("data/b", data=b"three\n"),
        _entry("data/opq/", d),
        _entry("data/opq/.wh..wh..opq"),
        _entry("data/opq/new", data=b"new\n"),
    ])  # fmt: skip
    layers = ([base_layer] if base_layer else []) + [layer1, layer2]
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin:/sbin:/usr/bin:/usr/sbin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }).encode()  # fmt: skip
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    names = [f"{i}/layer.tar" for i in range(len(layers))]
    manifest = json.dumps([{"Config": config_name, "RepoTags": [LAYERED_REF], "Layers": names}])
    files = [(config_name, config), ("manifest.json", manifest.encode())]
    files += list(zip(names, layers, strict=True))
    with tarfile.open(out, "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def docker_archive_first_layer(archive: Path) -> bytes:
    with tarfile.open(archive) as tar:
        f = tar.extractfile("manifest.json")
        assert f is not None
        first = json.load(f)[0]["Layers"][0]
        layer = tar.extractfile(first)
        assert layer is not None
        return layer.read()


def _debugfs(image: Path, request: str) -> str:
    proc = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True)
    return proc.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
def test_gc_removes_what_killed_exports_and_builds_left(base: Path) -> None:
    """kill -9 during podman save/load or mkfs: the export's temp file, the build
    directory with podman's overlay still mounted under it, the runroot in /tmp. Only
    the dead runs' (their pid in the name); a live one's are its own."""
    d = images.images_dir()
    d.mkdir(parents=True)
    dead, live = dead_pid(), os.getpid()
    made: list[Path] = []
    try:
        for pid in (dead, live):
            build = d / f".build-i-1-abc-{pid}"
            made.append(build)
            (build / "root" / "overlay").mkdir(parents=True)
            subprocess.run(["mount", "-t", "tmpfs", "t", str(build / "root" / "overlay")],
                           check=True)  # fmt: skip
            made += [d / f"abc.oci.tmp{pid}", d / f".build-i-1-abc.store.ext4.{pid}",
                     Path(f"/tmp/fcvm-st-{pid}-test")]  # fmt: skip
            for path in made[-3:-1]:
                path.write_bytes(b"half")
            made[-1].mkdir(exist_ok=True)
        gc = subprocess.run([sys.executable, "-m", "fcvm", "gc"], capture_output=True,
                            text=True, env={**os.environ, "FCVM_BASE_DIR": str(base)})  # fmt: skip
        assert gc.returncode == 0, gc.stderr
        assert sorted(line.split()[1] for line in gc.stdout.splitlines()) == sorted(
            str(p) for p in made if str(dead) in p.name
        )
        assert all(p.exists() == (str(live) in p.name) for p in made)
        mounts = Path("/proc/mounts").read_text()
        assert f".build-i-1-abc-{dead}/" not in mounts and f".build-i-1-abc-{live}/" in mounts
    finally:
        for p in made:
            if p.is_dir():
                images._remove_tree(p)
            else:
                p.unlink(missing_ok=True)


real_build = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("podman", "mkfs.ext4", "debugfs")),
    reason="needs root, podman and e2fsprogs",
)


@real_build
def test_real_build_keeps_whiteouts_ownership_links_xattrs(
    base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive = make_layered_archive(tmp_path / "layers.docker.tar")
    key = images.archive_store_key(archive)
    with caplog.at_level(logging.INFO, logger="fcvm.images"):
        store = images.image_store(key, archive, "docker-archive:test")
    assert store is not None, caplog.text
    assert store.names == (LAYERED_REF,)
    assert images.cached_store(key) == store
    leftovers = [p.name for p in images.images_dir().iterdir() if p.name.startswith(".build-")]
    assert leftovers == []
    assert "/fcvm-st-" not in Path("/proc/self/mountinfo").read_text()
    assert subprocess.run(["e2fsck", "-fn", str(store.path)], capture_output=True).returncode == 0

    layers = json.loads(_debugfs(store.path, "cat /overlay-layers/layers.json"))
    by_parent = {layer.get("parent"): layer["id"] for layer in layers}
    first = by_parent[None]
    second = by_parent[first]
    d1, d2 = f"/overlay/{first}/diff/data", f"/overlay/{second}/diff/data"
    a = _debugfs(store.path, f"stat {d1}/a")
    assert "User:  1234" in a and "Group:  5678" in a and "Links: 2" in a
    assert "user.fcvm" in _debugfs(store.path, f"ea_list {d1}/a")
    assert "User:    42" in _debugfs(store.path, f"stat {d1}/sub")
    gone = _debugfs(store.path, f"stat {d2}/gone")
    assert "character special" in gone and "Device major/minor number: 00:00" in gone
    assert "trusted.overlay.opaque" in _debugfs(store.path, f"ea_list {d2}/opq")
    assert "new" in _debugfs(store.path, f"ls {d2}/opq")
    # Shortcut links the overlay driver resolves in additional stores.
    assert _debugfs(store.path, "ls /overlay/l").split()


# --- the agent's side ----------------------------------------------------------------


def _prepare(
    image: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mount_result: str | None
) -> tuple[str | Exception, list[Any], list[list[str]]]:
    import asyncio

    from fcvm.agent import image as agent

    monkeypatch.setattr(agent, "mount_store", lambda dev, ref: mount_result)
    commands: list[list[str]] = []

    async def fake_quiet(argv: list[str], reaper: Any) -> tuple[int, str]:
        commands.append(argv)
        return 0, "Loaded image: localhost/from-archive:latest"

    monkeypatch.setattr(agent, "run_quiet", fake_quiet)
    phases: list[Any] = []

    async def phase(name: str, detail: str) -> None:
        phases.append((name, detail) if detail else name)

    async def go() -> str:
        from fcvm.agent.spec import ImageSource

        source = ImageSource.from_json(image)
        return await agent.prepare_image(source, None, phase, {})  # type: ignore[arg-type]

    try:
        result: str | Exception = asyncio.run(go())
    except agent.ProcError as exc:
        result = exc
    return result, phases, commands


def test_agent_runs_from_the_store_without_podman(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    image = {"store": "/dev/vdb", "ref": "ab" * 32, "device": "/dev/vdc"}
    result, phases, commands = _prepare(image, monkeypatch, tmp_path, None)
    assert result == "ab" * 32
    assert phases == ["image-store", "image-loaded"]
    assert commands == []


def test_agent_falls_back_to_the_archive(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    image = {"store": "/dev/vdb", "ref": "ab" * 32, "device": "/dev/vdc"}
    why = "mount /dev/vdb: Invalid argument"
    result, phases, commands = _prepare(image, monkeypatch, tmp_path, why)
    assert result == "localhost/from-archive:latest"
    assert phases == ["image-store", ("image-store-unusable", why), "image-load", "image-loaded"]
    assert commands == [["podman", "load", "-q", "-i", "/dev/vdc"]]
    # Without an archive to fall back on, the run fails with the reason.
    result, _, _ = _prepare({"store": "/dev/vdb", "ref": "x"}, monkeypatch, tmp_path, why)
    assert isinstance(result, Exception) and why in str(result)
