"""Render the rig's report pages again from the files a run left behind.

A run leaves its data beside its pages: each step trace as JSON Lines
(``results/<test id>.<n>.jsonl``, one snapshot a line) next to its timeline
(``<test id>.<n>.html``), and the mutant runner's table as ``results/mutants.md`` next to
``results/mutants.html``. This tool draws those pages again from the data, e.g. after
the renderer changed, or for a trace copied from another machine::

    cr3rig report timeline results/X.0.jsonl [--out PAGE.html] [--violation-step N]
    cr3rig report mutants [--results results/]

``timeline`` writes each trace's page beside it (``--out`` for one trace elsewhere).
The JSON Lines keep every snapshot (rip and CR3 of every vCPU, the watched words as each
vCPU reads them, the instruction and where it is); the trace's own marks (an injected
NMI) and why it stopped are not in them, so the redrawn page lacks those.
``--violation-step N`` marks boundary N as the violation (the step of the failing
testcase's first finding, which its report names). ``mutants`` draws ``mutants.html`` from
``mutants.md``, linking each kernel to its session report under ``mutants/<name>/``.

The session report (``results/index.html``) is written by the pytest plugin at the end
of a session from what the session held in memory; it has no data file to redraw from.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rig.machine.trace import Snapshot, Trace
from rig.report.lanes import Violation
from rig.report.session import MUTANTS_MD, write_mutants_page
from rig.report.timeline import write_timeline

__all__ = ["ReportError", "main", "read_trace", "redraw_mutants", "redraw_timeline"]


class ReportError(Exception):
    """A data file that cannot be read or drawn; the message is one line."""


def _snapshot(line: str) -> Snapshot:
    d = json.loads(line)
    return Snapshot(
        step=int(d["step"]),
        cpu=int(d["cpu"]),
        rip=[int(v, 16) for v in d["rip"]],
        cr3=[int(v, 16) for v in d["cr3"]],
        words={name: [None if v is None else int(v) for v in values] for name, values in d["words"].items()},
        insn=str(d.get("insn", "")),
        where=str(d.get("where", "")),
    )


def read_trace(path: Path) -> Trace:
    """The trace in ``path`` (JSON Lines as :meth:`rig.machine.trace.Trace.write_jsonl`
    writes them): its snapshots, the stepping vCPU and the number of vCPUs.

    Raises:
        ReportError: the file cannot be read, holds no snapshot, or a line is not one.
    """
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except OSError as exc:
        raise ReportError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    snaps = []
    for n, line in enumerate(lines, 1):
        try:
            snaps.append(_snapshot(line))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ReportError(f"{path}:{n}: not a snapshot of a step trace ({exc})") from None
    if not snaps:
        raise ReportError(f"{path}: no snapshot in it (an empty trace)")
    return Trace(cpu=snaps[0].cpu, ncpus=len(snaps[0].rip), snapshots=snaps)


def redraw_timeline(
    jsonl: Path, out: Path | None = None, *, title: str = "", violation_step: int | None = None
) -> Path:
    """Draw the timeline of the trace in ``jsonl`` to ``out`` (default: beside it, ``.html``).
    ``violation_step``: the boundary to mark as the violation. Returns the page's path.

    Raises:
        ReportError: as :func:`read_trace`, or a ``violation_step`` the trace does not have.
    """
    trace = read_trace(jsonl)
    page = out if out is not None else jsonl.with_suffix(".html")
    violation = None
    if violation_step is not None:
        if not any(s.step == violation_step for s in trace.snapshots):
            last = trace.snapshots[-1].step
            raise ReportError(f"{jsonl}: no boundary {violation_step} in it (steps 0-{last})")
        violation = Violation(violation_step, f"the violation at step {violation_step}")
    return write_timeline(trace, page, title=title or f"cr3rig step trace {jsonl.stem}", violation=violation)


def redraw_mutants(results: Path) -> Path:
    """Draw ``<results>/mutants.html`` from ``<results>/mutants.md``; return its path.

    Raises:
        ReportError: there is no readable ``mutants.md`` in ``results``.
    """
    md = results / MUTANTS_MD
    try:
        markdown = md.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReportError(
            f"{md}: cannot read it ({exc.strerror or exc}); `cr3rig mutants` writes it"
        ) from None
    return write_mutants_page(results, markdown, results / "mutants")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cr3rig report", description=(__doc__ or "").splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True, metavar="{timeline,mutants}")
    t = sub.add_parser("timeline", help="a step trace's timeline from its JSON Lines")
    t.add_argument("traces", nargs="+", type=Path, metavar="TRACE.jsonl", help="step traces (JSON Lines)")
    t.add_argument("--out", type=Path, help="where the page goes (one trace only; default: beside it)")
    t.add_argument("--title", default="", help="the page's title (default: names the trace)")
    t.add_argument(
        "--violation-step", type=int, default=None, metavar="N", help="mark boundary N as the violation"
    )
    m = sub.add_parser("mutants", help="mutants.html from the mutant runner's mutants.md")
    m.add_argument(
        "--results", type=Path, default=Path("results"), help="the runner's results directory (results/)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``cr3rig report timeline|mutants``: print each page written; 1 if one could not be."""
    p = _parser()
    args = p.parse_args(argv)
    if args.what == "timeline" and args.out is not None and len(args.traces) > 1:
        p.error("--out takes one trace")
    try:
        if args.what == "mutants":
            print(redraw_mutants(args.results))
            return 0
        for jsonl in args.traces:
            print(redraw_timeline(jsonl, args.out, title=args.title, violation_step=args.violation_step))
    except ReportError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
