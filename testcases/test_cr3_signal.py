"""The ``kernel_cr3_loaded`` signal (CR3-signal patch, CONFIG_TRACK_CR3) on SYSCALL round trips.

A sibling vCPU reads ``per_cpu(kernel_cr3_loaded, isolated)`` through its own page tables
at every instruction boundary while the isolated vCPU steps:

* the signal is 1 strictly before CR3 becomes the kernel CR3 (no boundary shows the
  kernel CR3 with signal 0), stays 1 for the whole stay in the kernel, and is 0 before
  CR3 becomes the user CR3;
* the isolated vCPU itself, on either CR3, reads the same value (the variable is mapped
  in the PTI user tables).
"""

from __future__ import annotations

import pytest

from rig.guest import Guest
from rig.stepping import Trace, Watch, in_user_mode

SIGNAL = "kernel_cr3_loaded"
#: Most boundaries allowed between the store of 0 and the write of the user CR3
#: (NOTE_CR3_SWITCH sits immediately before the switch: one instruction in v8).
MAX_STORE_TO_CR3_WINDOW = 8


@pytest.fixture
def signal_guest(pti_guest: Guest) -> Guest:
    if SIGNAL not in pti_guest.symbols:
        pytest.skip(
            f"kernel {pti_guest.release} lacks {SIGNAL} (CONFIG_TRACK_CR3, the CR3-signal patch); "
            f"symbols from {pti_guest.symbols.source}"
        )
    return pti_guest


def step_syscall(guest: Guest, workload: str) -> tuple[Trace, int]:
    cpu = guest.config.isolated
    sibling = next(n for n in range(guest.config.smp) if n != cpu)
    guest.start_workload(workload, cpu)
    guest.break_on(guest.symbols.address("entry_SYSCALL_64"), cpu)
    watch = Watch(SIGNAL, guest.per_cpu(SIGNAL, cpu), 4)
    trace = guest.step(cpu, watches=[watch], max_steps=20000, stop=in_user_mode(cpu))
    assert trace.stopped_because == "condition", f"never returned to user: {trace.stopped_because}"
    return trace, sibling


def signal_problems(trace: Trace, sibling: int) -> list[str]:
    """Check the signal against the stepper's CR3 side at every boundary.

    On the kernel CR3 the signal must be 1, except in the run of boundaries right
    before the switch back to the user CR3 (after the store of 0, before the CR3 write);
    the CR3 may only change to the kernel (user) CR3 once the signal reads 1 (0).
    """
    cpu = trace.cpu
    snaps = trace.snapshots
    problems = []
    for i in range(1, len(snaps)):
        prev, cur = snaps[i - 1], snaps[i]
        seen = cur.words[SIGNAL][sibling]
        if prev.user_tables(cpu) and not cur.user_tables(cpu) and prev.words[SIGNAL][sibling] != 1:
            problems.append(
                f"step {cur.step}: CR3 became the kernel CR3 at `{prev.insn}` before the signal was 1"
            )
        if not prev.user_tables(cpu) and cur.user_tables(cpu) and prev.words[SIGNAL][sibling] != 0:
            problems.append(
                f"step {cur.step}: CR3 became the user CR3 at `{prev.insn}` with the signal still "
                f"{prev.words[SIGNAL][sibling]}"
            )
        if not cur.user_tables(cpu) and seen != 1:
            exit_at = next((k for k in range(i, len(snaps)) if snaps[k].user_tables(cpu)), None)
            window = snaps[i:exit_at] if exit_at is not None else snaps[i:]
            if (
                exit_at is None
                or len(window) > MAX_STORE_TO_CR3_WINDOW
                or any(s.words[SIGNAL][sibling] != 0 for s in window)
            ):
                problems.append(
                    f"step {cur.step} at {cur.where}: kernel CR3 loaded, signal reads {seen}, and this "
                    "is not the store-then-CR3-write window of an exit"
                )
    return problems


@pytest.mark.parametrize("workload", ["syscall-loop", "iret-loop"])
def test_signal_tracks_cr3_over_a_syscall(signal_guest: Guest, workload: str) -> None:
    trace, sibling = step_syscall(signal_guest, workload)
    assert trace.cr3_flips(), "no CR3 flip in the trace"
    problems = signal_problems(trace, sibling)
    assert not problems, "\n".join(problems[:20])


def test_signal_reads_the_same_through_both_cr3s(signal_guest: Guest) -> None:
    trace, sibling = step_syscall(signal_guest, "syscall-loop")
    cpu = trace.cpu
    unreadable = [s.step for s in trace.snapshots if s.words[SIGNAL][cpu] is None]
    assert not unreadable, (
        f"the isolated vCPU cannot read {SIGNAL} at steps {unreadable[:10]} "
        "(not mapped in the PTI user tables?)"
    )
    differ = [s.step for s in trace.snapshots if s.words[SIGNAL][cpu] != s.words[SIGNAL][sibling]]
    assert not differ, f"the two vCPUs read different values at steps {differ[:10]}"
