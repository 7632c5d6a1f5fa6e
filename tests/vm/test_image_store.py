"""The prebuilt image store (images.py): the guest runs host-storage images and both
archive kinds from it with no `podman load`, layered images come out the same as
through `podman load`, and an unusable or unbuildable store falls back to the archive."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm import images
from tests.conftest import fcvm
from tests.unit.test_images_store import docker_archive_first_layer, make_layered_archive

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300), pytest.mark.usefixtures("no_leftovers")]


def _run(
    name: str, image: str, tmp_path: Path, *cmd: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, float]]:
    timings = tmp_path / f"{name}.json"
    # (cold: the image's path into the guest is what these test, which a restore from
    # the image cache would skip)
    proc = fcvm("podman", "run", "--name", name, "--no-snapshot", image, "--", *cmd,
                env={"FCVM_TIMINGS": str(timings), "FCVM_LOG": "info", **(env or {})})  # fmt: skip
    marks = json.loads(timings.read_text()) if timings.exists() else {}
    return proc, marks


@pytest.fixture
def private_archives(image_archives: dict[str, Path], tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Copies of the test archives (their own store keys); their stores go afterwards."""
    copies = {}
    for kind, path in image_archives.items():
        copies[kind] = tmp_path / path.name
        shutil.copyfile(path, copies[kind])
    keys = [images.archive_store_key(p) for p in copies.values()]
    yield copies
    for key in keys:
        for p in (*images.store_paths(key), images.images_dir() / f".{key}.lock"):
            if p.is_dir():
                shutil.rmtree(p)
            p.unlink(missing_ok=True)


@pytest.mark.parametrize("kind", ["host", "oci-archive", "docker-archive"])
def test_runs_from_the_store_without_load(
    kind: str, test_image: str, private_archives: dict[str, Path], tmp_path: Path
) -> None:
    image = test_image if kind == "host" else f"{kind}:{private_archives[kind]}"
    proc, marks = _run(f"t-store-{kind}", image, tmp_path, "cat", "/www/index.html")
    assert proc.returncode == 0, proc.stderr
    assert "hello from fcvm-busybox" in proc.stdout
    assert "image-store" in marks and "image-loaded" in marks, marks
    assert "image-load" not in marks and "image-store-unusable" not in marks, marks
    key = (
        images.host_store_key((images.host_image(test_image) or ("", None))[0])
        if kind == "host"
        else images.archive_store_key(private_archives[kind])
    )
    assert images.cached_store(key) is not None


def test_layered_image_same_as_through_podman_load(
    image_archives: dict[str, Path], tmp_path: Path
) -> None:
    archive = make_layered_archive(
        tmp_path / "layers.docker.tar", docker_archive_first_layer(image_archives["docker-archive"])
    )
    script = (
        "ls /data; ls /data/opq; stat -c '%u:%g %h' /data/a /data/sub/f; cat /data/a-link; "
        "[ /data/a -ef /data/a-link ] && echo linked; ls /etc/passwd"
    )
    try:
        store, marks = _run("t-store-layers", f"docker-archive:{archive}", tmp_path,
                            "sh", "-c", script)  # fmt: skip
        assert store.returncode == 0, store.stderr
        assert "image-store" in marks and "image-load" not in marks, marks
        loaded, marks = _run("t-store-layers-load", f"docker-archive:{archive}", tmp_path,
                             "sh", "-c", script, env={"FCVM_IMAGE_STORE": "off"})  # fmt: skip
        assert loaded.returncode == 0, loaded.stderr
        assert "image-load" in marks and "image-store" not in marks, marks
        assert "FCVM_IMAGE_STORE is off" in loaded.stderr
    finally:
        key = images.archive_store_key(archive)
        for p in (*images.store_paths(key), images.images_dir() / f".{key}.lock"):
            p.unlink(missing_ok=True)
    assert store.stdout == loaded.stdout
    assert store.stdout.splitlines() == [
        "a", "a-link", "b", "opq", "sub", "new", "1234:5678 2", "42:43 1", "one", "linked",
        "/etc/passwd",
    ]  # fmt: skip


def test_corrupt_store_falls_back_to_the_archive(
    private_archives: dict[str, Path], tmp_path: Path
) -> None:
    archive = private_archives["oci-archive"]
    key = images.archive_store_key(archive)
    store = images.image_store(key, archive, "test")
    assert store is not None
    st = store.path.stat()
    with store.path.open("r+b") as f:  # wipe the superblock, keep size and mtime
        f.seek(1024)
        f.write(b"\0" * 1024)
    os.utime(store.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert images.cached_store(key) == store  # the host cannot tell: the guest must
    proc, marks = _run("t-store-corrupt", f"oci-archive:{archive}", tmp_path,
                       "cat", "/www/index.html")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "hello from fcvm-busybox" in proc.stdout
    assert "image-store-unusable" in marks and "image-load" in marks, marks
    assert re.search(r"image-store-unusable: mount /dev/vd[b-z]", proc.stderr), proc.stderr


def test_unbuildable_store_falls_back_to_the_archive(
    private_archives: dict[str, Path], tmp_path: Path
) -> None:
    archive = private_archives["docker-archive"]
    ext4, _ = images.store_paths(images.archive_store_key(archive))
    (ext4 / "blocker").mkdir(parents=True)  # a directory where the store must go
    proc, marks = _run("t-store-unbuildable", f"docker-archive:{archive}", tmp_path,
                       "cat", "/www/index.html")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "hello from fcvm-busybox" in proc.stdout
    assert "image-load" in marks and "image-store" not in marks, marks
    assert f"no image store for docker-archive:{archive}" in proc.stderr
    leftovers = [p.name for p in ext4.parent.iterdir() if p.name.startswith(".build-")]
    assert leftovers == []
