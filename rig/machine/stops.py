"""When a stepping run stops: conditions on a :class:`~rig.machine.trace.Snapshot`.

A :class:`ForeseeingStop` can also tell from one instruction that the boundary after it
cannot satisfy it; the Stepper then sends the next step with the reads of that boundary
(one round trip a step instead of two: see :mod:`rig.machine.stepper`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from rig.machine.trace import Snapshot
from rig.machine.x86 import in_user_half, may_leave_kernel_half, may_write_cr3

__all__ = [
    "AnyOf",
    "ForeseeingStop",
    "InUserMode",
    "OnTables",
    "Spinning",
    "StopCondition",
    "at_any",
    "in_user_mode",
    "on_kernel_tables",
    "on_user_tables",
]

StopCondition = Callable[[Snapshot], bool]


@runtime_checkable
class ForeseeingStop(Protocol):
    """A stop condition that can tell, from an instruction alone, that the boundary after it
    cannot satisfy it. The Stepper then sends the next step in the write that reads that
    boundary: one round trip a step instead of two (see :meth:`Stepper.run`)."""

    def __call__(self, s: Snapshot) -> bool: ...

    def may_hold_after(self, cpu: int, pc: int, code: bytes) -> bool:
        """False only if, when vCPU ``cpu`` executes the instruction ``code`` at ``pc`` from a
        boundary where the condition does not hold (and the other vCPUs stay frozen), it
        cannot hold at the boundary after it. ``code`` may be cut short or empty (the
        read failed): then True. The Stepper asks right after the condition was found
        False at the boundary whose rip is ``pc`` (the last it was called with), so a
        condition with state (a step count) may rely on that."""
        ...


@dataclass(frozen=True)
class InUserMode:
    """Holds once vCPU ``cpu``'s rip is in the lower (user) half (a :class:`ForeseeingStop`)."""

    cpu: int

    def __call__(self, s: Snapshot) -> bool:
        return in_user_half(s.rip[self.cpu])

    def may_hold_after(self, cpu: int, pc: int, code: bytes) -> bool:
        """Only the stepping vCPU's rip moves, and only returns, indirect and far transfers
        can take it from the upper half to the lower (:func:`may_leave_kernel_half`)."""
        return cpu == self.cpu and may_leave_kernel_half(code, pc)


def in_user_mode(cpu: int) -> InUserMode:
    """Stop once vCPU ``cpu``'s rip is in the lower (user) half."""
    return InUserMode(cpu)


@dataclass(frozen=True)
class OnTables:
    """Holds once vCPU ``cpu`` has the PTI ``user`` (or, with False, kernel) page tables
    loaded (a :class:`ForeseeingStop`)."""

    cpu: int
    user: bool

    def __call__(self, s: Snapshot) -> bool:
        return s.user_tables(self.cpu) == self.user

    def may_hold_after(self, cpu: int, pc: int, code: bytes) -> bool:
        """Only a CR3 write of the stepping vCPU changes its side (:func:`may_write_cr3`)."""
        return cpu == self.cpu and may_write_cr3(code)


def on_kernel_tables(cpu: int) -> OnTables:
    """Stop once vCPU ``cpu`` runs on the kernel page tables (CR3 bit 12 clear)."""
    return OnTables(cpu, user=False)


def on_user_tables(cpu: int) -> OnTables:
    """Stop once vCPU ``cpu`` runs on the PTI user page tables (CR3 bit 12 set)."""
    return OnTables(cpu, user=True)


@dataclass
class Spinning:
    """Holds once vCPU ``cpu`` visited at most ``distinct`` rips in its last ``window``
    boundaries: it spins, most often on something a frozen vCPU holds (a spinlock, a
    stop_machine rendezvous), which never comes while only ``cpu`` is stepped; or it
    polls a device whose emulation does not advance between single steps (a UART's
    transmit-empty bit). Checked at every ``window``-th boundary, so it foresees (a
    :class:`ForeseeingStop`) every other one. ``spun_at`` is the boundary it held at.

    A false alarm (a long ``rep movs``: one rip per iteration) only ends a run early.
    """

    cpu: int
    window: int = 2000
    distinct: int = 32
    spun_at: Snapshot | None = None
    _rips: set[int] = field(default_factory=set)
    _seen: int = 0

    def __call__(self, s: Snapshot) -> bool:
        self._seen = s.step
        self._rips.add(s.rip[self.cpu])
        if s.step == 0 or s.step % self.window:
            return False
        spun = len(self._rips) <= self.distinct
        self._rips = set()
        if spun:
            self.spun_at = s
        return spun

    def may_hold_after(self, cpu: int, pc: int, code: bytes) -> bool:
        return (self._seen + 1) % self.window == 0


@dataclass(frozen=True)
class AnyOf:
    """Holds when any of ``conditions`` holds; every one sees every boundary (some keep
    state). It foresees what they all foresee, and nothing if one of them cannot."""

    conditions: tuple[StopCondition, ...]

    def __call__(self, s: Snapshot) -> bool:
        return any([c(s) for c in self.conditions])

    def may_hold_after(self, cpu: int, pc: int, code: bytes) -> bool:
        return any(
            not isinstance(c, ForeseeingStop) or c.may_hold_after(cpu, pc, code) for c in self.conditions
        )


def at_any(addresses: Iterable[int]) -> StopCondition:
    """Stop once the stepping vCPU's rip is one of ``addresses``."""
    targets = frozenset(addresses)

    def cond(s: Snapshot) -> bool:
        return s.pc in targets

    return cond
