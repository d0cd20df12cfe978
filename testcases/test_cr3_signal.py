"""The ``kernel_cr3_loaded`` signal (CR3-signal patch, CONFIG_TRACK_CR3) on every entry path.

While one vCPU steps, a sibling reads ``per_cpu(kernel_cr3_loaded, stepping cpu)``
through its own page tables at every instruction boundary:

* the signal is 1 strictly before CR3 becomes the kernel CR3 (no boundary shows the
  kernel CR3 with signal 0), stays 1 for the whole stay in the kernel, and is 0 before
  CR3 becomes the user CR3 (at most ``MAX_STORE_TO_CR3_WINDOW`` boundaries between);
* between each signal store and its CR3 write no instruction touches memory other than
  the stack and per-CPU scratch, so the serializing CR3 write publishes the store.

NMIs (from user and from kernel mode, at every boundary of each switch) are explored in
test_cr3_exploration.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from rig.guest import Guest
from rig.machine.sites import SIGNAL, Site, find_sites, unreachable_reason
from rig.machine.stops import AnyOf, Spinning, StopCondition, in_user_mode
from rig.machine.storepaths import store_paths
from rig.machine.trace import Trace, WatchedWord
from rig.machine.vcpu import read_physical
from rig.machine.x86 import cr3_side
from rig.observe.checks import (
    frozen_violations,
    gs_symbol,
    memory_operands,
    signal_problems,
    static_path_findings,
    store_windows,
    window_findings,
)
from rig.observe.findings import Finding, Rule, fail_on
from rig.pytestplugin.settings import RigSettings, missing_on_reference
from rig.transport.qemu import NMI_CPU
from testcases.conftest import INTERRUPT_ENTRIES


def observer_of(guest: Guest, cpu: int) -> int:
    return next(n for n in range(guest.config.smp) if n != cpu)


def step_watching(guest: Guest, cpu: int, max_steps: int, stop: StopCondition) -> Trace:
    word = WatchedWord(SIGNAL, guest.per_cpu(SIGNAL, cpu), 4)
    return guest.step(cpu, words=[word], max_steps=max_steps, stop=stop)


def judge(guest: Guest, trace: Trace, *, complete: bool = True) -> list[Finding]:
    """Every stepped rule on one trace: the signal against CR3 at every boundary, the
    store-to-write window of every CR3 write, and the frozen siblings. ``complete``: the
    trace reached its stop condition (a trace cut short is judged up to its end)."""
    obs = observer_of(guest, trace.cpu)
    findings = signal_problems(trace, obs, SIGNAL, complete=complete)
    findings += window_findings(trace, obs, SIGNAL, gs_symbol(guest.symbols))
    return findings + frozen_violations(trace)


def check(guest: Guest, trace: Trace, *, round_trip: bool) -> None:
    if round_trip:
        assert trace.stopped_because == "condition", f"did not get back: {trace.stopped_because}"
    assert trace.cr3_flips(), "no CR3 flip in the trace"
    fail_on(judge(guest, trace))


#: Where the kernel leaves for user mode (IRET and SYSRET exits).
EXITS_TO_USER = ("swapgs_restore_regs_and_return_to_usermode", "syscall_return_via_sysret")


def from_user(
    guest: Guest,
    cpu: int,
    entry: str | tuple[str, ...],
    steps: int,
    stop: StopCondition,
    trigger: Callable[[], None] | None = None,
    tries: int = 20,
    accept: Callable[[Trace], bool] = lambda t: True,
) -> Trace:
    """Break on ``entry`` until vCPU ``cpu`` arrives there on the user CR3 (and the trace
    passes ``accept``), then return the stepped trace. After ``tries`` hits that did not,
    fail with what each hit was.

    Every stepped try is judged (:func:`judge`) before it may be discarded: a finding in
    a try that spun, ran out of steps or was not accepted fails the testcase with that
    trace. A try is discarded only for a reason that is not a check failure, and each
    discarded try is recorded with its reason (``guest.effort.discarded``: the JUnit
    property ``cr3rig.discarded``, the soak's table)."""
    names = (entry,) if isinstance(entry, str) else entry
    addresses = [guest.symbols.address(n) for n in names if n in guest.symbols]
    assert addresses, f"kernel {guest.release} has none of the entry points {names}"
    hits: list[str] = []
    for _ in range(tries):
        guest.break_on(addresses, cpu, trigger=trigger)
        # a hit taken in kernel mode (an interrupt in a syscall, in softirqs) is not stepped:
        # the vCPU runs back to user mode with only its exits to user mode armed (stopping
        # at each kernel-mode interrupt can keep it in softirqs: the guest's clock runs on
        # while it is stopped), then the entry is armed again
        at = guest.step(cpu, max_steps=0)
        guest.traces.pop()
        first = at.snapshots[0]
        if not first.user_tables(cpu):
            hits.append(f"{first.where or hex(first.pc)} from kernel mode")
            guest.effort.discarded.append(f"{first.where or hex(first.pc)}: from kernel mode, not stepped")
            exits = [guest.symbols.address(n) for n in EXITS_TO_USER if n in guest.symbols]
            guest.break_on(exits, cpu)
            back = step_watching(guest, cpu, 400, in_user_mode(cpu))
            # the way back is stepped too: judged like any trace before it is dropped
            fail_on(judge(guest, back, complete=False), "the run back to user mode after a kernel-mode hit")
            guest.traces.pop()
            continue
        # a path that spins on what the frozen vCPU holds (a lock, a stop_machine
        # rendezvous) never gets back: give it up early, not after ``steps`` steps
        spin = Spinning(cpu)
        trace = step_watching(guest, cpu, steps, AnyOf((stop, spin)))
        done = spin.spun_at is None and trace.stopped_because == "condition"
        findings = judge(guest, trace, complete=done)
        last = trace.snapshots[-1]
        taken = len(trace.snapshots) - 1
        if findings:
            why = (
                ""
                if done
                else f" (a try that would have been discarded: {taken} steps, {trace.stopped_because})"
            )
            fail_on(findings, f"try {len(hits) + 1} of {entry}{why}; earlier tries: {hits or 'none'}")
        if spin.spun_at is None and accept(trace):
            return trace
        why = (
            f"spun at {last.where or hex(last.pc)} ({spin.window} steps on at most {spin.distinct} rips: "
            "waiting for a frozen vCPU?)"
            if spin.spun_at is not None
            else f"stopped by {trace.stopped_because} at {last.where or hex(last.pc)}"
        )
        hits.append(f"{first.where or hex(first.pc)} from user mode, not accepted: {taken} steps, {why}")
        guest.effort.discarded.append(
            f"{first.where or hex(first.pc)}: {taken} steps judged, no findings; {why}"
        )
        guest.traces.pop()
    raise AssertionError(
        f"{tries} hits of {entry} in a row did not come from the user CR3 and pass: " + "; ".join(hits)
    )


def returned(trace: Trace) -> bool:
    """True if the stepping got back to where it was meant to stop (not ``max_steps``)."""
    return trace.stopped_because == "condition"


#: Workload -> the entry of its system call: the 64-bit SYSRET and IRET exits, and the
#: 32-bit entries with their SYSRETL and IRET exits (the store-to-write rule on each).
ROUND_TRIPS = {
    "syscall-loop": "entry_SYSCALL_64",
    "iret-loop": "entry_SYSCALL_64",
    "compat-syscall-loop": "entry_SYSCALL_compat",
    "compat-sysenter-loop": "entry_SYSENTER_compat",
    "compat-int80-loop": "asm_int80_emulation",
}


@pytest.mark.parametrize("workload", list(ROUND_TRIPS))
def test_signal_over_a_syscall_round_trip(signal_guest: Guest, workload: str) -> None:
    cpu = signal_guest.config.isolated
    signal_guest.start_workload(workload, cpu)
    trace = from_user(signal_guest, cpu, ROUND_TRIPS[workload], 20000, in_user_mode(cpu))
    check(signal_guest, trace, round_trip=True)


def test_signal_on_page_fault_entry(signal_guest: Guest) -> None:
    cpu = signal_guest.config.isolated
    signal_guest.start_workload("fault-loop", cpu)
    trace = from_user(signal_guest, cpu, "asm_exc_page_fault", 400, lambda s: not s.user_tables(cpu))
    check(signal_guest, trace, round_trip=False)


#: Hits of an interrupt entry tried before the testcase fails; each one that is not
#: stepped to its C handler is judged, then listed with its reason.
INTERRUPT_TRIES = 3


def check_two_parts(guest: Guest, into: Trace, out: Trace, event: str) -> None:
    """An event stepped in two parts, its handler at full speed between them: CR3 and the
    signal where the first part left them when the second begins, every stepped rule on
    both parts, and a CR3 switch in each."""
    cpu, obs = into.cpu, observer_of(guest, into.cpu)
    last, first = into.snapshots[-1], out.snapshots[0]
    assert (last.cr3[cpu], last.words[SIGNAL][obs]) == (first.cr3[cpu], first.words[SIGNAL][obs]), (
        f"CR3/signal changed in the {event}'s handler: {last.cr3[cpu]:#x}/{last.words[SIGNAL][obs]} at "
        f"{last.where}, {first.cr3[cpu]:#x}/{first.words[SIGNAL][obs]} at {first.where}"
    )
    fail_on(judge(guest, into, complete=False) + judge(guest, out))
    assert into.cr3_flips() and out.cr3_flips(), f"no CR3 switch in the {event}'s entry or exit"


#: Where an interrupt from user mode leaves for user mode (error_return's way out).
INTERRUPT_EXIT = "swapgs_restore_regs_and_return_to_usermode"
#: Exits to user mode on the isolated vCPU looked through for the stepped interrupt's own
#: (another task the handler scheduled there may leave first).
EXIT_TRIES = 10


def test_signal_on_interrupt_from_user(signal_guest: Guest) -> None:
    """An interrupt from user mode on the isolated vCPU, stepped in its two asm parts:
    from the interrupt entry (user CR3) through error_entry's switch to the kernel CR3
    into the C handler (``sysvec_*``, the entry's name without ``asm_``), and from its
    exit (``swapgs_restore_regs_and_return_to_usermode`` on its own pt_regs) through the
    switch to the user CR3 back to user mode.

    The C handler runs at full speed between them, with every vCPU running: what it does
    (a softirq run, a schedule, a signal delivery) depends on the guest's state, and
    stepped with the siblings frozen it could wait on one of them. CR3 and the signal
    must be as the first part left them when the second begins. timer-spin's CPU-time
    timer keeps the isolated vCPU's tick running: it is interrupted in user mode every 4 ms."""
    g = signal_guest
    cpu = g.config.isolated
    g.start_workload("timer-spin", cpu)
    handlers = {
        g.symbols.address(n.removeprefix("asm_"))
        for n in INTERRUPT_ENTRIES
        if n.removeprefix("asm_") in g.symbols
    }
    assert handlers, f"kernel {g.release} has none of the C handlers of {INTERRUPT_ENTRIES}"
    into = from_user(
        g, cpu, INTERRUPT_ENTRIES, 400, lambda s: s.pc in handlers, tries=INTERRUPT_TRIES, accept=returned
    )
    with g.stopped(), g.link() as link:  # the C handler's frame: pt_regs above its return address
        v = g.vcpu(cpu)
        regs = v.registers(link, ["rsp"])["rsp"] + 8
    exit_to_user = g.symbols.address(INTERRUPT_EXIT)
    for _ in range(EXIT_TRIES):
        # its exit to user mode, on its own pt_regs. Not a breakpoint on the C handler's
        # return address: an interrupt taken in the handler's softirqs returns there too,
        # and under QEMU 10 each stop made the next timer interrupt due, so the vCPU
        # stopped at nested returns without end (100 in 1.3 s). A return to kernel
        # mode does not pass here.
        g.break_on(exit_to_user, cpu)
        with g.stopped(), g.link() as link:
            at = v.registers(link, ["rsp"])["rsp"]
        if at == regs:
            break
        g.effort.discarded.append(
            f"{INTERRUPT_EXIT}: another exit to user mode (pt_regs at {at:#x}, not {regs:#x}); not stepped"
        )
    else:
        raise AssertionError(f"{EXIT_TRIES} exits through {INTERRUPT_EXIT}, none of this interrupt's")
    out = step_watching(g, cpu, 2000, in_user_mode(cpu))
    assert out.stopped_because == "condition", (
        f"the interrupt did not return to user mode: {out.stopped_because}"
    )
    check_two_parts(g, into, out, "interrupt")


def test_store_then_cr3_write_window(signal_guest: Guest) -> None:
    """The reviewer's question: nothing between the signal store and the serializing
    CR3 write may load or store memory other than stack and per-CPU scratch."""
    cpu = signal_guest.config.isolated
    signal_guest.start_workload("syscall-loop", cpu)
    trace = from_user(signal_guest, cpu, "entry_SYSCALL_64", 20000, in_user_mode(cpu))
    windows = store_windows(trace, observer_of(signal_guest, cpu), SIGNAL)
    assert len(windows) == len(trace.cr3_flips()), (
        f"{len(trace.cr3_flips())} CR3 writes but only {len(windows)} are preceded by a signal store"
    )
    report = [
        f"store `{w.store}` (step {w.store_step}) -> `{w.cr3_write}` (step {w.cr3_step}): "
        f"{len(w.between)} instruction(s) between: {[i for _, i in w.between]}; "
        f"memory operands {[op for _, i in w.between for op in memory_operands(i)]}"
        for w in windows
    ]
    print("\n".join(report))
    fail_on(
        window_findings(trace, observer_of(signal_guest, cpu), SIGNAL, gs_symbol(signal_guest.symbols)),
        "\n".join(report),
    )


def test_signal_reads_the_same_through_every_view(signal_guest: Guest) -> None:
    """The stepping vCPU (on its user and kernel CR3), the sibling, and physical memory
    agree on the value at every boundary (the variable is mapped in the user tables)."""
    g = signal_guest
    cpu = g.config.isolated
    obs = observer_of(g, cpu)
    g.start_workload("syscall-loop", cpu)
    trace = from_user(g, cpu, "entry_SYSCALL_64", 20000, in_user_mode(cpu))
    fail_on(
        [
            Finding(
                Rule.SIGNAL_UNREADABLE,
                f"step {s.step} at {s.where}: vCPU {cpu} cannot read {SIGNAL} (not mapped?)",
                s.step,
                cpu,
                s.where,
            )
            for s in trace.snapshots
            if s.words[SIGNAL][cpu] is None
        ]
    )
    fail_on(
        [
            Finding(
                Rule.VIEWS_DISAGREE,
                f"step {s.step} at {s.where}: vCPU {cpu} reads {s.words[SIGNAL][cpu]}, "
                f"vCPU {obs} reads {s.words[SIGNAL][obs]}",
                s.step,
                cpu,
                s.where,
            )
            for s in trace.snapshots
            if s.words[SIGNAL][cpu] != s.words[SIGNAL][obs]
        ]
    )
    for n in range(g.config.smp):
        addr = g.per_cpu(SIGNAL, n)
        t = g.translate(addr, user_tables=False)
        assert t.physical is not None
        with g.stopped(), g.link() as link:
            phys = int.from_bytes(read_physical(link, t.physical, 4), "little")
            virt = g.vcpu(obs).read(link, addr, 4)
        assert virt is not None and phys == int.from_bytes(virt, "little"), (
            f"CPU {n}'s copy: physical {phys} != virtual {virt!r}"
        )


def test_every_store_to_cr3_write_path_of_the_text(signal_guest: Guest, rig_settings: RigSettings) -> None:
    """The store-to-write rule statically, on every path of the entry text from each
    signal store to its CR3 write (both ways at each branch; rig.machine.storepaths),
    including the paths TCG never runs; and every CR3 write TCG can reach has a store on
    some path before it."""
    g = signal_guest
    if g.config.vmlinux is None:
        missing_on_reference(
            rig_settings, "a vmlinux", "the static check reads the kernel's text (--vmlinux)"
        )
    assert g.config.vmlinux is not None
    paths = store_paths(g.config.vmlinux, g.symbols, SIGNAL)
    sites = find_sites(g.config.vmlinux, g.symbols, SIGNAL)
    findings = static_path_findings(paths, gs_symbol(g.symbols))
    noted = {p.cr3_write.address for p in paths if p.cr3_write is not None}
    for s in sites:
        if (
            s.kind == "cr3-write"
            and s.address not in noted
            and unreachable_reason(s, has_signal=True) is None
        ):
            text = f"the CR3 write at {s.where} `{s.insn}` has no signal store on any path before it"
            findings.append(Finding(Rule.STORE_TO_WRITE_WINDOW, text, where=s.where))
    table = [
        f"{p.store.where} -> {p.cr3_write.where if p.cr3_write else '?'}: "
        f"{[i.text for i in p.between if not i.mnemonic.startswith('nop')]}"
        for p in paths
    ]
    print("\n".join(table))
    assert paths, f"no path from a signal store to a CR3 write in {g.config.vmlinux}"
    fail_on(findings, "\n".join(table))


def kernel_mode_return(guest: Guest, cpu: int, cs_offset: int = 8) -> int | None:
    """At an exception entry: the address the frame at %rsp returns to, if it returns to
    kernel mode (its CS has RPL 0); None if it returns to user mode."""
    v = guest.vcpu(cpu)
    with guest.stopped(), guest.link() as link:
        rsp = v.registers(link, ["rsp"])["rsp"]
        rip = v.read_u64(link, rsp + cs_offset - 8)
        cs = v.read_u64(link, rsp + cs_offset)
    assert rip is not None and cs is not None, f"vCPU {cpu}: the exception frame at {rsp:#x} cannot be read"
    return rip if cs & 3 == 0 else None


#: Tries at a single-step #DB of a SYSENTER's entry, each from an exit to user mode (past
#: the ~30 #DBs of the SYSENTER before: one per instruction of its entry until its POPFQ
#: clears TF); a try is discarded when its first #DB is another (the user-mode trap of
#: the loop's instruction before the SYSENTER: 0-1 in a try).
DEBUG_TRAP_TRIES = 20


def test_signal_over_a_debug_trap_in_kernel_mode(signal_guest: Guest) -> None:
    """A #DB taken in kernel mode on the user CR3 (the single-step trap at the first
    instruction of a SYSENTER with EFLAGS.TF), stepped from the exception entry through
    paranoid_entry, the handler and paranoid_exit's restore of the user CR3 back to the
    interrupted instruction: the paranoid entry's and exit's stores and CR3 writes are
    held to every stepped rule. (Later #DBs of the same SYSENTER nest inside the entry's
    store-to-write window: the exploration's debug-trap-entry window checks those.)"""
    g = signal_guest
    cpu = g.config.isolated
    g.start_workload("compat-sysenter-tf-loop", cpu)
    entry = g.symbols.address("entry_SYSENTER_compat")
    exits = [g.symbols.address(n) for n in EXITS_TO_USER if n in g.symbols]
    # the #DBs of one SYSENTER come one per instruction until its POPFQ clears TF (~30):
    # each try starts at an exit to user mode, past them; then come the user-mode traps
    # of the loop's instructions up to the next SYSENTER, and the one at its entry
    for _ in range(DEBUG_TRAP_TRIES):
        g.break_on(exits, cpu)
        g.break_on(g.symbols.address("asm_exc_debug"), cpu)
        at = g.step(cpu, max_steps=0)
        g.traces.pop()
        back = kernel_mode_return(g, cpu)
        if at.snapshots[0].user_tables(cpu) and back == entry:
            break
        g.effort.discarded.append(
            f"asm_exc_debug: returning to {g.symbols.describe(back) if back else 'user mode'}, "
            "not to the first instruction of entry_SYSENTER_compat; not stepped"
        )
    else:
        raise AssertionError(
            f"{DEBUG_TRAP_TRIES} #DBs in a row were not the single-step trap at entry_SYSENTER_compat"
        )
    trace = step_watching(g, cpu, 30000, lambda s: s.pc == entry)
    assert trace.stopped_because == "condition", f"the #DB did not return: {trace.stopped_because}"
    assert any(s.where.startswith("paranoid_exit") for s in trace.snapshots), (
        "it did not leave through paranoid_exit"
    )
    check(g, trace, round_trip=False)


def test_signal_over_a_debug_trap_on_the_kernel_cr3(
    signal_guest: Guest, watch_sites: tuple[Site, ...]
) -> None:
    """A #DB taken in kernel mode on the kernel CR3 (a later single-step trap of a
    SYSENTER with EFLAGS.TF, after the entry's switch to the kernel CR3), stepped from the
    exception entry to the interrupted instruction: paranoid_entry finds the kernel CR3
    and writes none, and paranoid_exit's restore is a signal store without a CR3 write
    (the value its entry found, 1). The signal must read 1 at every boundary."""
    g = signal_guest
    cpu = g.config.isolated
    g.start_workload("compat-sysenter-tf-loop", cpu)
    writes = [
        site.address
        for site in watch_sites
        if site.kind == "cr3-write" and site.function == "entry_SYSENTER_compat"
    ]
    assert writes, "entry_SYSENTER_compat has no CR3 write site"
    for _ in range(DEBUG_TRAP_TRIES):
        # at the entry's CR3 write (TF set), the next #DB is its single-step trap after it
        g.break_on(writes, cpu)
        g.break_on(g.symbols.address("asm_exc_debug"), cpu)
        at = g.step(cpu, max_steps=0)
        g.traces.pop()
        back = kernel_mode_return(g, cpu)
        if (
            not at.snapshots[0].user_tables(cpu)
            and back is not None
            and g.symbols.describe(back).startswith("entry_SYSENTER_compat")
        ):
            break
        g.effort.discarded.append(
            f"asm_exc_debug: on the {cr3_side(at.snapshots[0].cr3[cpu])} CR3, returning to "
            f"{g.symbols.describe(back) if back else 'user mode'}; not stepped"
        )
    else:
        raise AssertionError(
            f"{DEBUG_TRAP_TRIES} #DBs in a row were not a single-step trap of entry_SYSENTER_compat "
            "on the kernel CR3"
        )
    trace = step_watching(g, cpu, 30000, lambda s: s.pc == back)
    assert trace.stopped_because == "condition", f"the #DB did not return: {trace.stopped_because}"
    stores = {
        site.address
        for site in watch_sites
        if site.kind == "signal-store" and site.function == "paranoid_exit"
    }
    assert any(s.pc in stores for s in trace.snapshots), (
        "paranoid_exit stored no signal (its restore on the kernel CR3)"
    )
    assert not trace.cr3_flips(), (
        f"a #DB on the kernel CR3 switched CR3 at {[s.where for s in trace.cr3_flips()]}"
    )
    fail_on(judge(g, trace))


def test_signal_over_an_nmi_in_kernel_mode(signal_guest: Guest) -> None:
    """An NMI taken at the first instruction of entry_SYSCALL_64 (kernel mode, user CR3):
    stepped from asm_exc_nmi through paranoid_entry to the C handler, and from the
    handler's return in end_repeat_nmi through its restore of the user CR3 back to the
    interrupted instruction. The handler between runs at full speed (an unknown NMI's report is ~19,000
    boundaries of printk): CR3 and the signal must be as the first part left them when the
    second begins. NMIs reach vCPU 0 only, so this runs there."""
    g = signal_guest
    cpu = NMI_CPU
    g.start_workload("syscall-loop", cpu)
    entry = g.symbols.address("entry_SYSCALL_64")
    handler = g.symbols.address("exc_nmi")
    with g.userspace.quiet_console():
        g.break_on(entry, cpu)
        g.machine.inject_nmi()  # pending while stopped: taken at this boundary on the next continue
        g.break_on(g.symbols.address("asm_exc_nmi"), cpu)
        assert kernel_mode_return(g, cpu) == entry, "the NMI was not taken at entry_SYSCALL_64"
        into = step_watching(g, cpu, 2000, lambda s: s.pc == handler)
        assert into.stopped_because == "condition", f"the NMI did not reach exc_nmi: {into.stopped_because}"
        with g.stopped(), g.link() as link:  # exc_nmi's return address, in end_repeat_nmi
            v = g.vcpu(cpu)
            back = v.read_u64(link, v.registers(link, ["rsp"])["rsp"])
        assert back is not None and g.symbols.describe(back).startswith("end_repeat_nmi"), back
        g.break_on(back, cpu)
        out = step_watching(g, cpu, 2000, lambda s: s.pc == entry)
    assert out.stopped_because == "condition", f"the NMI did not return: {out.stopped_because}"
    assert any(s.where.startswith("paranoid_entry") for s in into.snapshots), (
        "it did not enter paranoid_entry"
    )
    check_two_parts(g, into, out, "NMI")
