"""An NMI at every instruction boundary of every CR3 switch window (rig.observe.exploration).

For each window the path is scouted by single-stepping, then for each boundary k an NMI
is made pending at k and the vCPU runs at full speed from switch site to switch site
(every CR3 write and signal store of the kernel is a breakpoint) until it is back in
user mode. The signal must be 1 whenever a CR3 write loads the kernel CR3 and while
the NMI handler runs, 0 when an exit loads the user CR3, and the NMI must leave it as
it found it. NMIs reach vCPU 0 only (QMP inject-nmi: LINT1 is masked on the other
vCPUs), so the windows run on vCPU 0: in the default boot a housekeeping CPU, and in a
second boot (``nohz_full=0``) the isolated CPU itself. A default run explores a
deterministic sample of each window's boundaries on vCPU 0 of the default boot (boundary
0, the race window from 2 before the signal store to 3 past the CR3 write, and every
4th boundary of the rest), and on the isolated vCPU five of the windows, each at
boundary 0 and its race window; ``--explore all`` explores every boundary of every
window on both.
"""

from __future__ import annotations

import pytest

from rig.guest import Guest
from rig.machine.sites import SIGNAL
from rig.observe.coverage import SiteCoverage
from rig.observe.exploration import explore
from rig.observe.findings import fail_on
from rig.observe.windows import SAMPLE_EVERY, Window
from rig.pytestplugin.settings import RigSettings, missing_on_reference
from rig.transport.qemu import NMI_CPU

WINDOWS = (
    Window("syscall-entry", "syscall-loop", ("entry_SYSCALL_64",), "entry"),
    # exits from the last C return (do_syscall_64's) to user mode
    Window(
        "sysret-exit",
        "syscall-loop",
        ("entry_SYSCALL_64",),
        "exit",
        from_user=False,
        after_call_to="do_syscall_64",
    ),
    Window(
        "iret-exit",
        "iret-loop",
        ("entry_SYSCALL_64",),
        "exit",
        from_user=False,
        after_call_to="do_syscall_64",
    ),
    Window("page-fault-entry", "fault-loop", ("asm_exc_page_fault",), "entry"),
    # timer-spin's CPU-time timer keeps its CPU's tick running, even on a nohz_full CPU: a
    # timer interrupt from user mode every 4 ms. The local timer's entry only: the arrivals
    # come back to the scout's entry, and a scout of a rarer vector (a reschedule IPI, seen
    # once under QEMU 10) left them waiting; every system vector's stub runs the same
    # error_entry path (the watch modes see them all)
    Window("interrupt-entry", "timer-spin", ("asm_sysvec_apic_timer_interrupt",), "entry"),
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
        ("entry_SYSCALL_compat",),
        "exit",
        from_user=False,
        after_call_to="do_fast_syscall_32",
    ),
)


#: The windows explored on the isolated vCPU in a default (sampled) run; ``--explore all``
#: explores every window there too.
ISOLATED_SAMPLE = ("syscall-entry", "sysret-exit", "interrupt-entry", "nmi-entry", "debug-trap-entry")
#: The sample of their boundaries there: boundary 0 and the race window (the rest of each
#: path is sampled on vCPU 0; ``--explore all`` explores all of it on both).
ISOLATED_STRIDE = 0

#: The boot whose isolated (nohz_full) CPU is vCPU 0, the one QMP's NMIs reach: LINT1,
#: which ``inject-nmi`` raises, is masked on the other vCPUs.
ISOLATED_VCPU0 = "nohz_full=0 isolcpus=nohz,domain,0"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.function.__name__ == "test_nmi_at_every_boundary_of_the_isolated_vcpu":
        every = metafunc.config.getoption("explore") == "all"
        chosen = [w for w in WINDOWS if every or w.name in ISOLATED_SAMPLE]
        metafunc.parametrize("window", chosen, ids=[w.name for w in chosen])


def explore_window(
    g: Guest,
    site_coverage: SiteCoverage | None,
    exploration_report: list[str],
    window: Window,
    request: pytest.FixtureRequest,
    rig_settings: RigSettings,
    *,
    stride: int = SAMPLE_EVERY,
) -> None:
    if not g.config.vmlinux or site_coverage is None:
        missing_on_reference(
            rig_settings, "exploration needs the kernel's vmlinux (--vmlinux) to find its CR3 switch sites"
        )
    assert site_coverage is not None
    g.start_workload(window.workload, NMI_CPU)
    result = explore(
        g, site_coverage.sites, window, signal=SIGNAL, every=rig_settings.explore == "all", stride=stride
    )
    site_coverage.record(request.node.nodeid, result.executed())
    exploration_report.append(result.table())
    fail_on(result.problems(), result.table())


@pytest.mark.parametrize("window", WINDOWS, ids=[w.name for w in WINDOWS])
def test_nmi_at_every_boundary(
    signal_guest: Guest,
    site_coverage: SiteCoverage | None,
    exploration_report: list[str],
    window: Window,
    request: pytest.FixtureRequest,
    rig_settings: RigSettings,
) -> None:
    """vCPU 0 of the default boot (a housekeeping CPU; the isolated one is the last)."""
    explore_window(signal_guest, site_coverage, exploration_report, window, request, rig_settings)


@pytest.mark.cmdline(ISOLATED_VCPU0)
def test_nmi_at_every_boundary_of_the_isolated_vcpu(
    signal_guest: Guest,
    site_coverage: SiteCoverage | None,
    exploration_report: list[str],
    window: Window,
    request: pytest.FixtureRequest,
    rig_settings: RigSettings,
) -> None:
    """The same on a boot whose nohz_full, isolated CPU is vCPU 0 (the CPU the signal
    exists for takes the NMIs)."""
    g = signal_guest
    nohz, _ = g.shell("cat /sys/devices/system/cpu/nohz_full")
    assert nohz.strip() == "0", (
        f"booted with {ISOLATED_VCPU0}, the kernel reports nohz_full={nohz.strip()!r}: "
        "vCPU 0 is not the isolated (nohz_full) CPU"
    )
    explore_window(
        g, site_coverage, exploration_report, window, request, rig_settings, stride=ISOLATED_STRIDE
    )
