"""Timelines and the session report from real Trace/Snapshot objects (no guest needed)."""

from __future__ import annotations

import re
import time
from pathlib import Path

from rig.observe.stepping import Snapshot, Trace
from rig.report.session import SessionReport, TraceFiles, add_coverage_table, render_index, write_traces
from rig.report.timeline import (
    MAX_COLUMNS,
    columns,
    lanes,
    locate,
    markers,
    violation_from_message,
    write_timeline,
)

USER = 0x1234000 | (1 << 12)
KERNEL = 0x1234000
SIGNAL = "kernel_cr3_loaded"


def syscall_like(n: int, *, late_clear: bool = False) -> Trace:
    """A 2-vCPU trace of ``n`` steps: vCPU 1 enters at step 100, stays in the kernel,
    leaves at ``n - 100``; the signal is stored just before each CR3 write (or, with
    ``late_clear``, cleared only after the exit's CR3 write: the bug the rule catches)."""
    t = Trace(cpu=1, ncpus=2)
    enter, leave = 100, n - 100
    for i in range(n + 1):
        kernel = enter <= i < leave
        signal = 1 if enter - 1 <= i < (leave + 1 if late_clear else leave - 1) else 0
        if i == enter - 2:
            insn = "movl $0x1,%gs:0x1234"
        elif i in (enter - 1, leave - 1):
            insn = "mov %rsp,%cr3"
        else:
            insn = "add $0x1,%rax"
        where = f"entry_SYSCALL_64+{i:#x}" if i < 300 else f"do_syscall_64+{i % 512:#x}"
        if i == 0:
            where = "entry_SYSCALL_64"
        t.snapshots.append(
            Snapshot(
                i,
                1,
                [0xFFFFFFFF81000000, 0xFFFFFFFF81001000 + i],
                [KERNEL, KERNEL if kernel else USER],
                {SIGNAL: [signal, signal if kernel else None]},
                insn,
                where,
            )
        )
    return t


def test_violation_is_the_first_line_naming_a_step() -> None:
    msg = (
        "did not get back\n"
        "step 812: CR3 became the user CR3 at x `mov %rdi,%cr3` with the signal still 1\nstep 9: z"
    )
    v = violation_from_message(msg)
    assert v is not None and v.step == 812 and v.message.startswith("step 812: CR3 became")
    none = violation_from_message("no CR3 flip in the trace")
    assert none is not None and none.step is None
    assert violation_from_message("") is None


def test_lanes_and_markers_of_a_round_trip() -> None:
    t = syscall_like(1000)
    t.mark(0, "event", "NMI injected")
    keys = [lane.key for lane in lanes(t)]
    assert keys == [
        "cr3-cpu0",
        "cr3-cpu1",
        f"word-{SIGNAL}-cpu0",
        f"word-{SIGNAL}-cpu1",
        "where-cpu1",
    ]
    kinds = {(m.step, m.kind) for m in markers(t)}
    assert {(98, "store"), (99, "cr3"), (898, "store"), (899, "cr3"), (0, "event")} <= kinds
    # a store seen only as "unmapped -> value" (a CR3 switch changing the view) is no store
    assert not any(m.kind == "store" and m.step in (100, 900) for m in markers(t))


def test_twenty_thousand_steps_fold_and_stay_small(tmp_path: Path) -> None:
    t = syscall_like(20000, late_clear=True)
    t.stopped_because = "condition"
    msg = "step 19901: kernel CR3 loaded, signal reads 1, and this is not the store-then-CR3-write window"
    v = violation_from_message(msg)
    start = time.monotonic()
    page = write_timeline(t, tmp_path / "t.html", title="synthetic", violation=v)
    seconds = time.monotonic() - start
    size = page.stat().st_size
    cols = columns(t, lanes(t), markers(t, v))
    text = page.read_text()
    assert size < 2_000_000, size
    assert len(cols) < 200, len(cols)  # a handful of changes: mostly folded
    full = [c for c in cols if not c.folded]
    kept = {t.snapshots[c.first].step for c in full}
    assert {97, 98, 99, 100, 101, 19898, 19899, 19900, 19901, 19902} <= kept  # switches at full resolution
    assert sum(c.last - c.first + 1 for c in cols) == len(t.snapshots)  # every boundary drawn once
    assert re.search(r'class="marker marker-violation" data-step="19901"', text)
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert seconds < 10


