"""A step trace as one self-contained HTML page: an inline-SVG timeline, no scripts, no network.

x is the instruction boundary (the step). What is drawn, the lanes (CR3 side per vCPU,
each watched word per vCPU, where the stepping vCPU is), the markers (CR3 writes,
stores, entries, events, the first violation from the findings' fields) and the columns,
comes from :mod:`rig.report.lanes`. Hovering a column shows its step, ``symbol+offset``,
the instruction about to execute and every vCPU's CR3 (SVG ``<title>``).

Long traces stay readable and small. The page has at most
:data:`~rig.report.lanes.MAX_COLUMNS` columns, folds included; whatever is not given a
column folds into one narrow hatched column per run. A page still over :data:`MAX_BYTES`
(many lanes all changing) is drawn again with fewer columns, so every timeline stays
under 2 MB whatever the trace.

Hand-written SVG rather than a plotting library: the page must work offline with no
scripts, and an inlined JavaScript charting library (Plotly, Vega) alone weighs 1-3 MB,
while the SVG here is a few hundred bytes a column and every element can carry the
``data-step`` a test (or a person with the inspector) can check.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from rig.machine.trace import Trace
from rig.report.lanes import (
    MARKER_KINDS,
    MAX_COLUMNS,
    Column,
    Lane,
    Marker,
    Violation,
    columns,
    function_of,
    lanes,
    markers,
    side_of,
    word_text,
)

__all__ = ["MAX_BYTES", "MIN_COLUMNS", "render_svg", "render_timeline", "write_timeline"]

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

#: The colours of the marker kinds (:data:`~rig.report.lanes.MARKER_KINDS`) and their legend.
_MARKER_COLOR = {"violation": "#c00000", "cr3": "#7b3294", "store": "#e66101", "event": "#1a9641"}
_MARKER_LABEL = {
    "violation": "first violation",
    "cr3": "CR3 write",
    "store": "store to a watched word",
    "event": "event delivered / entry",
}
_CR3_COLOR = {"user": "#4e79a7", "kernel": "#e15759"}


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
    cr3s = "  ".join(f"vCPU {n} {v:#x} ({side_of(s, n)})" for n, v in enumerate(s.cr3))
    words = "  ".join(f"{name}=" + "/".join(word_text(v) for v in views) for name, views in s.words.items())
    if not col.folded:
        return f"step {s.step}  {s.where}\n{s.insn}\nCR3: {cr3s}" + (f"\n{words}" if words else "")
    last = snaps[col.last]
    run = snaps[col.first : col.last + 1]
    funcs = Counter(function_of(x) for x in run)
    through = ", ".join(f"{f} ({c})" for f, c in funcs.most_common(6))
    quiet = all(side_of(x, n) == side_of(s, n) for x in run for n in range(trace.ncpus)) and all(
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
        at = "" if violation.step is None else f" at step {violation.step}"
        parts.append(
            f'<div class="violation" id="violation">first violation{_e(at)}: {_e(violation.message)}</div>'
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
