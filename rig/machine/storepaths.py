"""Every path from a signal store to the CR3 write it precedes, read from the vmlinux.

The stepped checks see the paths TCG runs; this sees every path the text has. From each
signal store site (:func:`rig.machine.sites.find_sites`) the instructions that follow are
walked in the entry and noinstr text, both ways at a conditional branch and at a direct
jump within its function (the text is unpatched: such a jump may be an alternative's
original or a static branch that the running kernel replaces with NOPs, so its
fall-through is a path too; a jump to another function is a tail jump), until a CR3
write: each walk that reaches one is a :class:`StorePath`, the instructions between the
store and the write in order. A jump over another signal store is not followed: it is
that store's static branch with the housekeeping gate off, under which the store the
walk started from (gated by the same key) never ran. A walk also ends, without a
path, at another signal store, a return, an indirect jump, a ``sysret``/``iret``, or
after :data:`MAX_WALK` instructions (a store whose every walk ends so precedes no CR3
write: the paranoid exit's store when CR3 stays the kernel's). A ``call`` or an
instruction that cannot be decoded inside a walk ends it *with* a path, marked
``unverifiable``: what runs there cannot be checked from here.

Judging the paths (memory operands, length) is :func:`rig.observe.checks.static_path_findings`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rig.machine.sites import SIGNAL, Site, entry_disassembly, find_sites
from rig.machine.symbols import SymbolTable

__all__ = ["MAX_WALK", "Instruction", "StorePath", "parse_instructions", "store_paths", "walk_store_paths"]

#: Most instructions one walk from a store follows before it gives up (no CR3 write near).
MAX_WALK = 32

_LINE = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*?)\s*$")
_FUNC = re.compile(r"^([0-9a-f]+) <([^>]+)>:$")
_TARGET = re.compile(r"^([0-9a-f]+)\b")
#: Mnemonics after which the walk cannot go on (the path leaves the entry code).
_ENDS = ("ret", "iret", "sysret", "sysexit", "ud2", "int3", "hlt", "eretu", "erets")


@dataclass(frozen=True)
class Instruction:
    """One instruction of the text: ``address``, ``next_address`` (the one after it),
    ``text`` (AT&T, objdump's, without its comment) and ``where`` (symbol+offset)."""

    address: int
    next_address: int
    text: str
    where: str

    @property
    def mnemonic(self) -> str:
        return self.text.split(" ", 1)[0]

    def branch_target(self) -> int | None:
        """The target of a direct jump or branch (None for anything else)."""
        if not self.mnemonic.startswith("j") or " " not in self.text:
            return None
        m = _TARGET.match(self.text.split(" ", 1)[1].strip())
        return int(m.group(1), 16) if m else None


@dataclass(frozen=True)
class StorePath:
    """The instructions run between a signal store and a CR3 write on one path."""

    store: Site
    cr3_write: Site | None  # None: the walk ended unverifiable (a call, an undecodable byte)
    between: tuple[Instruction, ...]
    unverifiable: str = ""


def _function(ins: Instruction) -> str:
    """The label (objdump's ``<symbol>``) the instruction is under."""
    return ins.where.rsplit("+", 1)[0]


def parse_instructions(text: str) -> list[Instruction]:
    """The instructions of ``objdump -d --no-show-raw-insn`` output, in text order."""
    out: list[tuple[int, str, str]] = []
    func, func_addr = "?", 0
    for line in text.splitlines():
        fm = _FUNC.match(line)
        if fm:
            func, func_addr = fm.group(2), int(fm.group(1), 16)
            continue
        m = _LINE.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        body = m.group(3).partition("#")[0].strip()
        out.append((addr, " ".join(f"{m.group(2)} {body}".split()), f"{func}+{addr - func_addr:#x}"))
    return [Instruction(a, out[i + 1][0] if i + 1 < len(out) else 0, t, w) for i, (a, t, w) in enumerate(out)]


def walk_store_paths(instructions: list[Instruction], sites: list[Site]) -> list[StorePath]:
    """Every path from each signal store site to a CR3 write (module doc)."""
    index = {ins.address: i for i, ins in enumerate(instructions)}
    by_address = {s.address: s for s in sites}
    stores = sorted(s.address for s in sites if s.kind == "signal-store")
    paths: list[StorePath] = []
    for store in (s for s in sites if s.kind == "signal-store"):
        start = index.get(store.address)
        if start is None:
            continue
        # (position of the next instruction, instructions so far), depth-first
        stack: list[tuple[int, tuple[Instruction, ...]]] = [(start + 1, ())]
        seen: set[tuple[int, int]] = set()
        while stack:
            pos, between = stack.pop()
            if pos >= len(instructions) or len(between) > MAX_WALK or (pos, len(between)) in seen:
                continue
            seen.add((pos, len(between)))
            ins = instructions[pos]
            site = by_address.get(ins.address)
            if site is not None and site.kind == "cr3-write":
                paths.append(StorePath(store, site, between))
                continue
            if site is not None:  # another store: this one's note was overwritten
                continue
            mnemonic = ins.mnemonic
            if mnemonic.startswith("call") or mnemonic in ("(bad)", ".byte") or "(bad)" in ins.text:
                why = "a call" if mnemonic.startswith("call") else "an instruction that cannot be decoded"
                paths.append(StorePath(store, None, (*between, ins), f"{why} at {ins.where}: `{ins.text}`"))
                continue
            if mnemonic.startswith(_ENDS):
                continue
            target = ins.branch_target()
            if mnemonic.startswith("j") and target is None:
                continue  # an indirect jump: the walk cannot follow it
            # a jump over another store is that store's static branch with the gate off,
            # under which the store the walk started from (gated the same way) never ran
            skips_store = target is not None and any(ins.address < a < target for a in stores)
            if target is not None and target in index and not skips_store:
                stack.append((index[target], (*between, ins)))
            # on through a direct jmp too when it jumps within its own function: in the
            # unpatched text it may be an alternative's original or a static branch (to a
            # local label), which the running kernel replaces with NOPs. A jmp to another
            # function is a tail jump: only its target is a path.
            local = (
                target is not None
                and target in index
                and _function(instructions[index[target]]) == (_function(ins))
            )
            if not mnemonic.startswith("jmp") or local:
                stack.append((pos + 1, (*between, ins)))
    return paths


def store_paths(vmlinux: Path, symbols: SymbolTable, signal: str = SIGNAL) -> list[StorePath]:
    """Every path from a signal store to a CR3 write in ``vmlinux`` (module doc).

    Raises:
        ConfigError: objdump is missing or fails, or the vmlinux has no entry text.
    """
    sites = find_sites(vmlinux, symbols, signal)
    return walk_store_paths(parse_instructions(entry_disassembly(vmlinux, symbols)), sites)
