"""What a step-trace timeline shows, before it is drawn: lanes, markers and folded columns.

x is the instruction boundary (the step). Lanes (:func:`lanes`), top to bottom:

* ``vCPU n CR3``: which page tables vCPU ``n`` has loaded (PTI user or kernel);
* ``<word> @ vCPU n``: each watched word as vCPU ``n`` reads it through its own tables;
* ``vCPU k at``: the function the stepping vCPU ``k`` is in.

Markers (:func:`markers`): CR3 writes; stores to a watched word (an instruction at a known
store site, e.g. the kernel's signal stores from :mod:`rig.machine.sites`, or whose
destination names the word; and any change of a word's value); entries into an exception
or interrupt vector; the trace's own :class:`~rig.machine.trace.Mark` s (kind
``"event"``, e.g. "NMI injected", draws as an event); and the first violation, from the
test's findings' fields (:func:`violation_of`).

Columns (:func:`columns`): at most :data:`MAX_COLUMNS`, folds included, handed out in
tiers: the violation, CR3 writes and events first, then stores, then the other lane
changes, each tier first as single columns and then widened to windows of up to
:data:`WINDOW` boundaries on each side while the budget lasts. Whatever is left folds
into one column per run. :mod:`rig.report.timeline` draws them.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rig.machine.disasm import MOV_TO_CR3
from rig.machine.trace import Snapshot, Trace
from rig.machine.x86 import cr3_side, in_user_half
from rig.observe.findings import Finding

__all__ = [
    "MARKER_KINDS",
    "MAX_COLUMNS",
    "WINDOW",
    "Column",
    "Lane",
    "Marker",
    "Violation",
    "columns",
    "function_of",
    "lanes",
    "markers",
    "side_of",
    "stored_word",
    "violation_of",
    "word_text",
]

#: Boundaries kept at full resolution on each side of a change or marker (at most).
WINDOW = 12
#: Most columns in one timeline, folded runs included (see :func:`columns`).
MAX_COLUMNS = 3000

#: Symbols whose first instruction is where the CPU lands when it takes an event.
_ENTRY_SYMBOL = re.compile(
    r"^(asm_exc_\w+|asm_sysvec_\w+|asm_common_interrupt|asm_spurious_\w+"
    r"|entry_SYSCALL_64|entry_SYSCALL_compat|entry_SYSENTER_\w+|entry_INT80_\w+)$"
)
#: Mnemonics (AT&T, any size suffix) whose last operand is written.
_STORE_MNEMONIC = re.compile(
    r"^(?:lock\s+)?(?:mov[bwlq]?|movabs[bwlq]?|xchg[bwlq]?|cmpxchg[bwlq]?|xadd[bwlq]?"
    r"|(?:add|sub|and|or|xor|adc|sbb|inc|dec|neg|not)[bwlq]?|set\w+)\s+(.*)$"
)

#: Marker kinds, in the order of their rows above the lanes.
MARKER_KINDS = ("violation", "cr3", "store", "event")


@dataclass(frozen=True)
class Violation:
    """The first broken rule, as the timeline marks it: at boundary ``step`` (None: not
    placed on this trace), with its ``message``."""

    step: int | None
    message: str


@dataclass(frozen=True)
class Marker:
    """A marker on the timeline: ``kind`` is one of :data:`MARKER_KINDS`."""

    step: int
    kind: str
    text: str


@dataclass(frozen=True)
class Lane:
    """One row: a label and a value per snapshot (equal neighbours draw as one segment)."""

    key: str
    label: str
    values: tuple[str, ...]


def violation_of(findings: Sequence[Finding], trace: Trace | None = None) -> Violation | None:
    """The finding a timeline marks: the first with a step (at that step), else the first,
    placed at the first boundary of ``trace`` whose ``where`` is the finding's (none:
    unplaced). None without findings. The fields decide; the text is only shown."""
    if not findings:
        return None
    first = next((f for f in findings if f.step is not None), None)
    if first is not None:
        return Violation(first.step, _shown(first))
    f = findings[0]
    step = None
    if trace is not None and f.where:
        step = next((s.step for s in trace.snapshots if s.where == f.where), None)
    return Violation(step, _shown(f))


def _shown(finding: Finding) -> str:
    """A finding as the failure message lists it (``[rule] text``)."""
    return f"[{finding.rule.value}] {finding.text}"


def side_of(s: Snapshot, cpu: int) -> str:
    return cr3_side(s.cr3[cpu])


def _cr3_text(s: Snapshot, cpu: int) -> str:
    """``user 0x1234000`` / ``kernel 0x1233000``: the side, then the CR3 value."""
    return f"{side_of(s, cpu)} {s.cr3[cpu]:#x}"


def word_text(v: int | None) -> str:
    """Small values in decimal (a flag reads 0/1), large ones (addresses) in hex."""
    if v is None:
        return "unmapped"
    return str(v) if v < 0x10000 else f"{v:#x}"


def function_of(s: Snapshot) -> str:
    if in_user_half(s.pc):
        return "user"
    if not s.where or s.where.startswith("0x"):
        return "?"
    return s.where.split("+", 1)[0]


def lanes(trace: Trace) -> list[Lane]:
    """The lanes of ``trace``: CR3 side per vCPU, each watched word per vCPU, location."""
    snaps = trace.snapshots
    out = []
    for n in range(trace.ncpus):
        tag = " (steps)" if n == trace.cpu else ""
        out.append(Lane(f"cr3-cpu{n}", f"vCPU {n} CR3{tag}", tuple(_cr3_text(s, n) for s in snaps)))
    names = list(snaps[0].words) if snaps else []
    for name in names:
        for n in range(trace.ncpus):
            values = tuple(word_text(s.words[name][n]) for s in snaps)
            out.append(Lane(f"word-{name}-cpu{n}", f"{name} @ vCPU {n}", values))
    out.append(Lane(f"where-cpu{trace.cpu}", f"vCPU {trace.cpu} at", tuple(function_of(s) for s in snaps)))
    return out


def _base_name(word: str) -> str:
    """``kernel_cr3_loaded`` for a watch named ``kernel_cr3_loaded`` or ``kernel_cr3_loaded[1]``."""
    return word.split("[", 1)[0]


def stored_word(insn: str, words: Sequence[str]) -> str | None:
    """The watched word (one of ``words``) that ``insn`` stores to, judged by its text:
    a writing instruction whose last operand is memory, with the word's name in its
    operands or in the disassembler's ``<symbol>`` comment (``movl $0x1,%gs:0x0(%rip)
    # 0x... <kernel_cr3_loaded>``). None if it stores to none of them (or is no store)."""
    m = _STORE_MNEMONIC.match(insn.strip())
    if m is None:
        return None
    operands, _, comment = m.group(1).partition("#")
    dest = re.sub(r"\([^)]*\)", lambda p: p.group(0).replace(",", ";"), operands).rsplit(",", 1)[-1].strip()
    if not dest or dest.startswith("$") or re.fullmatch(r"%\w+", dest):
        return None  # a register destination: a load, not a store
    for word in words:
        if re.search(rf"(?<![\w]){re.escape(_base_name(word))}(?![\w])", dest + " " + comment):
            return word
    return None


