"""rig.observe.exploration: what a window's result counts as explored (no guest), a
QEMU-version difference the container matrix found (a real guest on QEMU 10), and the
way back to user mode between arrivals on an isolated vCPU (a real reference guest)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rig.guest import Guest, GuestConfig
from rig.guest.tasks import task_names
from rig.machine.sites import find_sites
from rig.machine.trace import Snapshot, Trace
from rig.machine.vcpu import thread_id
from rig.machine.x86 import user_cr3
from rig.observe.exploration import explore
from rig.observe.explorer import Explorer, ScoutStop
from rig.observe.findings import Rule, render
from rig.observe.windows import BoundaryRun, Exploration, Window
from rig.supply.cache import default_cache_dir
from rig.supply.kernel import resolve_kernel
from rig.supply.qemu import fetch_qemu
from rig.transport.qemu import NMI_CPU
from rig.transport.rsp import hex_le
from testcases.conftest import SIGNAL
from testcases.test_cr3_exploration import WINDOWS
from tests.conftest import reference_config

WINDOW = Window("syscall-entry", "syscall-loop", ("entry_SYSCALL_64",), "entry")


def _result(explored: list[int], store: int = 5, cr3_write: int = 7) -> Exploration:
    ex = Exploration(WINDOW, 0, Trace(0, 2), store, cr3_write)
    ex.runs = [
        BoundaryRun(k, "entry_SYSCALL_64+0x0", "nop", 0x1000, 1, "NMI", "non-paranoid") for k in explored
    ]
    return ex


def _snap(step: int, pc: int, cr3: int) -> Snapshot:
    return Snapshot(step, 1, [0, pc], [0, cr3], {})


def test_a_scout_foresees_its_stop_only_at_a_cr3_write_then_at_its_count() -> None:
    """An entry scout on vCPU 1 that stops 3 boundaries after the switch to the kernel CR3:
    before the switch only a CR3 write can make it hold; after it, the count or an exit
    to user mode."""
    k, user_cr3, kernel_cr3 = 0xFFFFFFFF81000000, 0x2000 | 1 << 12, 0x2000
    mov, cr3_write, sysret = bytes.fromhex("4889e7"), bytes.fromhex("0f22dc"), bytes.fromhex("480f07")
    stop = ScoutStop(1, want_user=False, after=3)
    assert not stop(_snap(1, k, user_cr3))
    assert not stop.may_hold_after(1, k, mov) and stop.may_hold_after(1, k, cr3_write)
    assert not stop.may_hold_after(0, k, cr3_write), "another vCPU's CR3 does not change"
    assert not stop(_snap(2, k + 3, kernel_cr3)), "the switch (boundary 2) is not yet 3 past it"
    assert not stop(_snap(3, k + 6, kernel_cr3))
    assert not stop.may_hold_after(1, k + 6, mov), "boundary 4 is 2 past the switch"
    assert not stop(_snap(4, k + 9, kernel_cr3))
    assert stop.may_hold_after(1, k + 9, mov), "boundary 5 is 3 past the switch"
    assert stop(_snap(5, k + 12, kernel_cr3))
    early = ScoutStop(1, want_user=False, after=10)
    early(_snap(1, k, kernel_cr3))
    assert early.may_hold_after(1, k, sysret) and not early.may_hold_after(1, k, mov)


def test_a_window_whose_race_boundaries_all_ran_has_no_problem() -> None:
    assert _result([0, 3, 4, 5, 6, 7, 8, 9, 10]).problems() == []


def test_a_race_boundary_without_a_run_is_a_problem() -> None:
    ex = _result([0, 3, 4, 5, 7, 8])
    assert ex.unexplored() == [6]
    assert [(f.rule, f.text) for f in ex.problems()] == [
        (
            Rule.INCOMPLETE,
            "syscall-entry: boundaries [6] between the signal store (5) and its CR3 write (7) "
            "were not explored",
        )
    ]


def test_a_store_after_its_cr3_write_leaves_no_window_to_require() -> None:
    assert _result([0, 1, 2], store=9, cr3_write=4).unexplored() == []


# --- a version difference the matrix found (QEMU 10), on a real guest ----------------------

#: the testcase's own window (its entries are testcases/conftest.py's INTERRUPT_ENTRIES)
INTERRUPT_WINDOW = next(w for w in WINDOWS if w.name == "interrupt-entry")


@pytest.fixture(scope="module")
def qemu10_guest(initrd: Path) -> Iterator[Guest]:
    cache = default_cache_dir()
    k = resolve_kernel(None, None, cache)
    if k.vmlinux is None:
        pytest.skip(f"the default kernel {k.label} has no vmlinux")
    qemu = str(fetch_qemu("bookworm-backports", cache))
    g = Guest.boot(GuestConfig(k.image, initrd, k.vmlinux, qemu=qemu, label=k.label, cache_dir=cache))
    try:
        yield g
    finally:
        g.close()


def test_interrupt_entry_explores_under_qemu_10(qemu10_guest: Guest) -> None:
    """Under QEMU 10 each debugger stop lets the guest clock run on, so stopping at every
    kernel-mode timer interrupt kept the vCPU in softirqs ("200 hits ... in a row were not
    on the user CR3": CI's trixie cell, and 3 of 6 local runs, before d5247ed). An arrival
    taken in kernel mode now runs back to user mode with the entries disarmed: the window
    explores in full, twice in a row."""
    g = qemu10_guest
    assert g.config.vmlinux is not None
    sites = find_sites(g.config.vmlinux, g.symbols)
    g.start_workload(INTERRUPT_WINDOW.workload, NMI_CPU)
    for _ in range(2):
        result = explore(g, sites, INTERRUPT_WINDOW, signal=SIGNAL)
        print(result.table())
        assert result.runs and not result.problems(), render(result.problems()) + "\n" + result.table()


def test_a_step_qemu_answered_without_executing_is_found() -> None:
    """A boundary whose step left rip where it was (a stop QEMU still owed) is found; a
    ``rep`` string instruction that repeats itself is not one."""
    from rig.machine.trace import Snapshot, Trace
    from rig.observe.explorer import not_executed

    def trace(steps: list[tuple[int, str]]) -> Trace:
        t = Trace(0, 1)
        t.snapshots = [Snapshot(i, 0, [pc], [0], {}, insn) for i, (pc, insn) in enumerate(steps)]
        return t

    moving = [(0x10, "push %rax"), (0x11, "mov %cr3,%rax"), (0x14, "rep stos %al,(%rdi)")]
    assert not_executed(trace(moving)) is None
    assert not_executed(trace([*moving, (0x14, "rep stos %al,(%rdi)"), (0x16, "ret")])) is None
    assert not_executed(trace([(0x10, "push %rax"), (0x10, "push %rax"), (0x11, "mov %cr3,%rax")])) == 1


NMI_WINDOW = next(w for w in WINDOWS if w.name == "nmi-entry")


@pytest.fixture(scope="module")
def isolated_vcpu0_guest() -> Iterator[Guest]:
    """The reference kernel with vCPU 0, the one QMP's NMIs reach, as the nohz_full CPU."""
    g = Guest.boot(reference_config(isolated_cpu=0))
    try:
        yield g
    finally:
        g.close()


def test_the_way_back_to_user_mode_after_an_nmi_from_user_is_stepped(
    isolated_vcpu0_guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A boundary run of the nmi-entry window ends just past the NMI's switch to the user
    CR3, in kernel mode. The next arrival used to continue from there to the next exit,
    that is to the spinning vCPU's next kernel entry: on a nohz_full CPU none came for
    10 s in 2 of 40 soak runs ("nmi-entry arrival: vCPU 0 hit no switch site"). The rest
    of the way to user mode is now stepped: no continue at all."""
    g = isolated_vcpu0_guest
    assert g.config.vmlinux is not None
    ex = Explorer(g, find_sites(g.config.vmlinux, g.symbols), cpu=0, signal=SIGNAL)
    g.start_workload(NMI_WINDOW.workload, 0)
    scout, _, _ = ex.scout(NMI_WINDOW)
    start = scout.snapshots[0]
    g.stop()
    with g.link() as link:
        resumes: list[str] = []
        resume = link.resume
        monkeypatch.setattr(link, "resume", lambda p, t: resumes.append(p) or resume(p, t))
        for k in (0, 3):
            run = ex.run_boundary(link, NMI_WINDOW, k, scout.snapshots[k], start=start.pc)
            assert run is not None and not run.problems, render(run.problems if run else [])
            packets = [f"Hg{thread_id(0)}", *(g.regmap.packet(r) for r in ("cs", "cr3"))]
            cs, cr3 = (hex_le(v) for v in link.transact(packets)[1:])
            assert not cs & 3 and user_cr3(cr3), (
                f"boundary {k}: the run did not end past the exit's user CR3 write in kernel mode "
                f"(cs {cs:#x}, cr3 {cr3:#x})"
            )
            before = len(resumes)
            ex.to_user_mode(link, NMI_WINDOW)
            cs = hex_le(link.transact([packets[0], g.regmap.packet("cs")])[1])
            assert cs & 3 == 3, f"boundary {k}: not in user mode (cs {cs:#x})"
            assert resumes[before:] == [], f"boundary {k}: the way back to user mode resumed the guest"


IRET_WINDOW = next(w for w in WINDOWS if w.name == "iret-exit")


@pytest.fixture(scope="module")
def reference_guest() -> Iterator[Guest]:
    g = Guest.boot(reference_config())
    try:
        yield g
    finally:
        g.close()


def test_arrivals_on_the_kernel_cr3_are_the_workloads_own(reference_guest: Guest) -> None:
    """A syscall-loop beside iret-loop on vCPU 0: about half the returns from
    do_syscall_64 there are syscall-loop's, which leave by SYSRET where the iret-exit
    window's path leaves by IRET. An arrival is taken only in the window's workload
    (``current_task``'s comm), so none takes the other path."""
    g = reference_guest
    assert g.config.vmlinux is not None
    sites = find_sites(g.config.vmlinux, g.symbols)
    g.start_workload("syscall-loop", 0)
    g.start_workload(IRET_WINDOW.workload, 0)
    g.effort.discarded.clear()
    try:
        result = explore(g, sites, IRET_WINDOW, signal=SIGNAL)
    finally:
        g.kill_workloads()
    assert result.runs and not result.problems(), render(result.problems()) + "\n" + result.table()
    other = [d for d in g.effort.discarded if "not " in d and "single step" not in d]
    assert other == [], f"arrivals took another task's path: {other}"


def test_the_task_names_of_a_running_and_an_idle_vcpu(reference_guest: Guest) -> None:
    """comm through current_task: the workload on vCPU 0 (stopped in its syscall, on the
    kernel CR3), the idle task on the isolated vCPU 1."""
    g = reference_guest
    names = task_names(g)
    assert names is not None
    g.start_workload("syscall-loop", 0)
    try:
        g.stop()
        with g.link() as link:
            ex = Explorer(g, find_sites(g.config.vmlinux, g.symbols), cpu=0, signal=SIGNAL)  # type: ignore[arg-type]
            ex.arrive_on_link(link, next(w for w in WINDOWS if w.name == "sysret-exit"))
            assert names.runs(link, g.vcpu(0), "syscall-loop")
            assert names.comm_offset is not None and names.comm_offset % 8 == 0
            assert names.comm(link, g.vcpu(0)) == "syscall-loop"
            idle = names.comm(link, g.vcpu(1))
            assert idle == "swapper/1", f"vCPU 1 runs {idle!r}"
            assert not names.runs(link, g.vcpu(1), "syscall-loop")
    finally:
        g.kill_workloads()
