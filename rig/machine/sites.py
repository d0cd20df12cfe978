"""CR3 switch sites of a kernel, found in its vmlinux: every CR3 write and every store to
the CR3 signal in the entry and noinstr text.

Nothing is hand-listed. ``objdump -d`` disassembles the entry and noinstr text (the
ranges ``__entry_text_start``..``__entry_text_end`` and
``__noinstr_text_start``..``__noinstr_text_end``, which the linker merges into ``.text``);
a *CR3 write* is ``mov %reg,%cr3``; a *signal store* is a ``mov`` whose destination is
the signal variable (or its page), addressed per-CPU through ``%gs:`` (RIP-relative or
absolute, zero-based or not), or through the
``cpu_entry_area`` alias that paranoid entry code finds with ``SGDT`` (the
``NOTE_CR3_SWITCH ... gsbase_unknown=1`` idiom: a store based on the register loaded
from the SGDT result). The text is the unpatched image: alternatives and static
branches are not applied, so sites that run only with a feature (PCID, Xen PV, 32-bit
tasks) are listed too, each with the reason TCG cannot reach it (:func:`unreachable_reason`).
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from rig.errors import ConfigError
from rig.machine.symbols import SymbolTable

#: The CR3 software signal of the patch series (CONFIG_TRACK_CR3): the per-CPU variable
#: the entry code sets to 1 before it loads the kernel CR3 and to 0 before the user CR3.
#: The one home of its name (the checks, the testcases, the reports import it).
SIGNAL = "kernel_cr3_loaded"

#: Text ranges (start and end symbols) whose code runs at the user/kernel boundary.
ENTRY_RANGES = (("__entry_text_start", "__entry_text_end"), ("__noinstr_text_start", "__noinstr_text_end"))

SiteKind = Literal["cr3-write", "signal-store"]

_LINE = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*?)\s*$")
_FUNC = re.compile(r"^([0-9a-f]+) <([^>]+)>:$")
_COMMENT_TARGET = re.compile(r"#\s*([0-9a-f]+)\b")
_GS_ABS = re.compile(r"^%gs:(0x[0-9a-f]+|\d+)$")


@dataclass(frozen=True)
class Site:
    """One instruction that switches CR3 or writes the signal.

    ``value`` is the immediate a signal store writes (None: from a register, or a CR3
    write). ``function`` is the symbol the instruction belongs to; ``where`` is
    ``function+0xoff``.
    """

    address: int
    kind: SiteKind
    function: str
    where: str
    insn: str
    value: int | None = None
    #: the address of the instruction after it in the text (0: not known)
    next_address: int = field(default=0, compare=False)


def split_operands(ops: str) -> list[str]:
    """AT&T operands split on the commas outside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in ops:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_objdump(text: str, signal_targets: frozenset[int]) -> list[Site]:
    """The sites in ``objdump -d --no-show-raw-insn`` output.

    ``signal_targets`` are the addresses a ``%gs:`` store may name for the signal (the
    variable and its page symbol; zero-based per-CPU offsets before 6.15).
    """
    sites: list[Site] = []
    addresses: list[int] = []  # every instruction's, in text order (for next_address)
    func, func_addr = "?", 0
    recent: list[tuple[str, list[str]]] = []  # (mnemonic, operands) since the function start
    sgdt_regs: set[str] = set()
    for line in text.splitlines():
        fm = _FUNC.match(line)
        if fm:
            func, func_addr = fm.group(2), int(fm.group(1), 16)
            recent, sgdt_regs = [], set()
            continue
        m = _LINE.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        addresses.append(addr)
        mnemonic, rest = m.group(2), m.group(3)
        body, _, comment = rest.partition("#")
        ops = split_operands(body.strip())
        where = f"{func}+{addr - func_addr:#x}"
        insn = " ".join(f"{mnemonic} {body.strip()}".split())
        if mnemonic.startswith("sgdt"):
            sgdt_regs = {"<pending>"}
        elif (
            sgdt_regs == {"<pending>"}
            and mnemonic.startswith("mov")
            and len(ops) == 2
            and "(%rsp)" in ops[0]
            and ops[1].startswith("%r")
        ):
            sgdt_regs = {ops[1]}  # the register now holds the GDT (= cpu_entry_area) address
        if mnemonic.startswith("mov") and len(ops) == 2:
            src, dst = ops
            if dst == "%cr3":
                sites.append(Site(addr, "cr3-write", func, where, insn))
            elif _is_signal_operand(dst, comment, signal_targets, sgdt_regs):
                value = int(src[1:], 16) if src.startswith("$") else None
                sites.append(Site(addr, "signal-store", func, where, insn, value))
        recent.append((mnemonic, ops))
    following = dict(itertools.pairwise(addresses))
    return [replace(s, next_address=following.get(s.address, 0)) for s in sites]


