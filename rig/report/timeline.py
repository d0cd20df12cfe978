"""A step trace as one self-contained HTML page: an inline-SVG timeline, no scripts, no network.

x is the instruction boundary (the step). Lanes, top to bottom:

* ``vCPU n CR3``: which page tables vCPU ``n`` has loaded (PTI user or kernel);
* ``<word> @ vCPU n``: each watched word as vCPU ``n`` reads it through its own tables;
* ``vCPU k at``: the function the stepping vCPU ``k`` is in.

Markers: CR3 writes, stores that change a watched word, entries into an exception or
interrupt vector, the caller's own :class:`~rig.observe.stepping.Mark` s (e.g. "NMI
injected"), and the first violation with its message. Hovering a column shows its step,
``symbol+offset``, the instruction about to execute and every vCPU's CR3 (SVG ``<title>``).

Long traces stay readable and small: boundaries far from any change (in any lane) or
marker are folded into one narrow hatched column per run; a window of
:data:`WINDOW` boundaries around every change stays at full resolution. The window
shrinks until at most :data:`MAX_COLUMNS` columns remain, which bounds the file size
(about 250 bytes a column: under 2 MB for any trace).

Hand-written SVG rather than a plotting library: the page must work offline with no
scripts, and an inlined JavaScript charting library (Plotly, Vega) alone weighs 1-3 MB,
while the SVG here is a few hundred bytes a column and every element can carry the
``data-step`` a test (or a person with the inspector) can check.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rig.observe.stepping import Snapshot, Trace

#: Boundaries kept at full resolution on each side of a change or marker (at most).
WINDOW = 12
#: Most full-resolution columns in one timeline (the window shrinks to fit).
MAX_COLUMNS = 4000
#: Most markers drawn besides the violation (a pathological trace could have one a step).
MAX_MARKERS = 1500
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
#: A violation message names its boundary as "step N".
_STEP_IN_MESSAGE = re.compile(r"\bstep (\d+)\b")

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
    """The first line of a failure message that names a ``step N`` (else its first line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    for line in lines:
        m = _STEP_IN_MESSAGE.search(line)
        if m:
            return Violation(int(m.group(1)), line)
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
    return "user" if s.user_tables(cpu) else "kernel"


def _cr3_text(s: Snapshot, cpu: int) -> str:
    """``user 0x1234000`` / ``kernel 0x1233000``: the side, then the CR3 value."""
    return f"{_cr3_side(s, cpu)} {s.cr3[cpu]:#x}"


def _word_text(v: int | None) -> str:
    """Small values in decimal (a flag reads 0/1), large ones (addresses) in hex."""
    if v is None:
        return "unmapped"
    return str(v) if v < 0x10000 else f"{v:#x}"


def _function(s: Snapshot) -> str:
    if s.pc < 0x8000_0000_0000_0000:
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


def markers(trace: Trace, violation: Violation | None = None) -> list[Marker]:
    """CR3 writes, stores to watched words, vector entries, the trace's marks, the violation.

    A marker sits on the column of the instruction that did it (the change shows from the
    next column on); a violation sits on the boundary its message names.
    """
    snaps = trace.snapshots
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
        if nxt is not None:
            stores = []
            for name, views in s.words.items():
                seen = {
                    (views[n], nxt.words[name][n])
                    for n in range(trace.ncpus)
                    if views[n] is not None
                    and nxt.words[name][n] is not None
                    and views[n] != nxt.words[name][n]
                }
                stores += [f"{name} {a}->{b}" for a, b in sorted(seen)]
            if stores:
                out.append(Marker(s.step, "store", f"{s.where} `{s.insn}`: " + ", ".join(stores)))
        if _ENTRY_SYMBOL.match(s.where):
            out.append(Marker(s.step, "event", f"vCPU {trace.cpu} enters {s.where}"))
    for m in trace.marks:
        out.append(Marker(m.step, m.kind if m.kind in MARKER_KINDS else "event", f"{m.kind}: {m.text}"))
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


def columns(trace: Trace, lane_list: Sequence[Lane], marks: Sequence[Marker]) -> list[Column]:
    """Full-resolution columns near changes (CR3 sides, watched words) and markers,
    folded runs elsewhere.

    If even with no window more than :data:`MAX_COLUMNS` boundaries change, the busy
    stretches are drawn in chunks too (their lanes show ``mixed``); the violation, the
    events and the first and last boundary always keep a column of their own.
    """
    n = len(trace.snapshots)
    if n == 0:
        return []
    index_of = {s.step: i for i, s in enumerate(trace.snapshots)}
    hot = {0, n - 1}
    for lane in lane_list:
        if lane.key.startswith("where-"):
            continue  # the function changes all the time: it does not keep columns
        hot.update(i for i in range(1, n) if lane.values[i] != lane.values[i - 1])
    hot.update(index_of[m.step] for m in marks if m.step in index_of)
    pinned = {0, n - 1} | {
        index_of[m.step] for m in marks if m.kind in ("violation", "event") and m.step in index_of
    }
    window = WINDOW
    while True:
        keep = [False] * n
        for i in hot:
            for k in range(max(0, i - window), min(n, i + window + 1)):
                keep[k] = True
        kept = sum(keep)
        if kept <= MAX_COLUMNS or window == 0:
            break
        window //= 2
    chunk = 1 if kept <= MAX_COLUMNS else -(-kept // (MAX_COLUMNS // 2))
    out: list[Column] = []
    i = 0
    while i < n:
        j = i
        while j + 1 < n and keep[j + 1] == keep[i] and (j + 1 - i) < (chunk if keep[i] else n):
            if keep[i] and (j + 1 in pinned or i in pinned):
                break
            j += 1
        out.append(Column(i, j))
        i = j + 1
    return out


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


def render_svg(trace: Trace, violation: Violation | None = None) -> tuple[str, str, int]:
    """(labels SVG, timeline SVG, number of columns) for ``trace``."""
    lane_list = lanes(trace)
    marks = markers(trace, violation)
    cols = columns(trace, lane_list, marks)
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
    # Markers: a stem across the lanes and a glyph in the marker's own row (the violation
    # and the first MAX_MARKERS others; the table below the timeline says if any were left out).
    drawn = [m for m in marks if m.kind == "violation"] + [m for m in marks if m.kind != "violation"][
        :MAX_MARKERS
    ]
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
) -> str:
    """The whole HTML page for ``trace`` (self-contained: inline CSS and SVG, no scripts)."""
    labels, svg, ncols = render_svg(trace, violation)
    snaps = trace.snapshots
    first = snaps[0].step if snaps else 0
    last = snaps[-1].step if snaps else 0
    marks = markers(trace, violation)
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
    shown = sorted(marks, key=lambda m: (m.step, MARKER_KINDS.index(m.kind)))
    if shown:
        parts.append("<table><tr><th>step</th><th>marker</th><th>what</th></tr>")
        for m in shown[:400]:
            parts.append(
                f"<tr><td>{m.step}</td><td>{_e(_MARKER_LABEL[m.kind])}</td><td>{_e(m.text)}</td></tr>"
            )
        if len(shown) > 400:
            parts.append(f"<tr><td colspan=3>… {len(shown) - 400} more markers</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_timeline(
    trace: Trace, path: Path, *, title: str = "cr3rig step trace", violation: Violation | None = None
) -> Path:
    """Write the timeline of ``trace`` to ``path`` (``.html``); link the JSON Lines file beside it."""
    jsonl = path.with_suffix(".jsonl")
    page = render_timeline(
        trace, title=title, violation=violation, jsonl_name=jsonl.name if jsonl.exists() else None
    )
    path.write_text(page, encoding="utf-8")
    return path
