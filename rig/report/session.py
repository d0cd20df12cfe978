"""The session report: ``results/index.html`` with every testcase, its traces, and what ran.

The pytest plugin feeds a :class:`SessionReport` (one per session, in ``config.stash``)
from its hooks and writes it when the session ends. Sections: provenance (one block per
distinct guest), testcases (outcome, duration, first line of the failure, links to each
trace's timeline and JSON Lines), CR3 switch-site coverage (whatever tables were handed
to :func:`add_coverage_table`), and a dated link to ``mutants.html`` if the mutant runner
wrote one in the same directory (:func:`write_mutants_page`; its table is not embedded:
it comes from another run, with its own sessions, each mutant's report in
``mutants/<name>/index.html``).

Coverage tables, from any code holding the pytest ``config`` (a fixture, a hook)::

    add_coverage_table(config, "CR3 switch sites", [
        {"site": "entry_SYSCALL_64+0x23", "direction": "user->kernel", "covered": "yes",
         "testcases": "test_signal_over_a_syscall_round_trip[syscall-loop]"},
        ...
    ])

Rows are mappings from column name to value (``str()`` is shown); the columns are the
keys in first-seen order. A cell whose text is ``no``/``not covered`` is highlighted.
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rig.machine.trace import Trace
from rig.observe.findings import Finding
from rig.report.lanes import Violation, violation_of
from rig.report.timeline import write_timeline

#: Name of the report in the results directory.
INDEX_NAME = "index.html"
#: Written by ``python -m rig.tools.mutants`` in its results directory: the table as
#: Markdown, and as a page linking each mutant's own session report.
MUTANTS_MD = "mutants.md"
MUTANTS_HTML = "mutants.html"


@dataclass(frozen=True)
class TraceFiles:
    """One trace as written beside the others: its JSON Lines and its timeline."""

    jsonl: Path
    html: Path
    steps: int


@dataclass
class TestRecord:
    """One testcase: outcome over its phases, total duration (s), why, traces, guest."""

    nodeid: str
    outcome: str = "passed"
    duration: float = 0.0
    message: str = ""
    traces: list[TraceFiles] = field(default_factory=list)
    provenance: int | None = None  # index into SessionReport.provenances
    worker: str = ""  # the pytest-xdist worker that ran it ("" without xdist)
    #: the boots that faulted before their readiness marker while this testcase waited for
    #: its guest (rig.pytestplugin.failfast.BootFault.to_json of each)
    boot_faults: list[dict[str, object]] = field(default_factory=list)


@dataclass(frozen=True)
class CoverageTable:
    title: str
    rows: tuple[Mapping[str, object], ...]


@dataclass
class SessionReport:
    """Everything ``results/index.html`` shows, collected during the session."""

    started: float = field(default_factory=time.time)
    records: dict[str, TestRecord] = field(default_factory=dict)
    provenances: list[dict[str, str]] = field(default_factory=list)
    coverage: list[CoverageTable] = field(default_factory=list)
    #: Where index.html and the traces go; None until the session resolved the rig settings
    #: (a session that never used the rig writes no report).
    directory: Path | None = None
    #: what the options said would boot (shown when no guest booted)
    planned: dict[str, str] | None = None
    #: boot faults not yet given to the testcase whose guest they were booting
    pending_boot_faults: list[dict[str, object]] = field(default_factory=list)

    def record(self, nodeid: str) -> TestRecord:
        return self.records.setdefault(nodeid, TestRecord(nodeid))

    def add_phase(self, report: pytest.TestReport, message: str = "") -> None:
        """Fold one phase report (setup/call/teardown) into its testcase's record."""
        rec = self.record(report.nodeid)
        rec.duration += report.duration
        outcome: str = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        elif report.failed and report.when != "call":
            outcome = "error"
        rank = ["passed", "xpassed", "skipped", "xfailed", "failed", "error"]
        if rank.index(outcome) > rank.index(rec.outcome):
            rec.outcome = outcome
            if message:
                rec.message = message

    def add_provenance(self, nodeid: str, prov: dict[str, str]) -> None:
        if prov not in self.provenances:
            self.provenances.append(prov)
        self.record(nodeid).provenance = self.provenances.index(prov)

    def to_wire(self) -> list[dict[str, object]]:
        """The records as plain data (what a pytest-xdist worker sends to the controller):
        one dict per testcase, its provenance inlined."""
        return [
            {
                "nodeid": r.nodeid,
                "outcome": r.outcome,
                "duration": r.duration,
                "message": r.message,
                "traces": [[str(t.jsonl), str(t.html), t.steps] for t in r.traces],
                "provenance": None if r.provenance is None else dict(self.provenances[r.provenance]),
                "boot_faults": r.boot_faults,
            }
            for r in self.records.values()
        ]

    def absorb(self, wire: Sequence[Mapping[str, object]], worker: str) -> None:
        """Fold in the records of :meth:`to_wire` from ``worker``. A testcase the controller
        already recorded from its reports keeps its outcome and duration; the worker adds
        what only it knew: the message of the failure, the traces, the guest."""
        for data in wire:
            nodeid = str(data["nodeid"])
            known = nodeid in self.records
            rec = self.record(nodeid)
            if not known:
                rec.outcome = str(data["outcome"])
                rec.duration = float(data["duration"])  # type: ignore[arg-type]
            if data["message"]:
                rec.message = str(data["message"])
            rec.worker = worker
            traces = data["traces"]
            assert isinstance(traces, list)
            rec.traces = [TraceFiles(Path(j), Path(h), int(n)) for j, h, n in traces]
            faults = data.get("boot_faults", [])
            if isinstance(faults, list) and faults:
                rec.boot_faults = [dict(f) for f in faults if isinstance(f, dict)]
            prov = data["provenance"]
            if isinstance(prov, dict):
                self.add_provenance(nodeid, {str(k): str(v) for k, v in prov.items()})