def _is_signal_operand(dst: str, comment: str, targets: frozenset[int], sgdt_regs: set[str]) -> bool:
    if dst.startswith("%gs:"):
        if "(%rip)" in dst:
            cm = _COMMENT_TARGET.search("#" + comment)
            return cm is not None and int(cm.group(1), 16) in targets
        am = _GS_ABS.match(dst)
        return am is not None and int(am.group(1), 0) in targets
    return any(f"({reg})" in dst for reg in sgdt_regs if reg != "<pending>")


def entry_disassembly(vmlinux: Path, symbols: SymbolTable) -> str:
    """``objdump -d --no-show-raw-insn`` of ``vmlinux``'s entry and noinstr text.

    Raises:
        ConfigError: no objdump, no entry-text symbols, or objdump failed.
    """
    objdump = shutil.which("objdump")
    if objdump is None:
        raise ConfigError("objdump not found: install it with `apt-get install binutils`")
    text = []
    for start, end in ENTRY_RANGES:
        lo, hi = symbols.get(start), symbols.get(end)
        if lo is None or hi is None:
            raise ConfigError(f"{vmlinux} has no {start}/{end} symbols: is it a Linux vmlinux?")
        argv = [objdump, "-d", "--no-show-raw-insn", f"--start-address={lo:#x}", f"--stop-address={hi:#x}"]
        res = subprocess.run([*argv, str(vmlinux)], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise ConfigError(f"objdump -d {vmlinux} failed: {res.stderr.strip()[:200]}")
        text.append(res.stdout)
    return "\n".join(text)


def find_sites(vmlinux: Path, symbols: SymbolTable, signal: str = SIGNAL) -> list[Site]:
    """Every CR3 write and signal store in ``vmlinux``'s entry and noinstr text, by address."""
    targets = frozenset(a for a in (symbols.get(signal), symbols.get(f"{signal}_page")) if a is not None)
    found = parse_objdump(entry_disassembly(vmlinux, symbols), targets)
    named = []
    for s in found:  # name each by the symbol the rig uses everywhere (objdump picks any alias)
        where = symbols.describe(s.address)
        named.append(replace(s, function=where.split("+")[0], where=where))
    return sorted(named, key=lambda s: s.address)


#: Functions TCG cannot run with the rig's workloads, and why (prefix match on the symbol).
#: The 32-bit entries are reachable: the compat-*-loop workloads run under ``-cpu max``.
_UNREACHABLE = (
    ("xen_", "Xen PV entry: runs only as a Xen PV guest"),
    ("native_irq_return_ldt", "espfix64: needs a 16-bit SS from modify_ldt (no workload sets one)"),
)


def unreachable_reason(site: Site, *, has_signal: bool) -> str | None:
    """Why ``site`` cannot run under TCG with the rig's workloads, or None if it can."""
    for prefix, why in _UNREACHABLE:
        if site.function.startswith(prefix):
            return why
    if site.kind == "signal-store" and not has_signal:
        return "the kernel has no CR3 signal"
    return None
