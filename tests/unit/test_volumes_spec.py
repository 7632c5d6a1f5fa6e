"""--map HOST:GUEST[:ro] parsing: every bad item is one UsageError line naming it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fcvm.errors import UsageError
from fcvm.volumes.spec import VolumeMap, parse_maps

pytestmark = pytest.mark.unit


def test_forms(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (tmp_path / "link").symlink_to(a)
    maps = parse_maps([f"{a}:/x", f"{b}:/y/:ro,{tmp_path}/link://z/./w:rw"])
    assert maps == (
        VolumeMap(a, "/x", False),
        VolumeMap(b, "/y", True),
        VolumeMap(a, "/z/w", False),
    )
    assert parse_maps([]) == ()


def test_outer_guest_paths_come_first(tmp_path: Path) -> None:
    """Mounted in this order, a map inside another's guest path is on top of it however
    the user ordered them (podman sorts its mounts the same way); otherwise as given."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b, c):
        d.mkdir()
    maps = parse_maps([f"{a}:/data/in/deep,{b}:/data/in", f"{c}:/data", f"{a}:/z"])
    assert [m.guest for m in maps] == ["/data", "/z", "/data/in", "/data/in/deep"]


def test_relative_host_path_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d").mkdir()
    monkeypatch.chdir(tmp_path)
    (vm,) = parse_maps(["d:/data"])
    assert vm.host == tmp_path / "d" and vm.host.is_absolute()


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("{d}", "expected HOST:GUEST"),
        ("{d}:/x:ro:extra", "expected HOST:GUEST"),
        ("{d}:/x:rx", "must be 'ro' or 'rw'"),
        (":/x", "empty host path"),
        ("{d}:", "empty guest path"),
        ("{d}/missing:/x", "does not exist"),
        ("{d}/file:/x", "is not a directory"),
        ("{d}:x", "must be absolute"),
        ("{d}:/", "guest's root"),
        ("{d}://", "guest's root"),
        ("{d}:/a/../b", "must not contain '..'"),
        ("{d}/loop:/x", "does not exist"),
        ("{d}:/proc", "cannot map over /proc"),
        ("{d}:/proc/sys", "cannot map over /proc"),
        ("{d}://sys/", "cannot map over /sys"),
        ("{d}:/dev", "cannot map over /dev"),
        ("{d}:/dev/shm:ro", "cannot map over /dev"),
    ],
)
def test_bad_items(tmp_path: Path, spec: str, needle: str) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    item = spec.format(d=tmp_path)
    with pytest.raises(UsageError) as ei:
        parse_maps([item])
    msg = ei.value.line()
    assert needle in msg and "\n" not in msg
    assert repr(item) in msg
    assert ei.value.exit_code == 125


def test_empty_entries_and_duplicates(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="empty entry"):
        parse_maps([f"{tmp_path}:/x,"])
    with pytest.raises(UsageError, match="already mapped"):
        parse_maps([f"{tmp_path}:/x", f"{tmp_path}:/x/"])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make an unsearchable dir matter")
def test_unsearchable_is_reported_for_non_root(tmp_path: Path) -> None:
    # As root everything is searchable; the check exists for unprivileged users.
    (tmp_path / "d").mkdir(mode=0)
    assert parse_maps([f"{tmp_path}/d:/x"])[0].host == tmp_path / "d"
