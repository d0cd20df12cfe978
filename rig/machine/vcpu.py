"""One vCPU as QEMU's gdbstub shows it, read over the raw RSP link.

vCPU ``n`` is GDB thread ``n + 1`` (RSP thread id ``p1.<n+1>``). Register numbers come
from the target description QEMU sends GDB (``-data-list-register-names``), so nothing
here hard-codes QEMU's layout. Virtual memory is read *through this vCPU's page tables*
(whatever CR3 it has loaded); physical memory through ``Qqemu.PhyMemMode``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rig.transport.rsp import RspLink, hex_le, is_error

#: Registers every snapshot and report shows.
REPORT_REGISTERS = (
    "rip",
    "rsp",
    "eflags",
    "cs",
    "cr0",
    "cr3",
    "cr4",
    "efer",
    "gs_base",
    "k_gs_base",
    "fs_base",
)


def thread_id(cpu: int) -> str:
    """The RSP thread id of vCPU ``cpu`` (vCPU 0 is thread 1)."""
    return f"p1.{cpu + 1:x}"


_STOP_THREAD = re.compile(r"thread:p[0-9a-f]+\.([0-9a-f]+)")


def stopped_cpu(reply: str) -> int | None:
    """The vCPU a stop reply names (``T05thread:p1.2;`` -> 1), None if it names none."""
    m = _STOP_THREAD.search(reply)
    return int(m.group(1), 16) - 1 if m else None


@dataclass(frozen=True)
class RegisterMap:
    """Register name -> RSP register number, from the target description."""

    numbers: Mapping[str, int]

    @classmethod
    def from_gdb_table(cls, table: str) -> RegisterMap:
        """Parse GDB's ``maint print remote-registers`` (Name ... Rmt Nr columns)."""
        lines = table.splitlines()
        header = next((ln for ln in lines if ln.split()[:2] == ["Name", "Nr"]), None)
        if header is None:
            raise ValueError("unexpected `maint print remote-registers` output")
        col = header.index("Rmt Nr")
        numbers: dict[str, int] = {}
        for ln in lines[lines.index(header) + 1 :]:
            name = ln.split()[0] if ln.split() else ""
            rmt = ln[col : col + 6].strip()
            if name and name != "''" and rmt.isdigit():
                numbers[name] = int(rmt)
        return cls(numbers)

    def packet(self, name: str) -> str:
        """The ``p`` packet that reads register ``name``."""
        return f"p{self.numbers[name]:x}"


class Vcpu:
    """vCPU ``index`` of a stopped guest; every method needs a borrowed :class:`RspLink`."""

    def __init__(self, index: int, regmap: RegisterMap) -> None:
        self.index = index
        self.regmap = regmap

    @property
    def thread(self) -> str:
        return thread_id(self.index)

    def registers(self, link: RspLink, names: Sequence[str] = REPORT_REGISTERS) -> dict[str, int]:
        """Read the named registers of this vCPU (one pipelined round trip)."""
        names = [n for n in names if n in self.regmap.numbers]
        replies = link.transact([f"Hg{self.thread}", *(self.regmap.packet(n) for n in names)])
        return {n: hex_le(r) for n, r in zip(names, replies[1:], strict=True) if not is_error(r)}

    def read(self, link: RspLink, address: int, size: int) -> bytes | None:
        """``size`` bytes at virtual ``address`` through this vCPU's page tables, or None."""
        replies = link.transact([f"Hg{self.thread}", f"m{address:x},{size:x}"])
        return None if is_error(replies[1]) else bytes.fromhex(replies[1])

    def read_u64(self, link: RspLink, address: int) -> int | None:
        data = self.read(link, address, 8)
        return None if data is None else int.from_bytes(data, "little")


def read_physical(link: RspLink, address: int, size: int) -> bytes:
    """``size`` bytes of guest-physical memory (switches PhyMemMode on and off again)."""
    replies = link.transact(["Qqemu.PhyMemMode:1", f"m{address:x},{size:x}", "Qqemu.PhyMemMode:0"])
    if replies[0] != "OK":
        raise RuntimeError(f"QEMU refused Qqemu.PhyMemMode ({replies[0]!r})")
    if is_error(replies[1]):
        raise RuntimeError(f"physical address {address:#x} is not readable ({replies[1]})")
    return bytes.fromhex(replies[1])
