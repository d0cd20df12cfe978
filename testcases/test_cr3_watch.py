"""Watch mode (rig.observe.watching): every CR3 switch of every vCPU, at full TCG speed.

Every CR3 write and every signal store of the kernel's entry and noinstr text (found in
the vmlinux) and ``paranoid_entry`` are breakpoints on every vCPU; the workloads run on
every vCPU, and NMIs are injected (they reach vCPU 0) every ``NMI_EVERY`` stops. At each
hit the vCPU that hit is stepped over the one instruction: a CR3 write that loads the
kernel CR3 must find the signal at 1, one that loads the user CR3 must find it at 0 (a
paranoid restore: the value its paranoid entry found), the signal changes only at a
store, and every other vCPU reads the same signal. The count per site goes to the
session's `cr3rig: explorations` section.

``--watch-transitions N`` sets how many CR3 transitions to check (default
``WATCH_TRANSITIONS``).
"""

from __future__ import annotations

from rig.guest import Guest
from rig.machine.sites import SIGNAL, Site
from rig.observe.findings import fail_on
from rig.observe.watching import watch
from rig.pytestplugin.caseoptions import CaseSettings

#: CR3 transitions (side changes) to check, across all vCPUs. The default keeps the whole
#: default `pytest testcases/` near a minute (watching checks ~100 transitions/s here);
#: --watch-transitions 10000 is the long run (about 2 minutes on 2 cores).
WATCH_TRANSITIONS = 1_000
#: Inject an NMI (vCPU 0) before every this many continues.
NMI_EVERY = 50
#: Workloads started on every vCPU (user-spin only on vCPU 0, where the injected NMIs land
#: and must find it in user mode; on the others it only burns time slices).
EVERY_CPU = (
    "syscall-loop",
    "iret-loop",
    "fault-loop",
    "bad-iret-loop",
    "compat-sysenter-loop",
    "compat-syscall-loop",
    "compat-int80-loop",
    "compat-sysenter-tf-loop",
)
CPU0_ONLY = ("user-spin",)
#: Seconds the watch may take before it fails as stuck.
MAX_SECONDS = 900.0


def test_every_cr3_transition_on_every_vcpu(
    signal_guest: Guest,
    watch_sites: tuple[Site, ...],
    exploration_report: list[str],
    case_settings: CaseSettings,
) -> None:
    g = signal_guest
    transitions = case_settings.transitions(WATCH_TRANSITIONS)
    for cpu in range(g.config.smp):
        for name in EVERY_CPU + (CPU0_ONLY if cpu == 0 else ()):
            g.start_workload(name, cpu)
    result = watch(
        g,
        watch_sites,
        signal=SIGNAL,
        transitions=transitions,
        nmi_every=NMI_EVERY,
        max_seconds=MAX_SECONDS,
    )
    exploration_report.append(result.table())
    fail_on(result.problems, result.table())
    assert result.transitions >= transitions
    assert set(result.hits_by_cpu) == set(range(g.config.smp)), (
        f"not every vCPU hit a site:\n{result.table()}"
    )
