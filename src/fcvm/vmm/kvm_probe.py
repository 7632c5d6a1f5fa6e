"""The KVM probe: can this /dev/kvm run a stock guest kernel? (ioctls in a forked child)

`run_probe()` forks a child that talks to /dev/kvm and answers with one JSON line;
the parent waits at most `timeout` seconds, so a wedged ioctl cannot hang fcvm. The
child does KVM_GET_API_VERSION, KVM_CHECK_EXTENSION for what Firecracker needs,
KVM_CREATE_VM, a 2 MiB memory slot, KVM_CREATE_VCPU, the mmapped kvm_run structure,
KVM_SET_SREGS/KVM_SET_REGS, KVM_RUN. Overrides, presence checks and the per-boot
cache of the verdict are kvm.py's (`kvm_status()`).

The probe runs guest code twice on one vCPU. First a few bytes of real-mode code
(``out; hlt``) prove that KVM_RUN works at all. Then the vCPU is put straight into
64-bit long mode at a kernel-style high address (as a VMM does for a Linux
kernel) and runs ``lock cmpxchg16b`` followed by ``out; hlt``.

Why that instruction: on a PVM-backed /dev/kvm (kvm_pvm, a "pagetable-based
virtual machine" hypervisor that runs only PVM-enabled guest kernels), code that
is not a PVM guest is executed by KVM's instruction emulator. Simple code (the
real-mode and long-mode ``out; hlt`` above) passes, so a ``hlt``-only probe says
"usable" there. A stock Debian kernel booted under QEMU with ``-accel kvm`` on
such a host dies early in boot with KVM's "emulation failure" on exactly
``lock cmpxchg16b`` (used by the SLUB allocator). On hardware-virtualised KVM
(kvm_intel / kvm_amd) the instruction runs natively.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import os
import select
import signal
import struct
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from fcvm import log
from fcvm.children import die_with_parent

_log = log.get("vmm.kvm")

KVM_DEVICE = "/dev/kvm"
# Bump when the probe changes so that cached verdicts of an older probe are ignored.
PROBE_VERSION = 3
PROBE_TIMEOUT = 0.5  # seconds; the probe itself takes a few milliseconds

# --- ioctl numbers (linux/kvm.h) ------------------------------------------------
_KVMIO = 0xAE


def _io(nr: int) -> int:
    return (_KVMIO << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (_KVMIO << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (_KVMIO << 8) | nr


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, 32)
KVM_RUN = _io(0x80)
KVM_SET_REGS = _iow(0x82, 144)
KVM_GET_SREGS = _ior(0x83, 312)
KVM_SET_SREGS = _iow(0x84, 312)

KVM_API_VERSION = 12

# Capabilities a Firecracker-style VMM relies on (number -> name).
REQUIRED_CAPS: dict[int, str] = {
    0: "KVM_CAP_IRQCHIP",
    3: "KVM_CAP_USER_MEMORY",
    4: "KVM_CAP_SET_TSS_ADDR",
    7: "KVM_CAP_EXT_CPUID",
    14: "KVM_CAP_MP_STATE",
    32: "KVM_CAP_IRQFD",
    33: "KVM_CAP_PIT2",
    36: "KVM_CAP_IOEVENTFD",
    41: "KVM_CAP_VCPU_EVENTS",
    55: "KVM_CAP_XSAVE",
    56: "KVM_CAP_XCRS",
    72: "KVM_CAP_TSC_DEADLINE_TIMER",
    77: "KVM_CAP_SIGNAL_MSI",
    136: "KVM_CAP_IMMEDIATE_EXIT",
}

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_INTERNAL_ERROR = 17
KVM_INTERNAL_ERROR_EMULATION = 1
EXIT_NAMES: dict[int, str] = {
    0: "KVM_EXIT_UNKNOWN",
    1: "KVM_EXIT_EXCEPTION",
    2: "KVM_EXIT_IO",
    3: "KVM_EXIT_HYPERCALL",
    4: "KVM_EXIT_DEBUG",
    5: "KVM_EXIT_HLT",
    6: "KVM_EXIT_MMIO",
    8: "KVM_EXIT_SHUTDOWN",
    9: "KVM_EXIT_FAIL_ENTRY",
    10: "KVM_EXIT_INTR",
    17: "KVM_EXIT_INTERNAL_ERROR",
    24: "KVM_EXIT_SYSTEM_EVENT",
    37: "KVM_EXIT_NOTIFY",
}

# --- the probe guest ------------------------------------------------------------
MEM_SIZE = 0x200000  # one 2 MiB slot at guest physical 0
CODE_ADDR = 0x1000
PML4_ADDR = 0x2000
PDPT_LOW_ADDR = 0x3000
PD_ADDR = 0x4000
PDPT_HIGH_ADDR = 0x5000
DATA_ADDR = 0x6000  # 16-byte aligned operand of cmpxchg16b
HIGH_BASE = 0xFFFFFFFF80000000  # where Linux maps its kernel text
PROBE_PORT = 0x10

# Real mode: mov al,1; out 0x10,al; hlt
REAL_MODE_CODE = bytes([0xB0, 0x01, 0xE6, PROBE_PORT, 0xF4])
# Long mode: mov al,2; out 0x10,al; mov rdi,DATA_ADDR (sign-extended imm32);
# xor eax,eax; xor edx,edx; xor ebx,ebx; xor ecx,ecx; lock cmpxchg16b [rdi];
# mov al,3; out 0x10,al; hlt
LONG_MODE_CODE = (
    bytes([0xB0, 0x02, 0xE6, PROBE_PORT])
    + bytes([0x48, 0xC7, 0xC7])
    + struct.pack("<I", DATA_ADDR)
    + bytes([0x31, 0xC0, 0x31, 0xD2, 0x31, 0xDB, 0x31, 0xC9])
    + bytes([0xF0, 0x48, 0x0F, 0xC7, 0x0F])
    + bytes([0xB0, 0x03, 0xE6, PROBE_PORT, 0xF4])
)
LONG_CODE_ADDR = 0x1100

# kvm_sregs offsets
_SEG_SIZE = 24
_CR0, _CR3, _CR4, _EFER = 224, 240, 248, 264


@dataclass(frozen=True)
class KvmStatus:
    usable: bool
    reason: str


class _ProbeFailure(Exception):
    """The probe reached a verdict of "not usable" (message = one-line reason)."""


def pvm_backed() -> bool:
    """Is the loaded KVM the PVM hypervisor rather than VMX/SVM hardware support?"""
    sysmod = Path("/sys/module")
    return (sysmod / "kvm_pvm").exists() and not (
        (sysmod / "kvm_intel").exists() or (sysmod / "kvm_amd").exists()
    )


def run_probe(timeout: float = PROBE_TIMEOUT) -> tuple[KvmStatus, bool]:
    """Run the ioctl probe in a forked child. Returns (status, definitive).

    Not definitive (so not cached) when the child timed out or died oddly: that
    may be a passing condition of a loaded machine."""
    start = time.monotonic()
    rfd, wfd = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a threaded process; the child only
        # runs ioctls on already imported modules and leaves with os._exit().
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.close(rfd)
            _set_pdeathsig()
            try:
                result = {"usable": True, "reason": _probe_in_child()}
            except _ProbeFailure as exc:
                result = {"usable": False, "reason": str(exc)}
            except OSError as exc:
                result = {"usable": False, "reason": f"KVM probe failed: {exc}"}
            except Exception as exc:
                result = {"usable": False, "reason": f"KVM probe crashed: {exc!r}"}
            # One line, then close: the parent must not wait for this process to
            # exit, as tearing the VM down can take a while (up to ~0.5 s seen on PVM).
            os.write(wfd, json.dumps(result).encode() + b"\n")
            os.close(wfd)
        except BaseException:
            code = 1
        finally:
            os._exit(code)

    os.close(wfd)
    try:
        data = _read_with_deadline(rfd, start + timeout)
    finally:
        os.close(rfd)
    elapsed = time.monotonic() - start
    if data is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _reap(pid, 0.05)
        return (
            KvmStatus(False, f"KVM probe did not finish within {timeout:g} s (a KVM ioctl hung)"),
            False,
        )
    _reap(pid, 0.05)
    try:
        result = json.loads(data.decode())
        status = KvmStatus(bool(result["usable"]), str(result["reason"]))
    except (ValueError, KeyError, TypeError):
        return KvmStatus(False, "KVM probe process died without a verdict"), False
    _log.debug("kvm probe: %s (%.1f ms)", status, elapsed * 1000)
    return status, True


# --- parent side: reading the verdict, reaping the child ----------------------------


def _read_with_deadline(fd: int, deadline: float) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return None
        chunk = os.read(fd, 65536)
        chunks.append(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return b"".join(chunks)


def _reap(pid: int, wait: float) -> None:
    """Reap the probe child; if it is still tearing its VM down (or stuck in the
    kernel after SIGKILL), leave the wait to a daemon thread instead of fcvm."""
    deadline = time.monotonic() + wait
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if time.monotonic() >= deadline:
            threading.Thread(target=_wait_quietly, args=(pid,), daemon=True).start()
            return
        time.sleep(0.002)


def _wait_quietly(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


# --- child side: the probe itself ---------------------------------------------------


def _set_pdeathsig() -> None:
    with contextlib.suppress(Exception):
        die_with_parent(signal.SIGKILL)


def _ioctl(fd: int, req: int, arg: int | bytes | bytearray, what: str) -> int:
    try:
        res = fcntl.ioctl(fd, req, arg)
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        raise _ProbeFailure(f"{what} failed on {KVM_DEVICE}: {name} ({exc.strerror})") from None
    # A bytes argument comes back as bytes (the buffer after the call); ints as ints.
    return res if isinstance(res, int) else 0


def _set_segment(sregs: bytearray, index: int, *, selector: int, code: bool, long: bool) -> None:
    # struct kvm_segment: base u64, limit u32, selector u16, type, present, dpl, db,
    # s, l, g, avl, unusable, padding (u8 each)
    seg_type = 0xB if code else 0x3
    db = 0 if (code and long) else 1
    struct.pack_into(
        "<QIHBBBBBBBBBB",
        sregs,
        index * _SEG_SIZE,
        0,
        0xFFFFFFFF,
        selector,
        seg_type,
        1,
        0,
        db,
        1,
        1 if (code and long) else 0,
        1,
        0,
        0,
        0,
    )


def _exit_name(reason: int) -> str:
    return EXIT_NAMES.get(reason, f"exit reason {reason}")


def _run_until(run: mmap.mmap, vcpu: int, stage: str, expect_ports: list[int]) -> None:
    """KVM_RUN until HLT, checking that the OUTs to PROBE_PORT carried expect_ports."""
    seen: list[int] = []
    for _ in range(8):
        _ioctl(vcpu, KVM_RUN, 0, "KVM_RUN")
        (reason,) = struct.unpack_from("<I", run, 8)
        if reason == KVM_EXIT_IO:
            direction, size, port, _count, offset = struct.unpack_from("<BBHIQ", run, 32)
            if direction == 1 and port == PROBE_PORT and size == 1:
                seen.append(run[offset])
                continue
            raise _ProbeFailure(f"{stage} guest code did unexpected I/O on port {port:#x}")
        if reason == KVM_EXIT_HLT:
            if seen != expect_ports:
                raise _ProbeFailure(f"{stage} guest code skipped instructions ({seen})")
            return
        if reason == KVM_EXIT_INTERNAL_ERROR:
            (suberror,) = struct.unpack_from("<I", run, 32)
            what = f"KVM internal error {suberror}"
            if suberror == KVM_INTERNAL_ERROR_EMULATION:
                what = "KVM emulation failure"
            where = " on lock cmpxchg16b" if stage == "long-mode" and seen == [2] else ""
            if pvm_backed():
                raise _ProbeFailure(
                    f"{KVM_DEVICE} is PVM-backed (kvm_pvm) and cannot run a stock guest "
                    f"kernel (probe: {what}{where})"
                )
            raise _ProbeFailure(
                f"{KVM_DEVICE} cannot run a stock guest kernel (probe: {what}{where} "
                f"in {stage} guest code)"
            )
        if reason == 9:  # FAIL_ENTRY
            (hw_reason,) = struct.unpack_from("<Q", run, 32)
            raise _ProbeFailure(
                f"{KVM_DEVICE} cannot enter a {stage} guest "
                f"(KVM_EXIT_FAIL_ENTRY, hardware reason {hw_reason:#x})"
            )
        raise _ProbeFailure(
            f"{KVM_DEVICE} cannot run a {stage} probe guest: unexpected {_exit_name(reason)}"
        )
    raise _ProbeFailure(f"{stage} probe guest did not halt")


def _probe_in_child() -> str:
    kvm = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    version = _ioctl(kvm, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
    if version != KVM_API_VERSION:
        raise _ProbeFailure(f"{KVM_DEVICE} speaks KVM API {version}, expected {KVM_API_VERSION}")
    missing = [
        name
        for cap, name in REQUIRED_CAPS.items()
        if _ioctl(kvm, KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION") <= 0
    ]
    if missing:
        raise _ProbeFailure(f"{KVM_DEVICE} lacks {', '.join(missing)}")
    vm = _ioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM")

    mem = mmap.mmap(-1, MEM_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    mem[CODE_ADDR : CODE_ADDR + len(REAL_MODE_CODE)] = REAL_MODE_CODE
    mem[LONG_CODE_ADDR : LONG_CODE_ADDR + len(LONG_MODE_CODE)] = LONG_MODE_CODE
    # Identity map of the first 2 MiB plus the same 2 MiB at HIGH_BASE (PML4[511],
    # PDPT[510]), both through one 2 MiB page.
    struct.pack_into("<Q", mem, PML4_ADDR, PDPT_LOW_ADDR | 3)
    struct.pack_into("<Q", mem, PML4_ADDR + 511 * 8, PDPT_HIGH_ADDR | 3)
    struct.pack_into("<Q", mem, PDPT_LOW_ADDR, PD_ADDR | 3)
    struct.pack_into("<Q", mem, PDPT_HIGH_ADDR + 510 * 8, PD_ADDR | 3)
    struct.pack_into("<Q", mem, PD_ADDR, 0x83)  # present, writable, 2 MiB page
    region = struct.pack("<IIQQQ", 0, 0, 0, MEM_SIZE, addr)
    _ioctl(vm, KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    vcpu = _ioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU")
    run_size = _ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
    run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    # Stage 1: real mode, CS base 0.
    sregs = bytearray(312)
    _ioctl(vcpu, KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
    struct.pack_into("<Q", sregs, 0, 0)  # cs.base
    struct.pack_into("<H", sregs, 12, 0)  # cs.selector
    _ioctl(vcpu, KVM_SET_SREGS, bytes(sregs), "KVM_SET_SREGS")
    regs = bytearray(144)
    struct.pack_into("<QQ", regs, 128, CODE_ADDR, 0x2)  # rip, rflags
    _ioctl(vcpu, KVM_SET_REGS, bytes(regs), "KVM_SET_REGS")
    _run_until(run, vcpu, "real-mode", [1])

    # Stage 2: 64-bit long mode with paging, running at a kernel-style address.
    _set_segment(sregs, 0, selector=0x10, code=True, long=True)
    for i in range(1, 6):  # ds es fs gs ss
        _set_segment(sregs, i, selector=0x18, code=False, long=True)
    struct.pack_into("<Q", sregs, _CR0, 0x80050033)  # PG WP AM NE ET MP PE
    struct.pack_into("<Q", sregs, _CR3, PML4_ADDR)
    struct.pack_into("<Q", sregs, _CR4, 0x620)  # PAE OSFXSR OSXMMEXCPT
    struct.pack_into("<Q", sregs, _EFER, 0x500)  # LME LMA
    _ioctl(vcpu, KVM_SET_SREGS, bytes(sregs), "KVM_SET_SREGS")
    regs = bytearray(144)
    struct.pack_into("<Q", regs, 6 * 8, 0x8000)  # rsp
    struct.pack_into("<QQ", regs, 128, HIGH_BASE + LONG_CODE_ADDR, 0x2)
    _ioctl(vcpu, KVM_SET_REGS, bytes(regs), "KVM_SET_REGS")
    _run_until(run, vcpu, "long-mode", [2, 3])
    flavour = "PVM" if pvm_backed() else "hardware"
    return (
        f"{KVM_DEVICE} runs stock guest code (real-mode and 64-bit probe guests "
        f"incl. lock cmpxchg16b; {flavour} KVM)"
    )
