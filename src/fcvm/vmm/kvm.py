"""Is /dev/kvm usable for a stock guest kernel? `kvm_status()`: overrides, presence, cache.

`kvm_status()` answers quickly and never hangs:

1. ``FCVM_KVM=off|on`` overrides everything (for tests and for hosts where the
   probe is wrong).
2. Presence and permissions of /dev/kvm give clear reasons without any ioctl.
3. A verdict cached for this boot (keyed on /proc/sys/kernel/random/boot_id and on
   the identity of the /dev/kvm node, so reloading the KVM module re-probes) is
   returned as is.
4. Otherwise the ioctl probe of kvm_probe.py runs (in a forked child, with a
   timeout); a definitive verdict is cached.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fcvm import log, paths
from fcvm.fsutil import atomic_write
from fcvm.vmm.kvm_probe import (
    KVM_DEVICE,
    PROBE_TIMEOUT,
    PROBE_VERSION,
    KvmStatus,
    pvm_backed,
    run_probe,
)

__all__ = [
    "BOOT_ID_FILE",
    "CACHE_NAME",
    "KVM_DEVICE",
    "PROBE_TIMEOUT",
    "KvmStatus",
    "cache_path",
    "kvm_status",
    "pvm_backed",
    "run_probe",
]

_log = log.get("vmm.kvm")

BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
CACHE_NAME = "kvm-probe.json"


def kvm_status(*, use_cache: bool = True, timeout: float = PROBE_TIMEOUT) -> KvmStatus:
    """Can /dev/kvm run a stock guest kernel? Never hangs, never raises."""
    override = os.environ.get("FCVM_KVM", "").strip().lower()
    if override in ("off", "0", "no", "false"):
        return KvmStatus(False, "KVM disabled by FCVM_KVM=off")
    if override in ("on", "1", "yes", "true"):
        return KvmStatus(True, "KVM forced on by FCVM_KVM=on (probe skipped)")
    if override not in ("", "auto"):
        _log.warning("ignoring FCVM_KVM=%s (expected off, on or auto)", override)

    pre = _presence()
    if pre is not None:
        return pre

    key = _cache_key()
    if use_cache and key is not None:
        cached = _read_cache(key)
        if cached is not None:
            return cached

    status, definitive = run_probe(timeout)
    if definitive and key is not None:
        _write_cache(key, status)
    return status


def cache_path() -> Path:
    return paths.base_dir() / CACHE_NAME


# --- presence, cache --------------------------------------------------------------


def _presence() -> KvmStatus | None:
    if not os.path.exists(KVM_DEVICE):
        return KvmStatus(
            False,
            f"{KVM_DEVICE} does not exist (KVM module not loaded, or no hardware/nested "
            "virtualisation on this host)",
        )
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return KvmStatus(
            False,
            f"no read/write permission on {KVM_DEVICE} (run as root or join the kvm group)",
        )
    return None


def _cache_key() -> str | None:
    try:
        boot_id = Path(BOOT_ID_FILE).read_text().strip()
        st = os.stat(KVM_DEVICE)
    except OSError:
        return None
    return f"{boot_id}:{st.st_rdev}:{st.st_ino}:{st.st_ctime_ns}:v{PROBE_VERSION}"


def _read_cache(key: str) -> KvmStatus | None:
    try:
        data = json.loads(cache_path().read_text())
        if data.get("key") != key:
            return None
        return KvmStatus(bool(data["usable"]), str(data["reason"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_cache(key: str, status: KvmStatus) -> None:
    path = cache_path()
    try:
        atomic_write(path, json.dumps({"key": key, "usable": status.usable,
                                       "reason": status.reason}))  # fmt: skip
    except OSError as exc:
        _log.debug("cannot cache KVM verdict in %s: %s", path, exc)
