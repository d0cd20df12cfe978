"""The reports as a person sees them: a real pytest session against Debian's stock kernel
fails a test at a known step; its timeline and the session report open in headless
chromium; the JUnit XML of the same run carries the provenance.

The failing test is made for this purpose: it steps a real SYSCALL entry and fails
naming the first boundary on the kernel CR3, so the violation marker must sit exactly
on the column where the stepping vCPU's CR3 lane turns from user to kernel.
Screenshots go to ``results/browser/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rig.report.provenance import FIELDS
from tests.conftest import REPO, processes_tagged
from tests.webdriver import Browser, missing

pytestmark = pytest.mark.boots

STAGED = """
from rig.machine.stops import on_kernel_tables
from rig.machine.trace import WatchedWord
from rig.observe.findings import Finding, Rule, fail_on


def test_fails_at_the_first_kernel_cr3_boundary(guest):
    cpu = guest.config.isolated
    guest.start_workload("syscall-loop", cpu)
    tss = WatchedWord("tss_sp0", guest.per_cpu("cpu_tss_rw", cpu) + 4, 8)
    for _ in range(20):
        guest.break_on(guest.symbols.address("entry_SYSCALL_64"), cpu)
        trace = guest.step(cpu, words=[tss], max_steps=40, stop=on_kernel_tables(cpu))
        if trace.snapshots[0].user_tables(cpu) and not trace.snapshots[-1].user_tables(cpu):
            break
        guest.traces.pop()
    first_kernel = trace.snapshots[-1].step
    text = "deliberate failure at the first kernel-CR3 boundary"
    fail_on([Finding(Rule.CR3_SWITCH, text, first_kernel, cpu)])


def test_passes_without_a_guest():
    pass
