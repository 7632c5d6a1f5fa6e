"""Building the guest relay: clear errors without gcc, a digest that follows the source."""

from __future__ import annotations

from pathlib import Path

import pytest

from fcvm.errors import FcvmError
from fcvm.volumes import relay

pytestmark = pytest.mark.unit


def test_digest_follows_source(monkeypatch: pytest.MonkeyPatch) -> None:
    d = relay.relay_digest()
    assert len(d) == 64 and d == relay.relay_digest()
    monkeypatch.setattr(relay, "relay_source", lambda: b"int main(void){return 0;}\n")
    assert relay.relay_digest() != d


def test_missing_gcc_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay.shutil, "which", lambda name: None)
    with pytest.raises(FcvmError, match="gcc is not installed") as ei:
        relay.build_relay(tmp_path / "r")
    assert ei.value.hint and "apt-get install" in ei.value.hint
    assert not (tmp_path / "r").exists()


def test_builds_static_executable(tmp_path: Path) -> None:
    if relay.shutil.which("gcc") is None:
        pytest.skip("no gcc")
    out = tmp_path / "sub" / "fcvm-fuse-relay"
    relay.build_relay(out)
    head = out.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and out.stat().st_mode & 0o111
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
