"""``pytest -n 2`` (pytest-xdist) with real guests: one guest per worker, each in its own
private directory, one report for the whole run, nothing left behind on Ctrl-C.

CI time on 2 cores: one -n 2 run of five testcases (two reference-7.2
boots at once, ~26 s), two runs interrupted once both guests are up (~7 s and ~13 s),
a run whose boots fail (~9 s) and one whose kernel cannot be had (~4 s): about 60 s.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rig.transport.host import processes_with_env
from tests.conftest import REPO, junit_outcomes, processes_tagged

pytest.importorskip("xdist", reason="pytest-xdist is not installed (scripts/setup.sh installs .[xdist])")

_PRIVATE_DIR = re.compile(r"path=(/\S+?/cr3rig-[^/\s]+)/gdbstub\.sock")


def _qemus(tag: str) -> dict[str, int]:
    """Private directory -> parent pid (the worker) of each live QEMU carrying ``tag``."""
    out = {}
    for line in processes_tagged_full(tag):
        pid, cmd = line
        m = _PRIVATE_DIR.search(cmd)
        if "qemu-system" in cmd and m:
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out[m.group(1)] = ppid
    return out


def _run_n2(tag: str, trace_dir: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """``pytest -n 2 testcases/test_pti_tables.py ARGS`` to completion, and its output."""
    res = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "2"),
            *("testcases/test_pti_tables.py", *args, f"--trace-dir={trace_dir}"),
        ],
        cwd=REPO,
        env=dict(os.environ, CR3RIG_TEST_TAG=tag),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return res, res.stdout + res.stderr


def processes_tagged_full(tag: str) -> list[tuple[int, str]]:
    """(pid, whole command line) of the live processes carrying ``tag``."""
    return processes_with_env("CR3RIG_TEST_TAG", tag)


def _start(tag: str, args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "2", *args],
        cwd=REPO,
        env=dict(os.environ, CR3RIG_TEST_TAG=tag),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a shell job would be
    )


def _watch_guests(child: subprocess.Popen[str], tag: str, until_two: bool) -> tuple[set[str], int]:
    """Poll (test-harness polling, not rig code) the child's QEMUs: every private
    directory seen, and the most QEMUs seen alive at once under distinct workers."""
    seen: set[str] = set()
    most = 0
    deadline = time.monotonic() + 300
    while child.poll() is None and time.monotonic() < deadline:
        now = _qemus(tag)
        seen |= set(now)
        most = max(most, len(set(now.values())))
        if until_two and most >= 2:
            break
        time.sleep(0.1)
    return seen, most


def _index_rows(index: Path) -> dict[str, tuple[str, str, str]]:
    """nodeid -> (outcome, worker, traces cell) from the report's testcase table."""
    rows = {}
    for m in re.finditer(r'<tr data-nodeid="([^"]+)">(.*?)</tr>', index.read_text()):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", m.group(2), re.S)
        rows[m.group(1)] = (cells[1], cells[4], cells[5])
    return rows


def test_two_workers_one_guest_each_one_report(tag: str, tmp_path: Path) -> None:
    results = tmp_path / "results"
    xml = tmp_path / "run.xml"
    child = _start(
        tag,
        [
            "testcases/test_pti_entry.py",
            "tests/cases/xdist_cases.py",
            f"--trace-dir={results}",
            f"--junitxml={xml}",
            "--site-coverage=require",
        ],
    )
    try:
        dirs, most = _watch_guests(child, tag, until_two=False)
        out, _ = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    # one guest per worker, both alive at once, each in its own private directory
    assert most == 2, (most, dirs, out[-2000:])
    assert len(dirs) >= 2, dirs
    assert not [d for d in dirs if Path(d).exists()], "a QEMU private directory was left behind"
    # the deliberate failure, and the subset cannot cover every switch site: status 1
    assert child.returncode == 1, out[-3000:]
    outcomes = junit_outcomes(xml)
    assert outcomes["test_steps_a_syscall_then_fails"][0] == "failure", outcomes
    assert sum(o == "passed" for o, _, _ in outcomes.values()) == 4, outcomes
    # one report of the whole run, written by the controller
    assert sorted(p.name for p in results.glob("*.html") if "test_" not in p.name) == ["index.html"]
    rows = _index_rows(results / "index.html")
    assert len(rows) == 5, rows
    workers = {w for _, w, _ in rows.values()}
    assert workers == {"gw0", "gw1"}, rows
    failed = rows["tests/cases/xdist_cases.py::test_steps_a_syscall_then_fails"]
    assert failed[0] == "failed", failed
    traces = re.findall(r'href="([^"]+\.html)"', failed[2])
    assert traces and all((results / t).is_file() for t in traces), (failed, list(results.iterdir()))
    # the coverage table is the union of both workers' testcases
    coverage = (results / "site-coverage.md").read_text()
    by_worker = {w: [n.rsplit("::", 1)[1] for n, r in rows.items() if r[1] == w] for w in workers}
    for w, names in by_worker.items():
        assert any(f"`{n}`" in coverage for n in names), (w, names, coverage)
    # --site-coverage require judged the union: the sites it names are exactly those no
    # worker executed, and the line is printed once (by the controller)
    verdicts = [ln for ln in out.splitlines() if "reachable CR3 switch site(s) executed by no testcase" in ln]
    assert len(verdicts) == 1, out[-3000:]
    sites = {ln.split("`")[1]: ln for ln in coverage.splitlines() if ln.startswith("| `")}
    not_executed = {site for site, ln in sites.items() if "**NOT EXECUTED**" in ln}
    named = set(verdicts[0].split("no testcase: ", 1)[1].split(", "))
    assert named == not_executed, (named, not_executed)
    assert len(not_executed) < len(sites), coverage


