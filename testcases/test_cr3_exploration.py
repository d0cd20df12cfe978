"""An NMI at every instruction boundary of every CR3 switch window (rig.observe.exploration).

For each window the path is scouted by single-stepping, then for each boundary k an NMI
is made pending at k and the vCPU runs at full speed from switch site to switch site
(every CR3 write and signal store of the kernel is a breakpoint) until it is back in
user mode. The signal must be 1 whenever a CR3 write loads the kernel CR3 and while
the NMI handler runs, 0 when an exit loads the user CR3, and the NMI must leave it as
it found it. NMIs reach vCPU 0 only (QMP inject-nmi), so the windows run on vCPU 0.
"""

from __future__ import annotations

import pytest

from rig.guest import Guest
from rig.observe.coverage import SiteCoverage
from rig.observe.exploration import NMI_CPU, Window, explore
from rig.observe.findings import fail_on
from rig.pytestplugin.plugin import RigSettings, missing_on_reference
from testcases.conftest import INTERRUPT_ENTRIES, SIGNAL

WINDOWS = (
    Window("syscall-entry", "syscall-loop", ("entry_SYSCALL_64",), "entry"),
    Window("sysret-exit", "syscall-loop", ("syscall_return_via_sysret",), "exit", from_user=False),
    Window(
        "iret-exit", "iret-loop", ("swapgs_restore_regs_and_return_to_usermode",), "exit", from_user=False
    ),
    Window("page-fault-entry", "fault-loop", ("asm_exc_page_fault",), "entry"),
    Window("interrupt-entry", "user-spin", INTERRUPT_ENTRIES, "entry"),
    Window("nmi-entry", "user-spin", ("asm_exc_nmi",), "entry", nmi_arrival=True),
    # an IRET to user mode that faults: #GP from kernel mode on the user CR3, error_entry's
    # .Lerror_bad_iret path switches CR3
    Window("bad-iret-entry", "bad-iret-loop", ("asm_exc_general_protection",), "entry"),
    # 32-bit tasks (IA32_EMULATION); TCG's -cpu max runs both compat gates
    Window("compat-sysenter-entry", "compat-sysenter-loop", ("entry_SYSENTER_compat",), "entry"),
    Window("compat-syscall-entry", "compat-syscall-loop", ("entry_SYSCALL_compat",), "entry"),
    # a #DB in kernel mode on the user CR3 (SYSENTER with EFLAGS.TF): paranoid_entry and
    # paranoid_exit of an exception other than an NMI; NMIs nest inside it
    Window("debug-trap-entry", "compat-sysenter-tf-loop", ("asm_exc_debug",), "entry", kernel_mode_only=True),
    Window(
        "sysretl-exit",
        "compat-syscall-loop",
        ("entry_SYSRETL_compat_unsafe_stack",),
        "exit",
        from_user=False,
    ),
)


@pytest.mark.parametrize("window", WINDOWS, ids=[w.name for w in WINDOWS])
def test_nmi_at_every_boundary(
    signal_guest: Guest,
    site_coverage: SiteCoverage | None,
    exploration_report: list[str],
    window: Window,
    request: pytest.FixtureRequest,
    rig_settings: RigSettings,
) -> None:
    g = signal_guest
    if not g.config.vmlinux or site_coverage is None:
        missing_on_reference(
            rig_settings, "a list of CR3 switch sites", "exploration needs the kernel's vmlinux (--vmlinux)"
        )
    assert site_coverage is not None
    g.start_workload(window.workload, NMI_CPU)
    result = explore(g, site_coverage.sites, window, signal=SIGNAL)
    site_coverage.record(request.node.nodeid, result.executed())
    exploration_report.append(result.table())
    fail_on(result.problems(), result.table())
