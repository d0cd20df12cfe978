"""PTI entry and exit on the isolated vCPU: where CR3 flips, and that the sibling is frozen.

Each testcase runs a workload pinned to the isolated vCPU, stops that vCPU at an entry
point with a breakpoint armed after boot, single-steps it while the sibling stays
frozen, and checks the CR3 flip rules at every instruction boundary.
"""

from __future__ import annotations

from rig.guest import Guest
from rig.machine.stops import in_user_mode, on_kernel_tables
from rig.machine.trace import Trace
from rig.observe.checks import cr3_flip_problems, frozen_violations, side_problems
from rig.observe.findings import Finding, Rule, fail_on

#: Bound on the steps of one getppid()/kill() syscall round trip (the Debian 6.1 SYSCALL
#: path is ~450 instructions; a signal delivery a few thousand).
SYSCALL_STEPS = 20000


def syscall_round_trip(guest: Guest, workload: str) -> Trace:
    """Step one whole SYSCALL of ``workload`` on the isolated vCPU, entry to user mode."""
    cpu = guest.config.isolated
    guest.start_workload(workload, cpu)
    guest.break_on(guest.symbols.address("entry_SYSCALL_64"), cpu)
    return guest.step(cpu, max_steps=SYSCALL_STEPS, stop=in_user_mode(cpu))


def assert_sibling_frozen(trace: Trace) -> None:
    fail_on(frozen_violations(trace), "a frozen vCPU moved while another was stepped")


def test_syscall_entry_flips_cr3_at_mov_to_cr3(pti_guest: Guest) -> None:
    trace = syscall_round_trip(pti_guest, "syscall-loop")
    assert trace.snapshots[0].user_tables(trace.cpu), "entry_SYSCALL_64 was reached on the kernel CR3"
    i, problems = cr3_flip_problems(trace, to_user=False)
    assert i is not None, "; ".join(map(str, problems))
    problems += side_problems(trace, 0, i, user=True)
    fail_on(problems)
    assert_sibling_frozen(trace)


def test_sysret_exit_flips_cr3_at_mov_to_cr3(pti_guest: Guest) -> None:
    trace = syscall_round_trip(pti_guest, "syscall-loop")
    assert trace.stopped_because == "condition", f"never returned to user: {trace.stopped_because}"
    entry, problems = cr3_flip_problems(trace, to_user=False)
    exit_, more = cr3_flip_problems(trace, to_user=True)
    problems += more
    assert entry is not None and exit_ is not None, "; ".join(map(str, problems))
    problems += side_problems(trace, entry, exit_, user=False)
    problems += side_problems(trace, exit_, len(trace.snapshots), user=True)
    last = trace.snapshots[-2]
    if not last.insn.startswith("sysret"):
        problems.append(
            Finding(Rule.CR3_SWITCH, f"returned to user through `{last.insn}` at {last.where}, not SYSRET")
        )
    fail_on(problems)
    assert_sibling_frozen(trace)


def test_iret_exit_flips_cr3_at_mov_to_cr3(pti_guest: Guest) -> None:
    trace = syscall_round_trip(pti_guest, "iret-loop")
    assert trace.stopped_because == "condition", f"never returned to user: {trace.stopped_because}"
    exits = [i for i, to_user in trace.cr3_flips() if to_user]
    assert exits, "no kernel->user CR3 flip"
    _, problems = cr3_flip_problems(trace, to_user=True)
    problems += side_problems(trace, exits[-1], len(trace.snapshots), user=True)
    last = trace.snapshots[-2]
    if not last.insn.startswith("iret"):
        problems.append(
            Finding(
                Rule.CR3_SWITCH,
                f"returned to user through `{last.insn}` at {last.where}, not IRET "
                "(the workload's sigreturn should force the IRET path)",
            )
        )
    fail_on(problems)
    assert_sibling_frozen(trace)


def test_page_fault_entry_flips_cr3_at_mov_to_cr3(pti_guest: Guest) -> None:
    cpu = pti_guest.config.isolated
    pti_guest.start_workload("fault-loop", cpu)
    fault = pti_guest.symbols.address("asm_exc_page_fault")
    # a page fault taken in kernel mode (no CR3 switch) may come first: take the first from user
    for _ in range(20):
        pti_guest.break_on(fault, cpu)
        trace = pti_guest.step(cpu, max_steps=400, stop=on_kernel_tables(cpu))
        if trace.snapshots[0].user_tables(cpu):
            break
        pti_guest.traces.pop()
    else:
        raise AssertionError("20 page faults in a row came from kernel mode")
    i, problems = cr3_flip_problems(trace, to_user=False)
    assert i is not None, "; ".join(map(str, problems))
    problems += side_problems(trace, 0, i, user=True)
    fail_on(problems)
    assert_sibling_frozen(trace)
