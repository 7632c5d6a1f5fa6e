"""The machine layer: one VM and everything it holds (see machine.py), described by a
MachineSpec (spec.py). Every command that runs a VM, and the Python API, use it."""

from __future__ import annotations

from fcvm.machine.machine import (
    Machine,
    Phase,
    RestoreFailed,
    RestoreSource,
    held_record,
)
from fcvm.machine.parts import Parts
from fcvm.machine.spec import DriveSpec, MachineSpec

__all__ = [
    "DriveSpec", "Machine", "MachineSpec", "Parts", "Phase", "RestoreFailed", "RestoreSource",
    "held_record",
]  # fmt: skip
