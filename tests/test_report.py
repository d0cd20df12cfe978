"""Timelines and the session report from real Trace/Snapshot objects (no guest needed)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from rig.machine.sites import SIGNAL
from rig.machine.trace import Snapshot, Trace
from rig.observe.findings import Finding, Rule
from rig.report.lanes import MAX_COLUMNS, Column, columns, lanes, markers, violation_of
from rig.report.provenance import FIELDS
from rig.report.session import (
    SessionReport,
    TraceFiles,
    add_coverage_table,
    render_index,
    write_mutants_page,
    write_traces,
)
from rig.report.timeline import MAX_BYTES, render_timeline, write_timeline
from rig.supply.kernelbuild import KernelBuild
from rig.tools import mutants

USER = 0x1234000 | (1 << 12)
KERNEL = 0x1234000


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


def test_violation_is_the_first_finding_with_a_step() -> None:
    """The fields decide: the first finding that has a step, whatever any text says."""
    findings = [
        Finding(Rule.INCOMPLETE, "did not get back (step 3 is only named here)"),
        Finding(Rule.USER_CR3_BEFORE_SIGNAL, "CR3 became the user CR3 with the signal still 1", 812, 1),
        Finding(Rule.CR3_SWITCH, "z", 9, 1),
    ]
    v = violation_of(findings)
    assert v is not None and v.step == 812
    assert v.message == "[user-cr3-before-signal] CR3 became the user CR3 with the signal still 1"
    none = violation_of([Finding(Rule.CR3_SWITCH, "no CR3 flip in the trace (step 5)")])
    assert none is not None and none.step is None
    assert violation_of([]) is None


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
    v = violation_of([Finding(Rule.SIGNAL_0_ON_KERNEL_CR3, msg, 19901, 1)])
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
    assert len(cols) <= MAX_COLUMNS
    page = write_timeline(t, tmp_path / "busy.html")
    assert page.stat().st_size < 2_000_000, page.stat().st_size


def _own_column(cols: list[Column], index: int) -> bool:
    return any(c.first == c.last == index for c in cols)


@pytest.mark.parametrize("period", [1, 2, 3, 5, 7, 10, 50])
def test_a_lane_changing_every_few_steps_stays_under_2mb(tmp_path: Path, period: int) -> None:
    """20,000 steps whose sibling view of the signal changes every ``period`` steps (one
    store marker and two lane changes each time): under 2 MB, and the violation and each
    CR3 switch (the write and the first boundary on the new tables) keep a column of their own."""
    t = syscall_like(20000, late_clear=True)
    for s in t.snapshots:
        s.words[SIGNAL][0] = (s.step // period) % 2
    v = violation_of([Finding(Rule.SIGNAL_0_ON_KERNEL_CR3, "kernel CR3 loaded, signal reads 1", 19901, 1)])
    cols = columns(t, lanes(t), markers(t, v))
    assert len(cols) <= MAX_COLUMNS
    assert sum(c.last - c.first + 1 for c in cols) == len(t.snapshots)
    switches = [i - 1 for i, _ in t.cr3_flips()] + [i for i, _ in t.cr3_flips()]
    assert sorted(switches) == [99, 100, 19899, 19900]
    for step in [19901, *switches]:
        assert _own_column(cols, step), step
    page = write_timeline(t, tmp_path / f"p{period}.html", violation=v)
    size = page.stat().st_size
    assert size < 2_000_000, (period, size)
    assert 'class="marker marker-violation" data-step="19901"' in page.read_text()


def test_many_lanes_all_changing_still_fit() -> None:
    """4 vCPUs and 3 watched words, every word changing every step (12 busy lanes): the
    page is drawn again with fewer columns until it is under MAX_BYTES."""
    t = Trace(cpu=3, ncpus=4)
    for i in range(20001):
        words: dict[str, list[int | None]] = {w: [(i + k) % 2 for k in range(4)] for w in ("a", "bb", "ccc")}
        t.snapshots.append(
            Snapshot(i, 3, [0xFFFFFFFF81000000 + i] * 4, [KERNEL] * 4, words, "nop", f"f+{i:#x}")
        )
    page = render_timeline(t)
    assert len(page.encode()) <= MAX_BYTES
    m = re.search(r'data-columns="(\d+)"', page)
    assert m is not None and int(m.group(1)) < MAX_COLUMNS  # it had to shrink


def test_a_store_of_the_same_value_is_marked_from_the_instruction() -> None:
    """A store is marked from the instruction (its text names the watched word, or its
    address is a known store site) even when it writes the value already there; a load
    naming the word is no store."""
    t = syscall_like(400)
    same = t.snapshots[150]  # in the kernel, the signal already 1
    same.insn = "movl $0x1,%gs:0x0(%rip)        # 0x1234 <kernel_cr3_loaded>"
    load = t.snapshots[160]
    load.insn = "mov %gs:0x0(%rip),%eax        # 0x1234 <kernel_cr3_loaded>"
    site = t.snapshots[170]
    site.insn = "movl $0x1,(%rax)"
    assert same.words[SIGNAL] == t.snapshots[151].words[SIGNAL]  # nothing changes
    plain = {m.step for m in markers(t) if m.kind == "store"}
    assert 150 in plain and 160 not in plain and 170 not in plain
    text = next(m.text for m in markers(t) if m.kind == "store" and m.step == 150)
    assert "store to kernel_cr3_loaded (value unchanged: 1/1)" in text
    with_sites = {m.step for m in markers(t, store_sites={site.pc: SIGNAL}) if m.kind == "store"}
    assert {150, 170} <= with_sites and 160 not in with_sites
    site.insn = "jmp 0x79d3"  # a site list of another build: this address holds no store
    assert 170 not in {m.step for m in markers(t, store_sites={site.pc: SIGNAL}) if m.kind == "store"}
    # a store that changes the value is marked once, with the change
    assert [m.text for m in markers(t, store_sites={t.snapshots[98].pc: SIGNAL}) if m.step == 98] == [
        f"entry_SYSCALL_64+0x62 `movl $0x1,%gs:0x1234`: {SIGNAL} 0->1"
    ]


def test_a_finding_is_marked_at_its_step(tmp_path: Path) -> None:
    flips = Finding(Rule.CR3_SWITCH, "2 kernel->user flips at steps [301, 340]", 301, 1)
    failure = f"[cr3-switch] {flips.text}"
    files = write_traces([syscall_like(400)], tmp_path, "tc", title="tc", failure=failure, findings=[flips])
    text = files[0].html.read_text()
    assert 'class="marker marker-violation" data-step="301"' in text
    assert "first violation at step 301: [cr3-switch] 2 kernel-&gt;user flips at steps [301, 340]" in text
    # a failure without findings (an assertion, a rig error) is shown, never parsed for a step
    files = write_traces([syscall_like(400)], tmp_path, "plain", title="t", failure="step 7: an assertion")
    text = files[0].html.read_text()
    assert "marker-violation" not in text and "first violation: step 7: an assertion" in text


def test_an_event_mark_draws_as_an_event_at_its_step(tmp_path: Path) -> None:
    t = syscall_like(20000)
    t.mark(12345, "event", "NMI injected on vCPU 1")
    marks = markers(t)
    assert Column(12345, 12345) in columns(t, lanes(t), marks)
    assert any(m.kind == "event" and m.step == 12345 and m.text == "NMI injected on vCPU 1" for m in marks)
    text = write_timeline(t, tmp_path / "nmi.html").read_text()
    assert re.search(r'class="marker marker-event" data-step="12345">.*?NMI injected on vCPU 1</title>', text)


def test_a_finding_without_a_step_is_placed_at_its_where() -> None:
    t = syscall_like(400)
    text = "do_syscall_64+0x12c `mov -0x10(%rax),%eax` accesses memory between"
    at = Finding(Rule.STORE_TO_WRITE_WINDOW, text, where="do_syscall_64+0x12c")
    assert violation_of([at]) == violation_of([at], None)
    placed = violation_of([at], t)
    assert placed is not None and placed.step == 300  # the first boundary at do_syscall_64+0x12c
    nowhere = violation_of([Finding(Rule.STORE_TO_WRITE_WINDOW, text)], t)
    assert nowhere is not None and nowhere.step is None  # the text is not read


def test_an_empty_trace_still_renders(tmp_path: Path) -> None:
    page = write_timeline(Trace(cpu=0, ncpus=2), tmp_path / "empty.html")
    assert 'data-columns="0"' in page.read_text()


def test_write_traces_marks_the_last_trace(tmp_path: Path) -> None:
    traces = [syscall_like(400), syscall_like(400, late_clear=True)]
    still = Finding(Rule.USER_CR3_BEFORE_SIGNAL, "step 301: the signal still 1", 301, 1)
    files = write_traces(traces, tmp_path, "tc", title="tc", failure=str(still), findings=[still])
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
    markdown = "# Mutants (reference-7.2)\n\n| mutant | verdict |\n| --- | --- |\n| wrong-cpu | CAUGHT |\n"
    (tmp_path / "mutants.md").write_text(markdown)  # another run's table: not embedded
    (tmp_path / "mutants" / "wrong-cpu").mkdir(parents=True)
    (tmp_path / "mutants" / "wrong-cpu" / "index.html").write_text("<html></html>")
    page = write_mutants_page(tmp_path, markdown, tmp_path / "mutants")
    assert '<td><a class="report" href="mutants/wrong-cpu/index.html">wrong-cpu</a></td><td>CAUGHT</td>' in (
        page.read_text()
    )
    report.coverage.clear()
    from rig.report.session import CoverageTable

    report.coverage.append(CoverageTable("CR3 switch sites", ({"site": "a+0x1", "covered": "no"},)))
    html = render_index(report, tmp_path, exit_status=1)
    assert 'href="a.0.html"' in html and 'href="a.0.jsonl"' in html
    assert '<td class="failed">failed</td>' in html and "12.5 s" in html
    assert '<td class="bad">no</td>' in html
    assert "wrong-cpu" not in html and 'href="mutants.html"' in html
    assert 'data-field="kernel_release">7.2.13<' in html


def test_add_coverage_table_reaches_the_session(pytestconfig) -> None:  # type: ignore[no-untyped-def]
    from rig.report.session import session_report

    before = len(session_report(pytestconfig).coverage)
    add_coverage_table(pytestconfig, "sites", [{"site": "x"}])
    assert len(session_report(pytestconfig).coverage) == before + 1
    session_report(pytestconfig).coverage.pop()


def test_every_junit_testcase_carries_provenance_without_a_guest(tmp_path: Path) -> None:
    """A pytest run that boots nothing (one testcase skips, one passes) still gives each
    testcase every provenance property: the kernel file's build-id (checked against
    readelf) and config hash, the command line, ``qemu --version``, accelerator, CPU, host."""
    kernel = tmp_path / "kernel" / "vmlinux"
    kernel.parent.mkdir()
    shutil.copy(sys.executable, kernel)  # an ELF with a GNU build-id, like a vmlinux
    (kernel.parent / "config").write_text("CONFIG_PAGE_TABLE_ISOLATION=y\n")
    (tmp_path / "test_tiny.py").write_text(
        "import pytest\n\ndef test_skips_first():\n    pytest.skip('wants no guest')\n\n"
        "def test_passes():\n    pass\n"
    )
    junit = tmp_path / "junit.xml"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_tiny.py",
         f"--junitxml={junit}", "--trace-dir", str(tmp_path / "results"), "--kernel", str(kernel),
         "--accel", "tcg"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    readelf = subprocess.run(
        ["readelf", "-n", str(kernel)], capture_output=True, text=True, check=True
    ).stdout
    build_id = re.search(r"Build ID: ([0-9a-f]+)", readelf)
    assert build_id is not None
    cases = ET.parse(junit).getroot().iter("testcase")
    seen = 0
    for case in cases:
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        assert set(FIELDS) <= set(props), (case.get("name"), props)
        assert props["kernel_label"] == str(kernel)
        assert props["kernel_build_id"] == build_id.group(1)
        assert props["kernel_config_sha256"] == hashlib.sha256(b"CONFIG_PAGE_TABLE_ISOLATION=y\n").hexdigest()
        assert "pti=on" in (props["kernel_cmdline"] or "")
        assert props["accel"] == "tcg" and props["cpu_model"] == "max"
        assert props["kernel_release"] == "unknown (no guest booted yet)"
        qemu = shutil.which("qemu-system-x86_64")
        if qemu is not None:
            said = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False).stdout
            assert props["qemu_version"] == said.splitlines()[0]
        seen += 1
    assert seen == 2


def test_each_mutant_run_has_its_own_trace_dir(tmp_path: Path) -> None:
    """The mutant runner's pytest gets ``--trace-dir <logs>/<name>``, so each kernel keeps
    its index.html and timelines (here pytest stops at once: the kernel file is missing)."""
    missing = tmp_path / "no-such-bzImage"
    build = KernelBuild(missing, missing, missing, "none", "0")
    lines: list[str] = []
    results, reason, _ = mutants._test("wrong-cpu", build, tmp_path, 120.0, lines.append)
    assert results is None and "without a readable JUnit report" in reason
    command = (tmp_path / "wrong-cpu.pytest.log").read_text().splitlines()[0]
    assert re.findall(r"--trace-dir (\S+)", command) == [str(tmp_path / "wrong-cpu")], command