def markers(
    trace: Trace, violation: Violation | None = None, store_sites: Mapping[int, str] | None = None
) -> list[Marker]:
    """CR3 writes, stores to watched words, vector entries, the trace's marks, the violation.

    A store is an instruction at an address of ``store_sites`` (address -> the word it
    writes, e.g. the kernel's signal stores; ignored where the trace's instruction text
    is not a writing one, as with the sites of another build), one whose text stores to a watched word
    (:func:`stored_word`), or any instruction after which a word reads differently (the
    same vCPU's view before and after). The first two are marked even when they write
    the value already there. A marker sits on the column of the instruction that did it
    (the change shows from the next column on); a violation sits on the boundary its
    message names.
    """
    snaps = trace.snapshots
    sites = store_sites or {}
    names = list(snaps[0].words) if snaps else []
    out: list[Marker] = []
    for i, s in enumerate(snaps):
        nxt = snaps[i + 1] if i + 1 < len(snaps) else None
        changed = [n for n in range(trace.ncpus) if nxt is not None and nxt.cr3[n] != s.cr3[n]]
        if changed or MOV_TO_CR3.match(s.insn):
            what = "; ".join(
                f"vCPU {n} CR3 {s.cr3[n]:#x}->{nxt.cr3[n]:#x} ({side_of(s, n)}->{side_of(nxt, n)})"
                for n in changed
                if nxt is not None
            )
            out.append(Marker(s.step, "cr3", f"{s.where} `{s.insn}`" + (f": {what}" if what else "")))
        stores = []
        if nxt is not None:
            for name, views in s.words.items():
                seen = {
                    (views[n], nxt.words[name][n])
                    for n in range(trace.ncpus)
                    if views[n] is not None
                    and nxt.words[name][n] is not None
                    and views[n] != nxt.words[name][n]
                }
                stores += [f"{name} {a}->{b}" for a, b in sorted(seen)]
        site = sites.get(s.pc)
        if site is not None and s.insn not in ("", "?") and not _STORE_MNEMONIC.match(s.insn):
            site = None  # the sites of another build: this instruction writes nothing
        target = site or stored_word(s.insn, names)
        if target is not None and not any(x.startswith(_base_name(target)) for x in stores):
            now = "/".join(word_text(v) for v in s.words.get(target, []))
            stores.append(f"store to {target}" + (f" (value unchanged: {now})" if now else ""))
        if stores:
            out.append(Marker(s.step, "store", f"{s.where} `{s.insn}`: " + ", ".join(stores)))
        if _ENTRY_SYMBOL.match(s.where):
            out.append(Marker(s.step, "event", f"vCPU {trace.cpu} enters {s.where}"))
    for m in trace.marks:
        kind = m.kind if m.kind in MARKER_KINDS else "event"
        out.append(Marker(m.step, kind, m.text if kind == m.kind else f"{m.kind}: {m.text}"))
    if violation is not None and violation.step is not None:
        out.append(Marker(violation.step, "violation", violation.message))
    return out


