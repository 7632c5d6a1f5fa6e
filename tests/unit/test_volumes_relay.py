"""Building the guest relay: clear errors without gcc, the rootfs key follows the
source, a static executable."""

from __future__ import annotations

from pathlib import Path

import pytest

from fcvm.assets import cprog
from fcvm.errors import FcvmError
from fcvm.volumes import relay

pytestmark = pytest.mark.unit


def test_rootfs_key_follows_the_relay_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = cprog.sources()
    program = relay._program()
    fake = tmp_path / "relay.c"
    fake.write_text(program.source.read_text() + "\n/* changed */\n")
    changed = tuple(
        cprog.Program(p.guest_path, fake, p.extra_flags) if p is program else p
        for p in cprog.PROGRAMS
    )
    monkeypatch.setattr(cprog, "PROGRAMS", changed)
    after = cprog.sources()
    assert len(after) == len(before) and after != before
    assert sum(a != b for a, b in zip(after, before, strict=True)) == 1


def test_missing_gcc_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cprog.shutil, "which", lambda name: None)
    with pytest.raises(FcvmError, match="gcc is needed") as ei:
        relay.build_relay(tmp_path / "r")
    assert ei.value.hint and "apt-get install" in ei.value.hint
    assert not (tmp_path / "r").exists()


def test_builds_static_executable(tmp_path: Path) -> None:
    if cprog.shutil.which("gcc") is None:
        pytest.skip("no gcc")
    out = tmp_path / "sub" / "fcvm-fuse-relay"
    relay.build_relay(out)
    head = out.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and out.stat().st_mode & 0o111
    assert [p.name for p in out.parent.iterdir()] == ["fcvm-fuse-relay"]