"""


@dataclass(frozen=True)
class Run:
    results: Path
    junit: Path
    output: str


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    work = tmp_path_factory.mktemp("report-run")
    (work / "test_staged.py").write_text(STAGED)
    results = work / "results"
    junit = work / "junit.xml"
    tag = uuid.uuid4().hex
    env = dict(os.environ, CR3RIG_TEST_TAG=tag, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(work),
            "--kernel", "debian", "--trace-dir", str(results), f"--junitxml={junit}",
            str(work / "test_staged.py"),
        ],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, (
        f"expected exactly the staged failure; exit {proc.returncode}:\n{out[-3000:]}"
    )
    left = processes_tagged(tag)
    assert not left, f"processes left behind: {left}"
    return Run(results, junit, out)


def test_junit_carries_provenance_for_every_testcase(run: Run) -> None:
    cases = ET.parse(run.junit).getroot().iter("testcase")
    seen = 0
    for case in cases:
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        assert set(FIELDS) <= set(props), f"{case.get('name')}: properties {sorted(props)}"
        assert props["kernel_release"] and props["kernel_build_id"], props
        assert props["qemu_version"].startswith("QEMU emulator version"), props
        assert props["accel"] == "tcg" and props["cpu_model"] == "max", props
        assert "pti=on" in props["kernel_cmdline"], props
        seen += 1
    assert seen == 2


def _timeline(run: Run) -> Path:
    pages = sorted(run.results.glob("*test_fails_at_the_first_kernel_cr3_boundary*.html"))
    assert pages, f"no timeline in {run.results}: {sorted(p.name for p in run.results.iterdir())}"
    return pages[-1]


def _first_kernel_step(timeline: Path) -> int:
    rows = [json.loads(line) for line in timeline.with_suffix(".jsonl").read_text().splitlines()]
    cpu = rows[0]["cpu"]
    return next(r["step"] for r in rows if not int(r["cr3"][cpu], 16) & (1 << 12))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    why = missing()
    if why:
        pytest.skip(why)
    with Browser(tmp_path / "chromium-profile") as b:
        yield b
    assert not _processes_with(str(tmp_path / "chromium-profile")), "chromium survived the test"


def _processes_with(needle: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmd:
                found.append(cmd[:120])
    return found


_GEOMETRY = """
const step = arguments[0], cpu = arguments[1];
const center = el => { const r = el.getBoundingClientRect(); return r.left + r.width / 2; };
const col = s => document.querySelector(`rect.col[data-step="${s}"]`);
const lane = document.querySelector(`g.lane[data-lane="cr3-cpu${cpu}"]`);
const valueAt = s => {
  const c = col(s), lr = lane.getBoundingClientRect();
  c.scrollIntoView({inline: "center"});
  const x = center(c), y = lr.top + lr.height / 2;
  const hit = document.elementsFromPoint(x, y).find(e => e.closest('g.lane'));
  return hit ? hit.getAttribute('data-value') : null;
};
const marker = document.querySelector('g.marker-violation');
marker.scrollIntoView({inline: "center"});
const line = marker.querySelector('line');
return {
  lanes: [...document.querySelectorAll('text.lane-label')]
    .filter(t => t.getBBox().width > 0).map(t => t.textContent),
  markerStep: marker && Number(marker.dataset.step),
  markerX: center(line),
  columnX: center(col(step)),
  before: valueAt(step - 1),
  at: valueAt(step),
  hoverBefore: col(step - 1).querySelector('title').textContent,
  banner: document.getElementById('violation').innerText,
  scripts: document.scripts.length,
};
"""


def test_timeline_in_chromium(run: Run, browser: Browser) -> None:
    page = _timeline(run)
    step = _first_kernel_step(page)
    browser.open(page.as_uri())
    seen = browser.js(_GEOMETRY, step, 1)
    browser.js("document.querySelector('g.marker-violation').scrollIntoView({inline: 'center'});")
    shot = browser.screenshot(REPO / "results" / "browser" / "timeline.png")
    assert {"vCPU 0 CR3", "vCPU 1 CR3 (steps)", "tss_sp0 @ vCPU 0", "tss_sp0 @ vCPU 1", "vCPU 1 at"} <= set(
        seen["lanes"]
    ), seen["lanes"]
    assert seen["markerStep"] == step, seen
    assert abs(seen["markerX"] - seen["columnX"]) < 1, seen
    assert seen["before"].startswith("user 0x") and seen["at"].startswith("kernel 0x"), seen
    assert "%cr3" in seen["hoverBefore"] and "entry_SYSCALL_64" in seen["hoverBefore"], seen["hoverBefore"]
    assert f"step {step}" in seen["banner"], seen["banner"]
    assert seen["scripts"] == 0
    assert shot.stat().st_size > 10_000


def test_session_report_in_chromium(run: Run, browser: Browser) -> None:
    index = run.results / "index.html"
    assert f"cr3rig: session report {index}" in run.output
    browser.open(index.as_uri())
    seen = browser.js(
        """
        const rows = [...document.querySelectorAll('#tests tr[data-nodeid]')];
        return {
          outcomes: Object.fromEntries(rows.map(r => [r.dataset.nodeid.split('::').pop(),
                                                      r.children[1].innerText])),
          links: [...document.querySelectorAll('#tests a.timeline, #tests a.jsonl')].map(a => a.href),
          release: document.querySelector('[data-field="kernel_release"]').innerText,
          qemu: document.querySelector('[data-field="qemu_version"]').innerText,
        };
        """
    )
    browser.screenshot(REPO / "results" / "browser" / "index.png")
    assert seen["outcomes"] == {
        "test_fails_at_the_first_kernel_cr3_boundary": "failed",
        "test_passes_without_a_guest": "passed",
    }, seen
    assert seen["release"] and seen["qemu"].startswith("QEMU"), seen
    assert len(seen["links"]) == 2, seen["links"]
    for href in seen["links"]:
        browser.open(href)
        got = browser.js(
            "return {svg: !!document.querySelector('svg.timeline'),"
            " text: document.body.innerText.slice(0, 40)}"
        )
        if href.endswith(".html"):
            assert got["svg"], f"{href} shows no timeline: {got}"
        else:
            assert got["text"].startswith('{"step": 0'), f"{href}: {got}"
