"""x86-64 paging facts: CR3 decoding under PTI and a 4/5-level page-table walker.

The walker reads page-table entries through a callable that reads *physical* memory
(the rig passes one backed by QEMU's ``Qqemu.PhyMemMode``), so it sees the tables as
the MMU does, independent of which CR3 any vCPU has loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

#: CR3 bit 12: set when the PTI user page tables are loaded (the user PGD is kernel + 4 KiB).
PTI_USER_PGTABLE_BIT = 12
#: :data:`PTI_USER_PGTABLE_BIT` as a mask.
PTI_USER_PGTABLE_MASK = 1 << PTI_USER_PGTABLE_BIT
#: CR3 bit 11: the user PCID bit when PCID is on (``X86_CR3_PTI_PCID_USER_BIT``).
PTI_USER_PCID_BIT = 11
#: :data:`PTI_USER_PCID_BIT` as a mask.
PTI_USER_PCID_MASK = 1 << PTI_USER_PCID_BIT
X86_CR3_PCID_MASK = 0xFFF
#: CR3 bit 63 on a write with PCID: "do not flush" (``X86_CR3_PCID_NOFLUSH``); never part of
#: CR3 as read back.
X86_CR3_PCID_NOFLUSH = 1 << 63
X86_CR4_PCIDE = 1 << 17
X86_CR4_LA57 = 1 << 12
PAGE_SIZE = 4096
#: Physical address bits of a page-table entry (bits 12..51).
PTE_ADDR_MASK = 0x000F_FFFF_FFFF_F000

# entry flags
P, RW, US, PWT, PCD, A, D, PS, G = (1 << b for b in range(9))
NX = 1 << 63


@dataclass(frozen=True)
class Cr3:
    """A decoded CR3 value (``pcid`` only means something when CR4.PCIDE is set)."""

    raw: int
    pcid_enabled: bool = False

    @property
    def user_tables(self) -> bool:
        """True when the PTI user page tables are loaded (bit 12)."""
        return user_cr3(self.raw)

    @property
    def pgd(self) -> int:
        """Physical address of the loaded top-level table."""
        return self.raw & PTE_ADDR_MASK

    @property
    def kernel_pgd(self) -> int:
        """Physical address of the kernel PGD of this pair (bit 12 cleared)."""
        return self.pgd & ~PTI_USER_PGTABLE_MASK

    @property
    def user_pgd(self) -> int:
        """Physical address of the PTI user PGD of this pair (the kernel PGD + 4 KiB, bit 12 set)."""
        return self.kernel_pgd | PTI_USER_PGTABLE_MASK

    @property
    def pcid(self) -> int | None:
        return self.raw & X86_CR3_PCID_MASK if self.pcid_enabled else None

    @property
    def user_pcid(self) -> bool:
        """The user-PCID bit (11); only meaningful with PCID enabled."""
        return self.pcid_enabled and bool(self.raw & PTI_USER_PCID_MASK)

    def describe(self) -> str:
        side = cr3_side(self.raw)
        pcid = f" pcid={self.pcid}" if self.pcid_enabled else ""
        return f"{self.raw:#x} ({side}{pcid})"


def user_cr3(cr3: int) -> bool:
    """True if ``cr3`` loads the PTI user page tables (bit 12 set), False for the kernel ones.

    The one test of a CR3 value's side: under PTI the user PGD is the kernel PGD + 4 KiB
    (``PTI_USER_PGTABLE_BIT``). Without PTI bit 12 says nothing (a PGD is only 4 KiB aligned).
    """
    return bool(cr3 & PTI_USER_PGTABLE_MASK)


def cr3_side(cr3: int) -> Literal["user", "kernel"]:
    """``"user"`` or ``"kernel"``: the side :func:`user_cr3` says ``cr3`` is on, as reports word it."""
    return "user" if user_cr3(cr3) else "kernel"


def decode_cr3(raw: int, cr4: int = 0) -> Cr3:
    """Decode ``raw`` CR3; ``cr4`` says whether PCIDs are on."""
    return Cr3(raw, pcid_enabled=bool(cr4 & X86_CR4_PCIDE))


@dataclass(frozen=True)
class WalkStep:
    """One level of a walk: the table's level name, the entry's physical address and value."""

    level: str
    index: int
    entry_address: int
    entry: int

    @property
    def present(self) -> bool:
        return bool(self.entry & P)


@dataclass(frozen=True)
class Translation:
    """The result of walking a virtual address.

    ``physical`` is None when some level is not present. The flags combine the levels
    as the MMU does: writable and user only if every level allows it, NX if any level
    sets it; global comes from the final entry.
    """

    virtual: int
    steps: tuple[WalkStep, ...]
    physical: int | None
    page_size: int
    writable: bool
    user: bool
    nx: bool
    global_: bool

    @property
    def present(self) -> bool:
        return self.physical is not None

    def flags(self) -> str:
        if not self.present:
            return "not-present"
        return " ".join(
            name
            for name, on in (
                ("P", True),
                ("RW", self.writable),
                ("US", self.user),
                ("NX", self.nx),
                ("G", self.global_),
            )
            if on
        )


PhysReader = Callable[[int], int]
"""Reads one little-endian 64-bit word of physical memory at the given address."""

_LEVELS5 = ("pgd", "p4d", "pud", "pmd", "pte")
_SHIFTS5 = (48, 39, 30, 21, 12)


#: Legacy prefixes that may precede an opcode (operand/address size, REP, segment, LOCK).
_LEGACY_PREFIXES = frozenset({0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x3E, 0x26, 0x36, 0x64, 0x65, 0xF0})
#: Every byte that can precede an opcode in 64-bit mode: the legacy prefixes and REX
#: (40-4F). A REX that is not last is ignored by the CPU, but the opcode still follows.
_PREFIXES = _LEGACY_PREFIXES | frozenset(range(0x40, 0x50))


def may_write_cr3(code: bytes) -> bool:
    """Whether the instruction starting at ``code[0]`` may write CR3 (conservative).

    In 64-bit mode only ``MOV CR3, reg`` (``0F 22 /3``, after optional legacy and REX
    prefixes) writes CR3: interrupts and exceptions do not, and task switches do not
    exist. False only when ``code`` decodes as another instruction; True for any
    ``0F 22`` (a write to any control register) and for bytes too short to tell.
    """
    i = 0
    while i < len(code) and code[i] in _PREFIXES:
        i += 1
    if i >= len(code):
        return True  # nothing left to decode: cannot tell
    if code[i] != 0x0F:
        return False
    return i + 1 >= len(code) or code[i + 1] == 0x22


def walk(pgd_phys: int, virtual: int, read_phys_u64: PhysReader, *, five_level: bool) -> Translation:
    """Walk ``virtual`` through the tables rooted at ``pgd_phys`` (4- or 5-level paging)."""
    levels = _LEVELS5 if five_level else ("pgd", "pud", "pmd", "pte")
    shifts = _SHIFTS5 if five_level else (39, 30, 21, 12)
    table = pgd_phys & PTE_ADDR_MASK
    steps: list[WalkStep] = []
    writable = user = True
    nx = False
    for depth, (name, shift) in enumerate(zip(levels, shifts, strict=True)):
        index = (virtual >> shift) & 0x1FF
        addr = table + 8 * index
        entry = read_phys_u64(addr)
        steps.append(WalkStep(name, index, addr, entry))
        if not entry & P:
            return Translation(virtual, tuple(steps), None, 0, False, False, False, False)
        writable &= bool(entry & RW)
        user &= bool(entry & US)
        nx |= bool(entry & NX)
        last = depth == len(levels) - 1
        huge = name in ("pud", "pmd") and bool(entry & PS)
        if last or huge:
            size = 1 << shift
            frame = entry & PTE_ADDR_MASK & ~(size - 1)
            return Translation(
                virtual,
                tuple(steps),
                frame | (virtual & (size - 1)),
                size,
                writable,
                user,
                nx,
                bool(entry & G),
            )
        table = entry & PTE_ADDR_MASK
    raise AssertionError("unreachable")


#: Lowest address of the upper (kernel) half of the 64-bit address space: bit 63 set.
#:
#: A canonical address has bits 63..47 (4-level paging) or 63..56 (5-level, LA57) all
#: equal, so its upper half starts at 0xffff800000000000 or 0xff00000000000000; every
#: address from 1 << 63 up to those is non-canonical (no rip, no symbol lies there). Bit
#: 63 therefore tells the halves apart under both paging modes with one constant, which is
#: all the rig asks: a rip or return address in the user half (user mode), a symbol that is
#: a kernel address (not a zero-based per-CPU offset or an absolute value).
KERNEL_HALF = 1 << 63


def in_user_half(address: int) -> bool:
    """True if ``address`` is in the lower (user) half of the address space (bit 63 clear)."""
    return address < KERNEL_HALF


#: One-byte opcodes whose next rip is not the fall-through, a relative target or an
#: interrupt vector: RET near/far (C2 C3 CA CB), IRET (CF), JMP/CALL far (EA 9A).
_UNKNOWN_TARGET = frozenset({0xC2, 0xC3, 0xCA, 0xCB, 0xCF, 0xEA, 0x9A})
#: Two-byte (``0F xx``) opcodes of the same kind: SYSCALL, SYSRET, SYSENTER, SYSEXIT, RSM.
_UNKNOWN_TARGET_0F = frozenset({0x05, 0x07, 0x34, 0x35, 0xAA})
#: Relative branches with an 8-bit displacement: Jcc (70-7F), LOOPcc/LOOP/JrCXZ (E0-E3), JMP (EB).
_REL8 = frozenset({*range(0x70, 0x80), 0xE0, 0xE1, 0xE2, 0xE3, 0xEB})


def may_leave_kernel_half(code: bytes, pc: int) -> bool:
    """Whether executing the instruction ``code`` at ``pc`` may leave rip in the lower
    (user) half of the address space (conservative).

    False only when ``pc`` is in the upper half and ``code`` decodes as an instruction
    whose next rip is its fall-through, a relative branch target in the upper half, or
    an interrupt or exception vector (the IDT's handlers are kernel text): everything
    but returns (``RET``, ``IRET``, ``SYSRET``, ``SYSEXIT``, FRED's ``ERETU``), indirect
    and far ``JMP``/``CALL``, ``SYSCALL``/``SYSENTER`` and ``RSM``. True for bytes too
    short to tell and for a relative branch with an operand-size prefix (truncated
    targets on some CPUs).
    """
    if in_user_half(pc) or pc + 16 >= 1 << 64:
        return True
    i = 0
    n = len(code)
    sized = rep = False
    while i < n and code[i] in _PREFIXES:
        sized |= code[i] == 0x66
        rep |= code[i] in (0xF2, 0xF3)
        i += 1
    if i >= n:
        return True
    op = code[i]
    if op in _UNKNOWN_TARGET:
        return True
    if op == 0xFF:  # group 5: /2 /3 CALL indirect (near, far), /4 /5 JMP indirect
        return i + 1 >= n or 2 <= (code[i + 1] >> 3) & 7 <= 5
    if op in _REL8 or op in (0xE8, 0xE9):
        size = 1 if op in _REL8 else 4
        return sized or in_user_half(_relative_target(code, pc, i + 1, size))
    if op != 0x0F:
        return False
    if i + 1 >= n:
        return True
    op2 = code[i + 1]
    if op2 in _UNKNOWN_TARGET_0F:
        return True
    if 0x80 <= op2 <= 0x8F:  # Jcc rel32
        return sized or in_user_half(_relative_target(code, pc, i + 2, 4))
    if op2 == 0x01:  # group 7: with F2/F3, ERETS/ERETU/UIRET and kin; CLAC/STAC/SWAPGS without
        return rep
    return False


def _relative_target(code: bytes, pc: int, at: int, size: int) -> int:
    """The target of a relative branch whose ``size``-byte displacement starts at ``code[at]``
    (0 if ``code`` is cut short, which callers treat as the lower half)."""
    if at + size > len(code):
        return 0
    rel = int.from_bytes(code[at : at + size], "little", signed=True)
    return (pc + at + size + rel) & ((1 << 64) - 1)