def test_a_trace_that_changes_everywhere_is_bounded(tmp_path: Path) -> None:
    t = syscall_like(20000)
    for s in t.snapshots:  # the sibling's view flips every step: nothing can fold
        s.words[SIGNAL][0] = s.step % 2
    cols = columns(t, lanes(t), markers(t))
    assert len(cols) <= MAX_COLUMNS + 2 * len([c for c in cols if c.folded]) + 2
    page = write_timeline(t, tmp_path / "busy.html")
    assert page.stat().st_size < 2_000_000, page.stat().st_size


def test_a_quoted_instruction_locates_a_violation_without_a_step() -> None:
    t = syscall_like(400)
    v = violation_from_message("do_syscall_64+0x12c `mov -0x10(%rax),%eax` accesses memory between")
    assert v is not None and v.step is None
    assert locate(v, t).step == 300  # the first boundary at do_syscall_64+0x12c
    unquoted = violation_from_message("nothing quoted")
    assert unquoted is not None and locate(unquoted, t).step is None


def test_an_empty_trace_still_renders(tmp_path: Path) -> None:
    page = write_timeline(Trace(cpu=0, ncpus=2), tmp_path / "empty.html")
    assert 'data-columns="0"' in page.read_text()


def test_write_traces_marks_the_last_trace(tmp_path: Path) -> None:
    traces = [syscall_like(400), syscall_like(400, late_clear=True)]
    files = write_traces(traces, tmp_path, "tc", title="tc", failure="step 301: the signal still 1")
    assert [f.jsonl.name for f in files] == ["tc.0.jsonl", "tc.1.jsonl"]
    assert 'marker-violation" data-step="301"' in files[1].html.read_text()
    assert "marker-violation" not in files[0].html.read_text()
    assert 'href="tc.1.jsonl"' in files[1].html.read_text()


def test_index_lists_tests_coverage_and_mutants(tmp_path: Path, pytestconfig: object) -> None:
    report = SessionReport()
    rec = report.record("testcases/test_x.py::test_a")
    rec.outcome, rec.duration, rec.message = "failed", 12.5, "step 3: boom"
    rec.traces.append(TraceFiles(tmp_path / "a.0.jsonl", tmp_path / "a.0.html", 40))
    report.add_provenance("testcases/test_x.py::test_a", {"kernel_label": "k", "kernel_release": "7.2.13"})
    report.record("testcases/test_x.py::test_b")
    (tmp_path / "mutants.md").write_text(
        "# Mutants (reference-7.2)\n\n| mutant | verdict |\n| --- | --- |\n| wrong-cpu | CAUGHT |\n"
    )
    report.coverage.clear()
    from rig.report.session import CoverageTable

    report.coverage.append(CoverageTable("CR3 switch sites", ({"site": "a+0x1", "covered": "no"},)))
    html = render_index(report, tmp_path, exit_status=1)
    assert 'href="a.0.html"' in html and 'href="a.0.jsonl"' in html
    assert '<td class="failed">failed</td>' in html and "12.5 s" in html
    assert '<td class="bad">no</td>' in html
    assert "<td>wrong-cpu</td><td>CAUGHT</td>" in html
    assert 'data-field="kernel_release">7.2.13<' in html


def test_add_coverage_table_reaches_the_session(pytestconfig) -> None:  # type: ignore[no-untyped-def]
    from rig.report.session import session_report

    before = len(session_report(pytestconfig).coverage)
    add_coverage_table(pytestconfig, "sites", [{"site": "x"}])
    assert len(session_report(pytestconfig).coverage) == before + 1
    session_report(pytestconfig).coverage.pop()