def write_traces(
    traces: Sequence[Trace],
    directory: Path,
    stem: str,
    *,
    title: str,
    failure: str = "",
    findings: Sequence[Finding] = (),
    store_sites: Mapping[int, str] | None = None,
) -> list[TraceFiles]:
    """Write each trace as ``<stem>.<n>.jsonl`` and its timeline ``<stem>.<n>.html``.

    The first of ``findings`` with a step (else the first, at the first boundary at its
    ``where``: :func:`rig.report.lanes.violation_of`) is marked as the violation on the
    last trace (the one a testcase asserts on); the other traces carry it unmarked. A
    failure without findings (an assertion, a rig error) shows the first line of
    ``failure``, unmarked. ``store_sites`` (instruction address -> the watched word it
    writes) marks those stores even when they write the same value.
    """
    directory.mkdir(parents=True, exist_ok=True)
    first_line = next((ln.strip() for ln in failure.splitlines() if ln.strip()), "")
    shown = violation_of(findings)
    unplaced = (
        Violation(None, shown.message)
        if shown is not None
        else Violation(None, first_line)
        if failure
        else None
    )
    out = []
    for n, trace in enumerate(traces):
        jsonl = directory / f"{stem}.{n}.jsonl"
        trace.write_jsonl(jsonl)
        last = n == len(traces) - 1
        page = write_timeline(
            trace,
            jsonl.with_suffix(".html"),
            title=f"{title} — trace {n}",
            violation=violation_of(findings, trace) if last and findings else unplaced,
            store_sites=store_sites,
        )
        out.append(TraceFiles(jsonl, page, len(trace.snapshots)))
    return out


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _rel(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_uri()


def _markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """The pipe tables of a Markdown text as (header, rows)."""
    tables: list[tuple[list[str], list[list[str]]]] = []
    block: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.strip().startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2 and all(re.fullmatch(r":?-+:?", c) for c in block[1]):
            tables.append((block[0], block[2:]))
        block = []
    return tables


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.2em;color:#222}
h1{font-size:1.35em} h2{font-size:1.1em;margin-top:1.4em}
table{border-collapse:collapse}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4} .mono{font-family:ui-monospace,monospace;font-size:12px}
.passed{color:#1a7f37} .failed,.error{color:#c00000;font-weight:bold} .skipped,.xfailed{color:#8a6d00}
.msg{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;max-width:60em}
td.bad{background:#fde8e8}
.flaky{color:#8a6d00;font-weight:bold}
pre.console{font-size:11px;background:#f7f7f7;padding:4px;max-height:30em;overflow:auto}
"""

_LABELS = {
    "kernel_label": "kernel",
    "kernel_release": "release",
    "kernel_build_id": "build-id",
    "kernel_config_sha256": "config SHA-256",
    "kernel_cmdline": "command line",
    "qemu_version": "QEMU",
    "accel": "accelerator",
    "cpu_model": "CPU model",
    "host": "host",
}


def render_index(report: SessionReport, directory: Path, *, exit_status: int | None = None) -> str:
    """The HTML of ``index.html`` placed in ``directory`` (links are relative to it)."""
    recs = list(report.records.values())
    counts: dict[str, int] = {}
    for r in recs:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no testcases"
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(report.started))
    p = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>cr3rig session report</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>cr3rig session report</h1>",
        f'<p id="summary">started {_e(when)}: {_e(summary)}'
        + (f"; pytest exit status {exit_status}" if exit_status is not None else "")
        + "</p>",
    ]
    p.append('<h2 id="provenance">Provenance</h2>')
    if not report.provenances:
        p.append("<p>No guest was booted in this session.</p>")
        if report.planned:
            p.append(
                '<table class="provenance" id="planned">'
                '<tr><th colspan="2">planned (from the options)</th></tr>'
            )
            for name, value in report.planned.items():
                p.append(
                    f'<tr><th>{_e(_LABELS.get(name, name))}</th><td class="mono" data-field="{_e(name)}">'
                    f"{_e(value)}</td></tr>"
                )
            p.append("</table><br>")
    for k, prov in enumerate(report.provenances):
        p.append(f'<table class="provenance" id="guest-{k}"><tr><th colspan="2">guest {k}</th></tr>')
        for name, value in prov.items():
            p.append(
                f'<tr><th>{_e(_LABELS.get(name, name))}</th><td class="mono" data-field="{_e(name)}">'
                f"{_e(value)}</td></tr>"
            )
        p.append("</table><br>")
    p.append('<h2 id="testcases">Testcases</h2>')
    workers = any(r.worker for r in recs)  # run with pytest-xdist: say which worker ran each
    p.append(
        '<table id="tests"><tr><th>testcase</th><th>outcome</th><th>duration</th><th>guest</th>'
        + ("<th>worker</th>" if workers else "")
        + "<th>traces</th><th>message</th></tr>"
    )
    for r in recs:
        links = " ".join(
            f'<a class="timeline" href="{_e(_rel(t.html, directory))}">timeline {n}</a> '
            f'(<a class="jsonl" href="{_e(_rel(t.jsonl, directory))}">{t.steps} steps, jsonl</a>)'
            for n, t in enumerate(r.traces)
        )
        guest = "" if r.provenance is None else f'<a href="#guest-{r.provenance}">{r.provenance}</a>'
        p.append(
            f'<tr data-nodeid="{_e(r.nodeid)}"><td class="mono">{_e(r.nodeid)}</td>'
            f'<td class="{_e(r.outcome)}">{_e(r.outcome)}</td><td>{r.duration:.1f} s</td><td>{guest}</td>'
            + (f'<td class="worker">{_e(r.worker)}</td>' if workers else "")
            + f'<td>{links}</td><td class="msg">{_e(r.message)}</td></tr>'
        )
    p.append("</table>")
    p += _boot_faults_section(report)
    for t in report.coverage:
        columns: list[str] = []
        for row in t.rows:
            columns += [c for c in row if c not in columns]
        p.append(f'<h2 class="coverage">{_e(t.title)}</h2><table class="coverage"><tr>')
        p += [f"<th>{_e(c)}</th>" for c in columns]
        p.append("</tr>")
        for row in t.rows:
            cells = []
            for c in columns:
                v = str(row.get(c, ""))
                bad = ' class="bad"' if v.lower() in ("no", "not covered", "uncovered") else ""
                cells.append(f"<td{bad}>{_e(v)}</td>")
            p.append("<tr>" + "".join(cells) + "</tr>")
        p.append("</table>")
    page = directory / MUTANTS_HTML
    if page.is_file():  # written by another run (the mutant runner): linked, dated, not embedded
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(page.stat().st_mtime))
        p.append('<h2 id="mutants">Mutants</h2>')
        p.append(
            f"<p>The last run of <code>python -m rig.tools.mutants</code> (written {_e(stamp)}, "
            f'not this session): <a href="{MUTANTS_HTML}">{MUTANTS_HTML}</a>.</p>'
        )
    p.append("</body></html>\n")
    return "\n".join(p)


#: Where a boot fault no testcase received is listed (the session ended during that boot).
NO_TESTCASE = "(no testcase: the session ended in this boot)"


def _fault_rows(report: SessionReport) -> list[tuple[str, dict[str, object]]]:
    """(testcase, fault) of every boot fault, in order; the ones no testcase received last."""
    rows = [(r.nodeid, f) for r in report.records.values() for f in r.boot_faults]
    return rows + [(NO_TESTCASE, f) for f in report.pending_boot_faults]


def boot_fault_summary(report: SessionReport) -> list[str]:
    """One line per boot fault of the session: flaky (the next boot of its configuration
    reached the marker) or repeated, which boot, what, where (RIP) and what came of it."""
    out = []
    for nodeid, f in _fault_rows(report):
        flaky = str(f.get("then", "")).startswith("booted again")
        rip = f"RIP {f['rip']}" if f.get("rip") else "no RIP on the console"
        out.append(
            f"{'flaky' if flaky else 'repeated'} boot fault (boot {f.get('boot')}, for {nodeid}): "
            f"{f.get('kind')}: {f.get('what')} ({rip}); {f.get('then')}"
        )
    return out


def _boot_faults_section(report: SessionReport) -> list[str]:
    """The boot faults: each with its configuration, RIP, what the other boot did and the
    console tail; a fault whose configuration booted the next time is marked flaky (an
    emulator's one-off), one that came again is not (the kernel faults on every boot)."""
    rows = _fault_rows(report)
    if not rows:
        return []
    p = [
        '<h2 id="boot-faults">Boot faults</h2>',
        "<p>Boots that faulted before the readiness marker (the kernel crashed or QEMU ended by itself); "
        "each such configuration was booted once more.</p>",
        '<table id="boot-fault-table"><tr><th>testcase</th><th>command line</th><th>boot</th><th>kind</th>'
        "<th>what</th><th>RIP</th><th>then</th><th>console tail</th></tr>",
    ]
    for nodeid, f in rows:
        then = str(f.get("then", ""))
        verdict = "flaky" if then.startswith("booted again") else "repeated"
        p.append(
            f'<tr class="boot-fault {verdict}" data-nodeid="{_e(nodeid)}">'
            f'<td class="mono">{_e(nodeid)}</td><td class="mono">{_e(f.get("cmdline", ""))}</td>'
            f"<td>{_e(f.get('boot', ''))}</td><td>{_e(f.get('kind', ''))}</td>"
            f'<td class="msg">{_e(f.get("what", ""))}</td>'
            f'<td class="mono rip">{_e(f.get("rip") or "not on the console")}</td>'
            f'<td class="{verdict}">{verdict}: {_e(then)}</td>'
            f'<td><details><summary>console</summary><pre class="console">{_e(f.get("console_tail", ""))}'
            "</pre></details></td></tr>"
        )
    p.append("</table>")
    return p


def write_index(report: SessionReport, directory: Path, *, exit_status: int | None = None) -> Path:
    """Write ``<directory>/index.html``; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / INDEX_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_index(report, directory, exit_status=exit_status), encoding="utf-8")
    tmp.replace(path)
    return path


def write_mutants_page(directory: Path, markdown: str, reports: Path) -> Path:
    """Write ``<directory>/mutants.html``: the mutant runner's tables (``markdown``, as in
    ``mutants.md``), each row's first cell (the kernel: ``reference`` or a mutant) linked to
    the session report its pytest run left in ``<reports>/<name>/index.html``."""
    heading = next((ln.lstrip("# ").strip() for ln in markdown.splitlines() if ln.startswith("#")), "Mutants")
    p = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{_e(heading)}</title>',
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(heading)}</h1>",
        f"<p>Each kernel's pytest run has its own session report (timelines of its failures) "
        f'under <a href="{_e(_rel(reports, directory))}/">{_e(_rel(reports, directory))}/</a>.</p>',
    ]
    for header, rows in _markdown_tables(markdown):
        p.append('<table class="mutants"><tr>' + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
        for md_row in rows:
            cells = [f"<td>{_e(c)}</td>" for c in md_row]
            index = reports / (md_row[0] if md_row else "") / INDEX_NAME
            if md_row and index.is_file():
                link = _e(_rel(index, directory))
                cells[0] = f'<td><a class="report" href="{link}">{_e(md_row[0])}</a></td>'
            p.append("<tr>" + "".join(cells) + "</tr>")
        p.append("</table>")
    p.append("</body></html>\n")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MUTANTS_HTML
    path.write_text("\n".join(p), encoding="utf-8")
    return path


SESSION_KEY = pytest.StashKey[SessionReport]()


def session_report(config: pytest.Config) -> SessionReport:
    """This session's report (created on first use)."""
    if SESSION_KEY not in config.stash:
        config.stash[SESSION_KEY] = SessionReport()
    return config.stash[SESSION_KEY]


def add_coverage_table(config: pytest.Config, title: str, rows: Sequence[Mapping[str, object]]) -> None:
    """Show ``rows`` (column name -> value mappings) as a table titled ``title`` in index.html."""
    session_report(config).coverage.append(CoverageTable(title, tuple(rows)))
