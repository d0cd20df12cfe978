"""A step trace as one self-contained HTML page: an inline-SVG timeline, no scripts, no network.

x is the instruction boundary (the step). Lanes, top to bottom:

* ``vCPU n CR3``: which page tables vCPU ``n`` has loaded (PTI user or kernel);
* ``<word> @ vCPU n``: each watched word as vCPU ``n`` reads it through its own tables;
* ``vCPU k at``: the function the stepping vCPU ``k`` is in.

Markers: CR3 writes; stores to a watched word (an instruction at a known store site,
e.g. the kernel's signal stores from :mod:`rig.machine.sites`, or whose destination
names the word; and any change of a word's value); entries into an exception or
interrupt vector; the trace's own :class:`~rig.machine.trace.Mark` s (kind
``"event"``, e.g. "NMI injected", draws as an event); and the first violation with its
message (``step N`` or ``at steps [N, ...]``). Hovering a column shows its step,
``symbol+offset``, the instruction about to execute and every vCPU's CR3 (SVG ``<title>``).

Long traces stay readable and small. The page has at most :data:`MAX_COLUMNS` columns,
folds included, handed out in tiers (:func:`columns`): the violation, CR3 writes and
events first, then stores, then the other lane changes, each tier first as single
columns and then widened to windows of up to :data:`WINDOW` boundaries on each side
while the budget lasts. Whatever is left folds into one narrow hatched column per run.
A page still over :data:`MAX_BYTES` (many lanes all changing) is drawn again with fewer
columns, so every timeline stays under 2 MB whatever the trace.

Hand-written SVG rather than a plotting library: the page must work offline with no
scripts, and an inlined JavaScript charting library (Plotly, Vega) alone weighs 1-3 MB,
while the SVG here is a few hundred bytes a column and every element can carry the
``data-step`` a test (or a person with the inspector) can check.
"""

from __future__ import annotations

import bisect
import html
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rig.machine.trace import Snapshot, Trace
from rig.machine.x86 import cr3_side, in_user_half

#: Boundaries kept at full resolution on each side of a change or marker (at most).
WINDOW = 12
#: Most columns in one timeline, folded runs included (see :func:`columns`).
MAX_COLUMNS = 3000
#: Most bytes in one timeline page (the columns shrink until it fits: see :func:`render_timeline`).
MAX_BYTES = 1_900_000
#: Fewest columns the shrinking goes down to.
MIN_COLUMNS = 200
#: Most markers drawn besides the violation (a pathological trace could have one a step).
MAX_MARKERS = 600
#: Width of a full-resolution column and of a folded run (px).
STEP_W = 9
FOLD_W = 30
LABEL_W = 210
#: Width (px) a short timeline is stretched towards.
FILL_WIDTH = 1150
LANE_H = 22
LANE_GAP = 4
MARK_ROW_H = 16
AXIS_H = 20

#: AT&T text of a write to CR3.
_MOV_TO_CR3 = re.compile(r"^mov\s+%\w+,%cr3\b")
#: Symbols whose first instruction is where the CPU lands when it takes an event.
_ENTRY_SYMBOL = re.compile(
    r"^(asm_exc_\w+|asm_sysvec_\w+|asm_common_interrupt|asm_spurious_\w+"
    r"|entry_SYSCALL_64|entry_SYSCALL_compat|entry_SYSENTER_\w+|entry_INT80_\w+)$"
)
#: A violation message names its boundary as "step N", or lists them "at steps [N, ...]".
_STEP_IN_MESSAGE = re.compile(r"\bstep (\d+)\b|\bsteps \[(\d+)")
#: Mnemonics (AT&T, any size suffix) whose last operand is written.
_STORE_MNEMONIC = re.compile(
    r"^(?:lock\s+)?(?:mov[bwlq]?|movabs[bwlq]?|xchg[bwlq]?|cmpxchg[bwlq]?|xadd[bwlq]?"
    r"|(?:add|sub|and|or|xor|adc|sbb|inc|dec|neg|not)[bwlq]?|set\w+)\s+(.*)$"
)

#: Marker kinds, in the order of their rows above the lanes, and their colours.
MARKER_KINDS = ("violation", "cr3", "store", "event")
_MARKER_COLOR = {"violation": "#c00000", "cr3": "#7b3294", "store": "#e66101", "event": "#1a9641"}
_MARKER_LABEL = {
    "violation": "first violation",
    "cr3": "CR3 write",
    "store": "store to a watched word",
    "event": "event delivered / entry",
}
_CR3_COLOR = {"user": "#4e79a7", "kernel": "#e15759"}


