"""The signal where it must stay off: with the housekeeping gate off (booted without
nohz_full/isolcpus) or with PTI off (``nopti``, with isolation), no signal store may run
and every CPU's copy must read 1, the answer that never lets a remote CPU skip a flush.

* stepped: a 64-bit and a 32-bit system call and a page fault, every copy read through
  every vCPU at every instruction boundary, entry to user mode;
* watched (rig.observe.offwatch): every signal store site is a breakpoint, and so are the
  entries of system calls, page faults, NMIs (from user and in kernel mode) and #DBs
  (from user and in kernel mode, through paranoid_entry); at each stop every copy is read.
"""

from __future__ import annotations

import pytest

from rig.guest import Guest
from rig.machine.sites import SIGNAL
from rig.machine.stops import AnyOf, Spinning, in_user_mode
from rig.machine.trace import WatchedWord
from rig.observe.checks import frozen_violations
from rig.observe.coverage import SiteCoverage
from rig.observe.findings import Finding, Rule, SkipKind, fail_on
from rig.observe.offwatch import watch_off
from rig.pytestplugin.caseoptions import note_skip
from rig.pytestplugin.settings import RigSettings, missing_on_reference

#: The two ways the signal is off: the gate (no isolation), and PTI (isolation on).
OFF = [
    pytest.param("gate-off", marks=pytest.mark.cmdline("", isolate=False), id="gate-off"),
    pytest.param("pti-off", marks=pytest.mark.cmdline("nopti"), id="pti-off"),
]

#: Steps a stepped path may take back to user mode. The exception is read-fault-loop's:
#: a read fault maps the zero page (~1,000 steps). A write fault into a fresh part of a
#: mapping zeroes up to 4 pages (page tables and the data page), each a ``rep stosb`` of
#: 4,096 single steps in clear_page_erms (fault-loop on reference-6.1: 15,568 steps).
MAX_STEPS = 40000
#: Tries of a stepped path; a try that spins or runs out of steps is judged, then
#: discarded with its reason.
STEP_TRIES = 3

#: Workload -> the entry its stepped path starts at.
STEPPED = {
    "syscall-loop": "entry_SYSCALL_64",
    "compat-syscall-loop": "entry_SYSCALL_compat",
    "read-fault-loop": "asm_exc_page_fault",
}

#: Phases of the watched run: workload of each vCPU, and the events each must show.
PHASES = (
    (
        ("syscall-loop", "compat-sysenter-tf-loop"),
        (
            "64-bit syscall",
            "32-bit sysenter",
            "NMI in kernel mode",
            "#DB from user",
            "#DB in kernel mode",
            "paranoid entry",
        ),
    ),
    # vCPU 0 (where QMP's NMIs land) spins in user mode: an NMI from user
    (("user-spin", "compat-syscall-loop"), ("32-bit syscall", "NMI from user")),
    (("user-spin", "fault-loop"), ("page fault from user",)),
)


def off_guest(guest: Guest, rig_settings: RigSettings, off: str, node: pytest.Item) -> Guest:
    if SIGNAL not in guest.symbols:
        note_skip(node, SkipKind.NO_SIGNAL)
        missing_on_reference(
            rig_settings,
            f"kernel {guest.release} lacks {SIGNAL} (CONFIG_TRACK_CR3, the CR3-signal patch); "
            f"symbols from {guest.symbols.source}",
        )
    cmdline = guest.config.cmdline()
    if off == "gate-off":
        assert "nohz_full" not in cmdline and "isolcpus" not in cmdline, cmdline
    else:
        assert "nopti" in cmdline.split() and "nohz_full" in cmdline, cmdline
        assert not guest.pti_enabled, f"booted with nopti, yet PTI is on ({cmdline})"
    return guest


@pytest.mark.parametrize("off", OFF)
@pytest.mark.parametrize("workload", list(STEPPED))
def test_signal_stays_1_over_a_stepped_path(
    guest: Guest, rig_settings: RigSettings, off: str, workload: str, request: pytest.FixtureRequest
) -> None:
    g = off_guest(guest, rig_settings, off, request.node)
    cpu = g.config.isolated
    g.start_workload(workload, cpu)
    words = [WatchedWord(f"{SIGNAL}[{n}]", g.per_cpu(SIGNAL, n), 4) for n in range(g.config.smp)]
    why = ""
    for attempt in range(1, STEP_TRIES + 1):
        g.break_on(g.symbols.address(STEPPED[workload]), cpu)
        # a path that spins on what a frozen vCPU holds (a spinlock: the gate-off boot
        # does not isolate the CPU) never gets back: given up early, judged, tried again
        spin = Spinning(cpu)
        trace = g.step(cpu, words=words, max_steps=MAX_STEPS, stop=AnyOf((in_user_mode(cpu), spin)))
        findings = [
            Finding(
                Rule.SIGNAL_WRITTEN_WHILE_OFF,
                f"step {s.step} at {s.where}: CPU {n}'s copy reads {s.words[w.name][r]} through vCPU {r}",
                s.step,
                cpu,
                s.where,
            )
            for s in trace.snapshots
            for n, w in enumerate(words)
            for r in range(g.config.smp)
            if s.words[w.name][r] != 1
        ]
        fail_on(
            findings + frozen_violations(trace),
            f"{off}: {workload} from {STEPPED[workload]}, try {attempt}, {len(trace.snapshots)} boundaries",
        )
        if spin.spun_at is None and trace.stopped_because == "condition":
            return
        last = trace.snapshots[-1]
        why = (
            f"spun at {last.where or hex(last.pc)} ({spin.window} steps on at most {spin.distinct} rips: "
            "waiting for a frozen vCPU?)"
            if spin.spun_at is not None
            else f"stopped by {trace.stopped_because} at {last.where or hex(last.pc)}"
        )
        g.effort.discarded.append(
            f"{STEPPED[workload]}: {len(trace.snapshots) - 1} steps judged, no findings; {why}"
        )
        g.traces.pop()
    raise AssertionError(f"{STEP_TRIES} tries of {workload} did not get back to user mode (last: {why})")


@pytest.mark.parametrize("off", OFF)
def test_signal_stays_1_through_events(
    guest: Guest,
    rig_settings: RigSettings,
    site_coverage: SiteCoverage | None,
    exploration_report: list[str],
    off: str,
    request: pytest.FixtureRequest,
) -> None:
    g = off_guest(guest, rig_settings, off, request.node)
    if site_coverage is None or not site_coverage.sites:
        missing_on_reference(
            rig_settings, "a list of CR3 switch sites", "needs the kernel's vmlinux (--vmlinux)"
        )
    assert site_coverage is not None
    findings: list[Finding] = []
    tables = []
    for workloads, required in PHASES:
        pids = [g.start_workload(w, n) for n, w in enumerate(workloads)]
        result = watch_off(g, site_coverage.sites, signal=SIGNAL, required=required, max_seconds=20)
        tables.append(result.table())
        findings += result.findings
        for pid in pids:
            g.stop_workload(pid)
    exploration_report.append(f"{off}:\n" + "\n".join(tables))
    fail_on(findings, "\n".join(tables))
