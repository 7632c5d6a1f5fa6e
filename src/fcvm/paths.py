"""Every on-disk location fcvm uses, in one place.

Base directory: $FCVM_BASE_DIR, else /var/lib/fcvm for root, else
$XDG_DATA_HOME/fcvm (~/.local/share/fcvm).

    BASE/
      assets/          content-addressed guest assets (kernel, initrd, rootfs)
        cache/         downloaded .deb files and the mmdebstrap base tarball
      vms/             one directory per VM that is (or was, until reaped) running
        .lock          flock held while records are created/removed
        <id>/vm.json   the VM's state record (see state.py)
        <id>/...       sockets, console log, image archive; removed at teardown
      snapshots/<name>/  a snapshot: meta.json, memory, vmstate, disk (snapshot/layout.py)
      serve/           page-server sockets
      net/             network allocation (subnets, loopback addresses) and its lock

Unix socket paths are limited to 107 bytes, so VM ids are short.
"""

from __future__ import annotations

import os
from pathlib import Path


def base_dir() -> Path:
    env = os.environ.get("FCVM_BASE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/fcvm")
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "fcvm"


def assets_dir() -> Path:
    """$FCVM_ASSETS_DIR lets users share one set of guest assets (built by root)
    while keeping their own state in their own base directory."""
    env = os.environ.get("FCVM_ASSETS_DIR")
    return Path(env) if env else base_dir() / "assets"


def download_cache_dir() -> Path:
    return assets_dir() / "cache"


def vms_dir() -> Path:
    return base_dir() / "vms"


def vm_dir(vm_id: str) -> Path:
    return vms_dir() / vm_id


def exec_socket(vm_id: str) -> Path:
    """Where `fcvm exec` reaches the VM's owning fcvm process (see relay.py)."""
    return vm_dir(vm_id) / "exec.sock"


def snapshots_dir() -> Path:
    return base_dir() / "snapshots"


def snapshot_dir(name: str) -> Path:
    return snapshots_dir() / name


def serve_dir() -> Path:
    return base_dir() / "serve"


def net_dir() -> Path:
    return base_dir() / "net"


def config_file() -> Path:
    """Optional user settings (TOML): kernel, initrd, vmm, firecracker path."""
    env = os.environ.get("FCVM_CONFIG")
    if env:
        return Path(env)
    return base_dir() / "config.toml"