@dataclass(frozen=True)
class Column:
    """Snapshots ``first..last`` (indices, inclusive) drawn as one column (folded if more than one)."""

    first: int
    last: int

    @property
    def folded(self) -> bool:
        return self.last > self.first


def columns(
    trace: Trace, lane_list: Sequence[Lane], marks: Sequence[Marker], limit: int = MAX_COLUMNS
) -> list[Column]:
    """Full-resolution columns near markers and lane changes, folded runs elsewhere, at
    most ``limit`` columns in all (folds included).

    Boundaries are given their own column in tiers, each tier first alone (window 0),
    then with windows of 1, 2, 4 … :data:`WINDOW` boundaries on each side, while the
    budget lasts: the violation, CR3 writes and events (with the first and last
    boundary), then stores to watched words, then the other changes of the CR3 and
    word lanes (nearest to a marker first). What is left folds, one column per run
    (a run whose lanes change shows ``mixed``).
    """
    n = len(trace.snapshots)
    if n == 0:
        return []
    index_of = {s.step: i for i, s in enumerate(trace.snapshots)}

    def at(kinds: tuple[str, ...]) -> list[int]:
        return sorted({index_of[m.step] for m in marks if m.kind in kinds and m.step in index_of})

    violation = at(("violation",))
    cr3 = at(("cr3",))  # the CR3 write and the first boundary on the new tables
    after = {i + 1 for i in cr3 if i + 1 < n}
    top = sorted(set(violation) | {0, n - 1} | set(cr3) | after | set(at(("event",))))
    stores = [i for i in at(("store",)) if i not in set(top)]
    changes: set[int] = set()
    for lane in lane_list:
        if lane.key.startswith("where-"):
            continue  # the function changes all the time: it does not keep columns
        values = lane.values
        changes.update(i for i in range(1, n) if values[i] != values[i - 1])
        changes.update(i - 1 for i in range(1, n) if values[i] != values[i - 1])
    anchors = sorted(set(top) | set(stores))
    rest = sorted(changes - set(anchors), key=lambda i: (_distance(anchors, i), i))
    focus = violation[0] if violation else None
    tiers = [
        sorted(top, key=lambda i: (i != focus, _distance(violation, i), i)),
        sorted(stores, key=lambda i: (_distance(top, i), i)),
        rest,
    ]
    keep = _Budget(n, max(limit, 3))
    for tier in tiers:
        window = 0
        while True:
            for i in tier:
                keep.add_window(i, window)
            if window >= WINDOW or keep.full:
                break
            window = max(1, window * 2) if window < WINDOW // 2 else WINDOW
    out: list[Column] = []
    i = 0
    while i < n:
        j = i
        if not keep.kept[i]:
            while j + 1 < n and not keep.kept[j + 1]:
                j += 1
        out.append(Column(i, j))
        i = j + 1
    return out


def _distance(sorted_indices: Sequence[int], i: int) -> int:
    """Distance from ``i`` to the nearest of ``sorted_indices`` (``len`` of a trace if none)."""
    if not sorted_indices:
        return 1 << 30
    k = bisect.bisect_left(sorted_indices, i)
    near = [abs(sorted_indices[j] - i) for j in (k - 1, k) if 0 <= j < len(sorted_indices)]
    return min(near)


class _Budget:
    """Which boundaries have a column of their own, within ``limit`` columns in all
    (kept boundaries plus one per run of the others)."""

    def __init__(self, n: int, limit: int) -> None:
        self.n = n
        self.limit = limit
        self.kept = [False] * n
        self.count = 1  # everything folded: one run
        self.full = False

    def _cost(self, i: int) -> int:
        """Columns added by keeping ``i`` (0 if kept already)."""
        if self.kept[i]:
            return 0
        left = i == 0 or self.kept[i - 1]
        right = i == self.n - 1 or self.kept[i + 1]
        return 2 - left - right  # a run split in two (+2), shortened (+1) or gone (0)

    def add(self, i: int) -> bool:
        """Keep ``i`` if the budget allows; True if it is kept."""
        cost = self._cost(i)
        if self.count + cost > self.limit:
            self.full = True
            return self.kept[i]
        self.kept[i] = True
        self.count += cost
        return True

    def add_window(self, i: int, window: int) -> None:
        """Keep ``i`` and up to ``window`` boundaries each side (nearest first)."""
        if not self.add(i):
            return
        for d in range(1, window + 1):
            for k in (i - d, i + d):
                if 0 <= k < self.n:
                    self.add(k)