@dataclass(frozen=True)
class Violation:
    """The first broken rule: at boundary ``step`` (None: the message names none)."""

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


def violation_from_message(text: str) -> Violation | None:
    """The first line of a failure message that names a ``step N`` or lists ``steps [N, ...]``
    (the step: N, the first listed), else its first line (no step)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    for line in lines:
        m = _STEP_IN_MESSAGE.search(line)
        if m:
            return Violation(int(m.group(1) or m.group(2)), line)
    return Violation(None, lines[0])


#: ``symbol+0xoff `insn``` as the checks quote an instruction.
_WHERE_IN_MESSAGE = re.compile(r"([A-Za-z_][\w.]*(?:\+0x[0-9a-f]+)?) `")


def locate(violation: Violation, trace: Trace) -> Violation:
    """``violation`` with a step: if its message names none but quotes an instruction as
    ``symbol+0xoff `insn```, the first boundary of ``trace`` at that place."""
    if violation.step is not None:
        return violation
    for m in _WHERE_IN_MESSAGE.finditer(violation.message):
        hit = next((s.step for s in trace.snapshots if s.where == m.group(1)), None)
        if hit is not None:
            return Violation(hit, violation.message)
    return violation


def _cr3_side(s: Snapshot, cpu: int) -> str:
    return cr3_side(s.cr3[cpu])


def _cr3_text(s: Snapshot, cpu: int) -> str:
    """``user 0x1234000`` / ``kernel 0x1233000``: the side, then the CR3 value."""
    return f"{_cr3_side(s, cpu)} {s.cr3[cpu]:#x}"


def _word_text(v: int | None) -> str:
    """Small values in decimal (a flag reads 0/1), large ones (addresses) in hex."""
    if v is None:
        return "unmapped"
    return str(v) if v < 0x10000 else f"{v:#x}"


def _function(s: Snapshot) -> str:
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
            values = tuple(_word_text(s.words[name][n]) for s in snaps)
            out.append(Lane(f"word-{name}-cpu{n}", f"{name} @ vCPU {n}", values))
    out.append(Lane(f"where-cpu{trace.cpu}", f"vCPU {trace.cpu} at", tuple(_function(s) for s in snaps)))
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
        if changed or _MOV_TO_CR3.match(s.insn):
            what = "; ".join(
                f"vCPU {n} CR3 {s.cr3[n]:#x}->{nxt.cr3[n]:#x} ({_cr3_side(s, n)}->{_cr3_side(nxt, n)})"
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
            now = "/".join(_word_text(v) for v in s.words.get(target, []))
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


# --------------------------------------------------------------------------------- folding


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


# --------------------------------------------------------------------------------- drawing


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _word_color(value: str) -> str:
    if value == "0":
        return "#d9d9d9"
    if value == "1":
        return "#f28e2b"
    if value == "unmapped":
        return "#ffffff"
    if value == "mixed":
        return "#9e9e9e"
    return "#76b7b2"


def _lane_color(lane: Lane, value: str, ordinal: int) -> str:
    if lane.key.startswith("cr3-"):
        return _CR3_COLOR.get(value.split()[0], "#9e9e9e")
    if lane.key.startswith("word-"):
        return _word_color(value)
    return "#eeeeee" if ordinal % 2 == 0 else "#dddddd"


def _column_value(lane: Lane, col: Column) -> str:
    """The lane's value over a column (``mixed`` if it changes inside a busy chunk)."""
    first = lane.values[col.first]
    if col.folded and any(v != first for v in lane.values[col.first + 1 : col.last + 1]):
        return "⋯" if lane.key.startswith("where-") else "mixed"
    return first


def _column_title(trace: Trace, col: Column) -> str:
    snaps = trace.snapshots
    s = snaps[col.first]
    cr3s = "  ".join(f"vCPU {n} {v:#x} ({_cr3_side(s, n)})" for n, v in enumerate(s.cr3))
    words = "  ".join(f"{name}=" + "/".join(_word_text(v) for v in views) for name, views in s.words.items())
    if not col.folded:
        return f"step {s.step}  {s.where}\n{s.insn}\nCR3: {cr3s}" + (f"\n{words}" if words else "")
    last = snaps[col.last]
    run = snaps[col.first : col.last + 1]
    funcs = Counter(_function(x) for x in run)
    through = ", ".join(f"{f} ({c})" for f, c in funcs.most_common(6))
    quiet = all(_cr3_side(x, n) == _cr3_side(s, n) for x in run for n in range(trace.ncpus)) and all(
        x.words == s.words for x in run
    )
    why = "no lane changes, no marker" if quiet else "too many changes to draw one by one"
    return (
        f"steps {s.step}-{last.step} folded ({len(run)} boundaries): {why}\n"
        f"runs through: {through}\nCR3 at {s.step}: {cr3s}" + (f"\n{words}" if words else "")
    )


