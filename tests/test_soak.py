"""The soak command: its report of a real JUnit file (no guest), and one real run of two
testcases on the stock kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rig.tools.soak import RunResult, describe_run, parse_junit, summary
from tests.conftest import REPO

#: Tests that record what the cr3rig plugin records for a testcase (``cr3rig.breaks`` an
#: int, ``cr3rig.steps`` the steps of every ``Guest.step`` call, joined by commas). The
#: values are those of ``from_user`` in testcases/test_cr3_signal.py, which probes each
#: breakpoint hit with a 0-step trace before it steps.
RECORDING_TESTS = """
import pytest

KERNEL = "asm_sysvec_apic_timer_interrupt+0x0: from kernel mode, not stepped"
REJECTED = "asm_sysvec_apic_timer_interrupt+0x0: 12000 steps judged, no findings; stopped by max_steps at x"
CASES = [
    ("clean-first-try", 1, "0,3127", ""),  # probe, then the stepped trace
    ("kernel-mode-hit-first", 3, "0,57,0,3127", KERNEL),  # probe, run back to user; probe, trace
    ("accept-rejected-first", 2, "0,12000,0,3098", REJECTED),  # ran out of steps; then returned
    ("one-scout", 1, "812", ""),  # no probe (an exploration window)
    ("two-parts", 2, "0,105,45", ""),  # one path stepped in two parts: no retry
    ("no-stepping", 0, "", ""),  # a guest, but nothing stepped
]

@pytest.mark.parametrize(("breaks", "steps", "discarded"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_effort(record_property, breaks, steps, discarded):
    record_property("cr3rig.breaks", breaks)
    record_property("cr3rig.steps", steps)
    record_property("cr3rig.discarded", discarded)
"""


def test_soak_prints_verdict_steps_and_leftovers(tag: str, tmp_path: Path) -> None:
    args = ["--kernel", "debian", "-k", "test_syscall_entry_flips or test_user_tables_map_cpu_entry_area"]
    res = subprocess.run(
        [sys.executable, "-m", "rig.tools.soak", "1", "--workdir", str(tmp_path), "--", *args],
        cwd=REPO,
        env=dict(os.environ, CR3RIG_TEST_TAG=tag),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "run 1/1: PASS" in out and "2 passed, 0 failed, 0 error" in out, out
    assert "leftover processes: 0" in out, out
    row = next(ln for ln in out.splitlines() if "test_syscall_entry_flips_cr3_at_mov_to_cr3" in ln)
    fail, retries_max, retries, traces_max, max_steps, _ = row.split()[1:]
    assert (fail, retries_max, retries, traces_max) == ("0", "0", "0", "1") and int(max_steps) > 10, row
    assert (tmp_path / "run-1.xml").exists() and (tmp_path / "run-1.log").exists()


PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]


def test_soak_counts_discarded_tries_as_retries(tmp_path: Path) -> None:
    """A retry is a discarded try (with its reason), not a second trace: a clean first try
    and a path stepped in two parts print no "retried" line; the JUnit file comes from a
    real pytest run that records the plugin's properties."""
    (tmp_path / "test_effort.py").write_text(RECORDING_TESTS)
    xml = tmp_path / "run-1.xml"
    res = subprocess.run(
        [*PYTEST, "-p", "no:cr3rig", f"--junitxml={xml}", "test_effort.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    cases = {c.name.split("[")[1].rstrip("]"): c for c in parse_junit(xml)}
    assert {n: (c.breaks, c.steps) for n, c in cases.items()} == {
        "clean-first-try": (1, [0, 3127]),
        "kernel-mode-hit-first": (3, [0, 57, 0, 3127]),
        "accept-rejected-first": (2, [0, 12000, 0, 3098]),
        "one-scout": (1, [812]),
        "two-parts": (2, [0, 105, 45]),
        "no-stepping": (0, []),
    }
    assert {n: (c.traces, c.retries) for n, c in cases.items()} == {
        "clean-first-try": (1, 0),
        "kernel-mode-hit-first": (2, 1),
        "accept-rejected-first": (2, 1),
        "one-scout": (1, 0),
        "two-parts": (2, 0),
        "no-stepping": (0, 0),
    }
    run = describe_run(RunResult(1, 0, 1.0, list(cases.values()), []), 1)
    retried = [ln.split("[")[1].split("]")[0] for ln in run.splitlines() if "retried" in ln]
    assert retried == ["kernel-mode-hit-first", "accept-rejected-first"], run
    assert "steps per stepped trace [57, 3127]" in run and "steps per stepped trace [12000, 3098]" in run, run
    rows = {
        ln.split("[")[1].split("]")[0]: ln.split("]")[1].split()
        for ln in summary([RunResult(1, 0, 1.0, list(cases.values()), [])]).splitlines()
        if "test_effort[" in ln and not ln.startswith("  ")
    }
    # fail, retries max, retries, traces max, max steps/trace, max s
    assert rows["clean-first-try"][:5] == ["0", "0", "0", "1", "3127"], rows
    assert rows["two-parts"][:5] == ["0", "0", "0", "2", "105"], rows
    assert (
        "discarded by test_effort::test_effort[accept-rejected-first]: "
        "asm_sysvec_apic_timer_interrupt+0x0: 12000 steps judged" in run
    ), run
    assert rows["kernel-mode-hit-first"][:5] == ["0", "1", "1", "2", "3127"], rows
    assert rows["no-stepping"][:5] == ["0", "0", "0", "0", "0"], rows