@pytest.mark.parametrize("how", ["ctrl-c", "sigint-to-controller"])
def test_interrupt_under_xdist_leaves_nothing(tag: str, how: str) -> None:
    """Ctrl-C in a terminal (SIGINT to the whole process group) and a SIGINT to the
    controller alone, once both workers' guests run: no QEMU, GDB or worker survives,
    and no private directory is left."""
    child = _start(tag, ["testcases/"])
    try:
        dirs, most = _watch_guests(child, tag, until_two=True)
        assert most == 2, (most, dirs)
        if how == "ctrl-c":
            os.killpg(child.pid, signal.SIGINT)
        else:
            child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == 2, out[-2000:]
    assert "KeyboardInterrupt" in out, out[-2000:]
    assert not processes_tagged(tag)
    assert not [d for d in dirs if Path(d).exists()], "a QEMU private directory was left behind"


def test_default_configuration_that_cannot_boot_ends_the_run(tag: str, tmp_path: Path) -> None:
    """Both workers fail their boots (1 s is too short: the kernel is still before init,
    so each boots it once more); each errors that test and stops, the controller ends
    the run with status 3 and the one line, as without xdist."""
    res, out = _run_n2(tag, tmp_path, "--boot-timeout", "1")
    assert res.returncode == 3, out[-2000:]
    assert re.search(
        r"Interrupted: cr3rig: .* did not boot: no boot within 1 s: the kernel still at SYSTEM_\w+ "
        r"\[both boots faulted\] \(the default configuration cannot boot\)",
        out,
    ), out[-2000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("ERROR testcases/")]
    assert 1 <= len(errors) <= 2, out[-2000:]  # the first test of each worker, not all seven
    assert "passed" not in out.splitlines()[-1], out[-500:]


def test_workers_share_boot_failures(tmp_path: Path) -> None:
    """A configuration that failed on gw0 is not booted by gw1: it errors at once with
    gw0's line and says where it failed."""
    from rig.errors import GuestError
    from rig.guest import GuestConfig
    from rig.pytestplugin.failfast import BootFailed, BootFailures

    config = GuestConfig(Path("bzImage"), Path("initrd"), append="quiet")
    gw0, gw1 = BootFailures(tmp_path, "gw0"), BootFailures(tmp_path, "gw1")
    gw1.check(config)  # nothing failed yet
    gw0.remember(config, GuestError("bzImage did not boot: no boot within 1 s"))
    with pytest.raises(
        BootFailed, match=r"no boot within 1 s \[not booted again: .* failed earlier on gw0\]"
    ) as e:
        gw1.check(config)
    assert e.value.remembered
    BootFailures(tmp_path, "gw1").check(GuestConfig(Path("bzImage"), Path("initrd")))  # another config boots


def test_site_coverage_travels_and_merges() -> None:
    """A worker's coverage survives the trip to the controller; two workers' coverage
    merge into their union."""
    from rig.machine.sites import Site
    from rig.observe.coverage import SiteCoverage
    from rig.pytestplugin.distributed import coverage_from_wire, coverage_to_wire, merge_coverage

    sites = [
        Site(0x1000, "cr3-write", "entry_SYSCALL_64", "entry_SYSCALL_64+0x23", "mov %rsp,%cr3"),
        Site(0x2000, "signal-store", "entry_SYSCALL_64", "entry_SYSCALL_64+0x1a", "movl $0x1,%gs:0x0", 1),
    ]
    a = SiteCoverage("k", sites, True, pti=False)
    b = SiteCoverage("k", sites, True, pti=True)
    a.record("t1", [0x1000])
    b.record("t2", [0x2000, 0x1000])
    back = coverage_from_wire(coverage_to_wire(a))
    assert back.sites == a.sites and back.executed_by == a.executed_by and back.pti is False
    merged = merge_coverage(back, coverage_from_wire(coverage_to_wire(b)))
    assert merged.executed_by == {0x1000: ["t1", "t2"], 0x2000: ["t2"]}
    assert merged.pti and merged.missing() == []


def test_a_kernel_that_cannot_be_had_ends_the_run_with_status_4(tag: str, tmp_path: Path) -> None:
    """What ends a run without xdist with pytest.exit (here: an unknown reference flavor,
    found when the workers resolve the kernel) ends it the same way under xdist, with no
    INTERNALERROR from xdist's controller."""
    res, out = _run_n2(tag, tmp_path, "--kernel", "reference-9.9")
    assert res.returncode == 4, out[-2000:]
    assert "INTERNALERROR" not in out, out[-2000:]
    assert "Interrupted: cr3rig: unknown kernel flavor 'reference-9.9'; valid flavors:" in out, out[-2000:]


def test_the_tests_of_a_command_line_run_on_one_worker(tag: str) -> None:
    """Under ``-n 2`` the tests of each kernel command line other than the default are
    one unit of work: one worker runs them all and boots that command line once.
    (xdist's ``load`` sent them to both workers, and each booted it.)"""
    res = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-n", "2"),
            "testcases/test_cr3_signal_off.py",
        ],
        cwd=REPO,
        env=dict(os.environ, CR3RIG_TEST_TAG=tag),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    ran = re.findall(r"\[(gw\d)\] \[ *\d+%\] PASSED \S+\[(?:[^\]]*-)?(gate-off|pti-off)\]", out)
    assert len(ran) == 8, out[-3000:]
    workers = {group: {w for w, g in ran if g == group} for group in ("gate-off", "pti-off")}
    assert all(len(w) == 1 for w in workers.values()), f"a command line's tests ran on two workers: {workers}"
    assert "scheduling tests via CmdlineScheduling" in out, out[-3000:]