def render_svg(
    trace: Trace,
    violation: Violation | None = None,
    limit: int = MAX_COLUMNS,
    store_sites: Mapping[int, str] | None = None,
) -> tuple[str, str, int]:
    """(labels SVG, timeline SVG, number of columns) for ``trace``, in at most ``limit``
    columns (``store_sites``: see :func:`markers`)."""
    lane_list = lanes(trace)
    marks = markers(trace, violation, store_sites)
    cols = columns(trace, lane_list, marks, limit)
    natural = sum(FOLD_W if c.folded else STEP_W for c in cols)
    # Short traces are stretched to fill a typical window (at most 3x), long ones scroll.
    scale = max(1, min(3, FILL_WIDTH // max(natural, 1)))
    step_w, fold_w = STEP_W * scale, FOLD_W * scale
    widths = [fold_w if c.folded else step_w for c in cols]
    xs: list[int] = []
    x = 0
    for w in widths:
        xs.append(x)
        x += w
    width = max(x, 1)
    col_of = {}
    for k, c in enumerate(cols):
        for i in range(c.first, c.last + 1):
            col_of[trace.snapshots[i].step] = k
    top_marks = MARK_ROW_H * len(MARKER_KINDS)
    lanes_y = top_marks + AXIS_H
    height = lanes_y + len(lane_list) * (LANE_H + LANE_GAP) + 4

    def lane_y(r: int) -> int:
        return lanes_y + r * (LANE_H + LANE_GAP)

    def cx(k: int) -> float:
        return xs[k] + widths[k] / 2

    # Labels (a separate SVG that stays put while the timeline scrolls).
    lab = [f'<svg class="labels" xmlns="http://www.w3.org/2000/svg" width="{LABEL_W}" height="{height}">']
    for r, kind in enumerate(MARKER_KINDS):
        y = r * MARK_ROW_H + MARK_ROW_H - 4
        lab.append(
            f'<text x="{LABEL_W - 6}" y="{y}" text-anchor="end" class="mk" fill="{_MARKER_COLOR[kind]}">'
            f"{_e(_MARKER_LABEL[kind])}</text>"
        )
    lab.append(f'<text x="{LABEL_W - 6}" y="{top_marks + 14}" text-anchor="end" class="mk">step</text>')
    for r, lane in enumerate(lane_list):
        lab.append(
            f'<text class="lane-label" data-lane="{_e(lane.key)}" x="{LABEL_W - 6}" '
            f'y="{lane_y(r) + 15}" text-anchor="end">{_e(lane.label)}</text>'
        )
    lab.append("</svg>")

    out = [
        f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'data-columns="{len(cols)}">',
        '<defs><pattern id="fold" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="3" height="6" fill="#000" fill-opacity="0.13"/>'
        "</pattern></defs>",
    ]
    # Axis: a label every ~60 px at full resolution, "…" on folds.
    out.append('<g class="axis">')
    last_label = -1000
    for k, c in enumerate(cols):
        step = trace.snapshots[c.first].step
        if c.folded:
            n = c.last - c.first + 1
            out.append(
                f'<text x="{cx(k):.1f}" y="{top_marks + 14}" text-anchor="middle" class="fold-label">'
                f"⋯{n}</text>"
            )
            last_label = xs[k] + widths[k]
        elif xs[k] - last_label >= 60 and (step % 5 == 0 or k == 0):
            out.append(f'<text x="{xs[k]}" y="{top_marks + 14}" class="tick">{step}</text>')
            last_label = xs[k]
    out.append("</g>")
    # Lanes: one rectangle per run of equal values.
    for r, lane in enumerate(lane_list):
        y = lane_y(r)
        out.append(f'<g class="lane" data-lane="{_e(lane.key)}">')
        shown = [_column_value(lane, c) for c in cols]
        if not shown:
            out.append("</g>")
            continue
        start = 0
        ordinal = 0
        for k in range(1, len(cols) + 1):
            if k < len(cols) and shown[k] == shown[start]:
                continue
            value = shown[start]
            x0, x1 = xs[start], (xs[k] if k < len(cols) else width)
            fill = _lane_color(lane, value, ordinal)
            stroke = ' stroke="#999"' if value == "unmapped" else ""
            out.append(
                f'<rect x="{x0}" y="{y}" width="{x1 - x0}" height="{LANE_H}" fill="{fill}"{stroke} '
                f'data-value="{_e(value)}"/>'
            )
            label = next((t for t in (value, value.split()[0]) if (x1 - x0) >= 7 * len(t) + 6), "")
            if label:
                color = "#fff" if lane.key.startswith("cr3-") else "#222"
                out.append(
                    f'<text x="{(x0 + x1) / 2:.1f}" y="{y + 15}" text-anchor="middle" fill="{color}">'
                    f"{_e(label)}</text>"
                )
            start = k
            ordinal += 1
        out.append("</g>")
    # Folded runs: hatched over every lane.
    for k, c in enumerate(cols):
        if c.folded:
            out.append(
                f'<rect class="fold" x="{xs[k]}" y="{lanes_y}" width="{widths[k]}" '
                f'height="{height - lanes_y}" fill="url(#fold)"/>'
            )
    # Hover columns: the instruction and the CPU state at each boundary.
    out.append('<g class="cols">')
    for k, c in enumerate(cols):
        w = widths[k]
        step = trace.snapshots[c.first].step
        last = f' data-last="{trace.snapshots[c.last].step}"' if c.folded else ""
        out.append(
            f'<rect class="col" data-step="{step}"{last} x="{xs[k]}" y="{top_marks}" width="{w}" '
            f'height="{height - top_marks}"><title>{_e(_column_title(trace, c))}</title></rect>'
        )
    out.append("</g>")
    # Markers: a stem across the lanes and a glyph in the marker's own row. One glyph per
    # column and kind (a folded run may hold many), the most important kinds first, at
    # most MAX_MARKERS besides the violation (the table below lists them one by one).
    drawn: list[Marker] = []
    seen: set[tuple[int, str]] = set()
    for m in sorted(marks, key=lambda m: MARKER_KINDS.index(m.kind)):
        key = (col_of.get(m.step, -1), m.kind)
        if key in seen or (m.kind != "violation" and len(drawn) >= MAX_MARKERS):
            continue
        seen.add(key)
        drawn.append(m)
    for m in drawn:
        if m.step not in col_of:
            continue
        k = col_of[m.step]
        row = MARKER_KINDS.index(m.kind)
        color = _MARKER_COLOR[m.kind]
        x_mid = cx(k)
        gy = row * MARK_ROW_H + MARK_ROW_H / 2
        wide = ' stroke-width="2"' if m.kind == "violation" else ""
        glyph = (
            f'<path d="M{x_mid - 6:.1f},{gy - 6:.1f}h12l-6,12z" fill="{color}"/>'
            if m.kind == "violation"
            else f'<circle cx="{x_mid:.1f}" cy="{gy:.1f}" r="4" fill="{color}"/>'
        )
        out.append(
            f'<g class="marker marker-{m.kind}" data-step="{m.step}">'
            f'<line x1="{x_mid:.1f}" y1="{gy:.1f}" x2="{x_mid:.1f}" y2="{height}" stroke="{color}"{wide} '
            f'stroke-opacity="0.8" pointer-events="none"/>{glyph}'
            f"<title>{_e(f'step {m.step}: {m.text}')}</title></g>"
        )
    out.append("</svg>")
    return "\n".join(lab), "\n".join(out), len(cols)


_CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:1em;color:#222}
h1{font-size:1.25em;margin:0 0 .3em} .meta{color:#555;margin:.2em 0}
.violation{border-left:5px solid #c00000;background:#fde8e8;padding:.4em .7em;margin:.6em 0;
white-space:pre-wrap;font-family:ui-monospace,monospace}
.wrap{display:flex;border:1px solid #ccc} .scroll{overflow-x:auto;flex:1}
svg text{font:11px ui-monospace,monospace} .mk{font:11px system-ui,sans-serif}
.lane-label{font:12px system-ui,sans-serif} .tick,.fold-label{fill:#555}
rect.col{fill:transparent} rect.col:hover{fill:#000;fill-opacity:.08}
.legend span{display:inline-block;margin-right:1.2em} .sw{display:inline-block;width:12px;height:12px;
vertical-align:middle;margin-right:4px;border:1px solid #999}
table{border-collapse:collapse;margin-top:1em} td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;
font-family:ui-monospace,monospace;font-size:12px}
"""


def render_timeline(
    trace: Trace,
    *,
    title: str = "cr3rig step trace",
    violation: Violation | None = None,
    jsonl_name: str | None = None,
    store_sites: Mapping[int, str] | None = None,
) -> str:
    """The whole HTML page for ``trace`` (self-contained: inline CSS and SVG, no scripts),
    under :data:`MAX_BYTES`: if the page at :data:`MAX_COLUMNS` columns is larger (many
    lanes that all change), it is drawn again with a third fewer columns until it fits."""
    limit = MAX_COLUMNS
    while True:
        page = _page(trace, title, violation, jsonl_name, limit, store_sites)
        if len(page.encode()) <= MAX_BYTES or limit <= MIN_COLUMNS:
            return page
        limit = max(MIN_COLUMNS, limit * 2 // 3)


def _page(
    trace: Trace,
    title: str,
    violation: Violation | None,
    jsonl_name: str | None,
    limit: int,
    store_sites: Mapping[int, str] | None,
) -> str:
    labels, svg, ncols = render_svg(trace, violation, limit, store_sites)
    snaps = trace.snapshots
    first = snaps[0].step if snaps else 0
    last = snaps[-1].step if snaps else 0
    marks = markers(trace, violation, store_sites)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">vCPU {trace.cpu} single-stepped, {trace.ncpus} vCPUs, '
        f"boundaries {first}-{last} ({len(snaps)} snapshots), stopped: {_e(trace.stopped_because or '?')}; "
        f"{ncols} columns (runs with no change folded, hatched)"
        + (f'; raw data: <a href="{_e(jsonl_name)}">{_e(jsonl_name)}</a>' if jsonl_name else "")
        + "</p>",
    ]
    if violation is not None:
        named = violation.step is None or f"step {violation.step}" in violation.message
        where = "" if named else f"step {violation.step}: "
        parts.append(
            f'<div class="violation" id="violation">first violation: {_e(where)}{_e(violation.message)}</div>'
        )
    parts.append(
        '<p class="legend">'
        f'<span><i class="sw" style="background:{_CR3_COLOR["user"]}"></i>user page tables</span>'
        f'<span><i class="sw" style="background:{_CR3_COLOR["kernel"]}"></i>kernel page tables</span>'
        '<span><i class="sw" style="background:#f28e2b"></i>word = 1</span>'
        '<span><i class="sw" style="background:#d9d9d9"></i>word = 0</span>'
        '<span><i class="sw" style="background:#fff"></i>unmapped in that vCPU\'s tables</span>'
        "<span>hover a column for its instruction</span></p>"
    )
    parts.append(f'<div class="wrap">{labels}<div class="scroll">{svg}</div></div>')
    # the table: the 400 most important markers (violation, CR3 writes, events, stores), by step
    shown = sorted(marks, key=lambda m: (MARKER_KINDS.index(m.kind), m.step))
    if shown:
        parts.append("<table><tr><th>step</th><th>marker</th><th>what</th></tr>")
        for m in sorted(shown[:400], key=lambda m: (m.step, MARKER_KINDS.index(m.kind))):
            parts.append(
                f"<tr><td>{m.step}</td><td>{_e(_MARKER_LABEL[m.kind])}</td><td>{_e(m.text)}</td></tr>"
            )
        if len(shown) > 400:
            parts.append(f"<tr><td colspan=3>… {len(shown) - 400} more markers</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_timeline(
    trace: Trace,
    path: Path,
    *,
    title: str = "cr3rig step trace",
    violation: Violation | None = None,
    store_sites: Mapping[int, str] | None = None,
) -> Path:
    """Write the timeline of ``trace`` to ``path`` (``.html``); link the JSON Lines file beside it.
    ``store_sites``: addresses of known stores to watched words (see :func:`markers`)."""
    jsonl = path.with_suffix(".jsonl")
    page = render_timeline(
        trace,
        title=title,
        violation=violation,
        jsonl_name=jsonl.name if jsonl.exists() else None,
        store_sites=store_sites,
    )
    path.write_text(page, encoding="utf-8")
    return path
