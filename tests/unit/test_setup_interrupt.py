"""An interrupted `fcvm setup` stops mmdebstrap so that it cleans up after itself.

mmdebstrap mounts proc, sys and devpts in a chroot under /tmp and removes them when it
is interrupted - if it can still write: its output used to be a pipe to fcvm, and once
fcvm had gone (Ctrl-C) the first line of its cleanup killed it (SIGPIPE), leaving the
mounts behind. A stand-in mmdebstrap on PATH does what the real one does on a signal
(says so, takes a moment, removes its temporary directory; the real one was checked by
hand the same way); the build runs in a child process, which gets the signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

STAND_IN = """#!/bin/sh
mkdir -p "$FAKE_CHROOT"
echo "I: using $FAKE_CHROOT as tempdir"
trap 'echo "I: received a signal"; sleep 0.3; echo "I: removing tempdir $FAKE_CHROOT...";
      rmdir "$FAKE_CHROOT"; exit 25' INT TERM
echo "I: installing packages"
while :; do sleep 0.1; done
"""

BUILD = """
from fcvm.cli.setup import _exit_cleanly_on_termination
from fcvm.assets import rootfs
_exit_cleanly_on_termination()
rootfs.build_base(lambda stage, msg: print(stage, msg, flush=True))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="building the base needs root")
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, -signal.SIGINT), (signal.SIGTERM, 143)])
def test_interrupted_base_build_lets_mmdebstrap_clean_up(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mmdebstrap").write_text(STAND_IN)
    (bin_dir / "mmdebstrap").chmod(0o755)
    chroot = tmp_path / "mmdebstrap.chroot"
    assets = tmp_path / "assets"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_CHROOT": str(chroot),
           "FCVM_ASSETS_DIR": str(assets), "FCVM_BASE_DIR": str(tmp_path / "base")}  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", BUILD], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout is not None
        while "installing packages" not in (line := child.stdout.readline()):  # it runs
            assert line, child.communicate()[1]
        assert chroot.is_dir()
        child.send_signal(sig)  # to fcvm alone (kill, a supervisor); a Ctrl-C reaches both
        out, err = child.communicate(timeout=30)
        assert child.returncode == code, err
        assert "waiting for mmdebstrap to clean up" in out
        assert not chroot.exists()  # its cleanup ran to the end
        log = (assets / "cache" / "mmdebstrap.log").read_text()
        assert "I: removing tempdir" in log
        assert [p.name for p in (assets / "cache").iterdir()] == ["mmdebstrap.log"]  # no tar
        time.sleep(0.2)
        assert _stand_ins(bin_dir) == ""
    finally:
        child.kill()
        child.wait()
        subprocess.run(["pkill", "-f", str(bin_dir)], check=False)


def _stand_ins(bin_dir: Path) -> str:
    return subprocess.run(["pgrep", "-f", str(bin_dir)], capture_output=True, text=True).stdout
