"""Splitting a QEMU migration stream into a memory file and a device-state stream.

Why: a VM restored from a snapshot maps the snapshot's memory file privately
(`memory-backend-file,share=off`): nothing is read up front, pages fault in from the
page cache (shared by every VM restored from it) and writes stay private. QEMU 7.2
can leave guest RAM out of its migration stream only for *shared* memory
(`x-ignore-shared`), and a restored VM's memory is not shared. So fcvm takes an
ordinary stream (RAM included) and splits it on the fly: the pages of the guest-RAM
block go into the memory file at their offsets (zero pages are left as holes), and
everything else - the other RAM blocks (ROMs), every device's state - is copied into
the state stream unchanged, RAM entries of the guest-RAM block dropped. Loading that
stream into a QEMU whose guest RAM is the memory file, mapped privately, restores
the VM: the stream holds no pages for that block, so QEMU leaves it as mapped.

The format (QEMU's migration/savevm.c and ram.c, stream version 3), as far as it is
read here - everything after the RAM sections is copied through without parsing:

    be32 0x5145564d "QEVM", be32 3
    [0x07 configuration: be32 len, machine name, subsections (0x05 u8 len, name,
     be32 version, fields)]
    sections 0x01 START (be32 id, u8 len + "ram", be32 instance, be32 version) |
             0x02 PART | 0x03 END (be32 id), each followed by RAM entries and a footer
             (0x7e, be32 id):
        be64 (offset | flags): MEM_SIZE 0x04 (setup: then for each block u8 len + id,
        be64 length) | ZERO 0x02 (u8 fill) | PAGE 0x08 (4096 bytes) | EOS 0x10 (end of
        section data); CONTINUE 0x20 = same block as before, else u8 len + block id
    then 0x04 FULL device sections, 0x08 EOF, and the JSON description: copied as is.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from fcvm.errors import VmmUnavailable

MAGIC = 0x5145564D
VERSION = 3
PAGE = 4096

SECTION_START, SECTION_PART, SECTION_END = 0x01, 0x02, 0x03
SUBSECTION, CONFIGURATION, FOOTER = 0x05, 0x07, 0x7E
F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
FLAGS_MASK = 0xFFF

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")

# Fields of the configuration section's subsections, by name (all fixed or counted).
_KNOWN_SUBSECTIONS = (
    b"configuration/target-page-bits",
    b"configuration/capabilities",
    b"configuration/uuid",
)


class StreamFormatError(VmmUnavailable):
    """The migration stream is not what this QEMU version writes."""


@dataclass
class SplitStats:
    pages: int = 0  # pages written to the memory file
    zero_pages: int = 0  # pages left as holes
    state_bytes: int = 0  # the device-state stream's size


class _Reader:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.offset = 0

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise StreamFormatError(f"migration stream truncated at byte {self.offset + len(data)}")
        self.offset += n
        return data

    def u8(self) -> int:
        return self.read(1)[0]

    def be32(self) -> int:
        return int(_BE32.unpack(self.read(4))[0])

    def be64(self) -> int:
        return int(_BE64.unpack(self.read(8))[0])

    def idstr(self) -> bytes:
        return self.read(self.u8())


def split(source: BinaryIO, state: BinaryIO, memory_fd: int, block: bytes) -> SplitStats:
    """Read a stream from source; RAM block `block`'s pages into memory_fd (pwrite at
    their offsets; the file must be sized already); the rest to state."""
    r = _Reader(source)
    stats = SplitStats()
    out = _Writer(state)
    magic, version = r.be32(), r.be32()
    if (magic, version) != (MAGIC, VERSION):
        raise StreamFormatError(f"not a QEMU migration stream (magic {magic:#x} v{version})")
    out.put(_BE32.pack(magic) + _BE32.pack(version))
    last_in: bytes | None = None  # block named by the last entry read
    last_out: bytes | None = None  # ... and written (CONTINUE must follow what we write)
    while True:
        kind = r.u8()
        if kind == CONFIGURATION:
            name = r.read(r.be32())
            out.put(bytes([kind]) + _BE32.pack(len(name)) + name)
        elif kind == SUBSECTION:
            out.put(_subsection(r))
        elif kind in (SECTION_START, SECTION_PART, SECTION_END):
            section = r.be32()
            head = bytes([kind]) + _BE32.pack(section)
            if kind == SECTION_START:
                idstr = r.idstr()
                if idstr != b"ram":
                    raise StreamFormatError(f"unexpected iterative section {idstr!r}")
                head += bytes([len(idstr)]) + idstr + r.read(8)  # instance, version
            out.put(head)
            last_in, last_out = _ram_entries(r, out, memory_fd, block, stats, last_in, last_out)
            if r.u8() != FOOTER or r.be32() != section:
                raise StreamFormatError(f"section {section} has no footer where expected")
            out.put(bytes([FOOTER]) + _BE32.pack(section))
        else:  # device state (FULL sections), EOF, description: copied as they are
            out.put(bytes([kind]))
            while chunk := source.read(1 << 20):
                out.put(chunk)
            break
    stats.state_bytes = out.size
    return stats


def _subsection(r: _Reader) -> bytes:
    name = r.idstr()
    head = bytes([SUBSECTION, len(name)]) + name + r.read(4)  # + version
    if name not in _KNOWN_SUBSECTIONS:
        raise StreamFormatError(f"unknown configuration subsection {name!r}")
    if name == b"configuration/target-page-bits":
        return head + r.read(4)
    if name == b"configuration/uuid":
        return head + r.read(16)
    count = r.be32()
    caps = b"".join(bytes([len(c)]) + c for c in (r.idstr() for _ in range(count)))
    return head + _BE32.pack(count) + caps


def _ram_entries(
    r: _Reader, out: _Writer, memory_fd: int, block: bytes, stats: SplitStats,
    last_in: bytes | None, last_out: bytes | None,
) -> tuple[bytes | None, bytes | None]:  # fmt: skip
    while True:
        word = r.be64()
        flags, offset = word & FLAGS_MASK, word & ~FLAGS_MASK
        if flags & F_MEM_SIZE:  # the block list: copied
            out.put(_BE64.pack(word))
            remaining = offset
            while remaining > 0:
                name = r.idstr()
                length = r.be64()
                out.put(bytes([len(name)]) + name + _BE64.pack(length))
                remaining -= length
            continue
        if flags & F_EOS:
            out.put(_BE64.pack(word))
            return last_in, last_out
        if not flags & F_CONTINUE:
            last_in = r.idstr()
        if flags & F_ZERO:
            fill, data = r.u8(), b""
        elif flags & F_PAGE:
            fill, data = 0, r.read(PAGE)
        else:
            raise StreamFormatError(f"unsupported RAM entry flags {flags:#x}")
        if last_in == block:
            if data:
                os.pwrite(memory_fd, data, offset)
                stats.pages += 1
            elif fill:
                os.pwrite(memory_fd, bytes([fill]) * PAGE, offset)
                stats.pages += 1
            else:
                stats.zero_pages += 1
            continue
        assert last_in is not None
        flags &= ~F_CONTINUE
        if last_out == last_in:
            flags |= F_CONTINUE
        entry = _BE64.pack(offset | flags)
        if not flags & F_CONTINUE:
            entry += bytes([len(last_in)]) + last_in
            last_out = last_in
        out.put(entry + (data or bytes([fill])))


class _Writer:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.size = 0

    def put(self, data: bytes) -> None:
        self.f.write(data)
        self.size += len(data)
