"""rig.observe.checks and rig.observe.findings: the store-to-write rule's operand
classification, undecodable instructions, per-CPU scratch, truncated traces, and how a
failure is classified for the mutant runner (no guest)."""

from __future__ import annotations

import pytest

from rig.errors import GuestError
from rig.machine.sites import SIGNAL
from rig.machine.trace import Snapshot, Trace
from rig.observe.checks import (
    allowed_scratch,
    decodable,
    memory_operands,
    signal_problems,
    window_findings,
)
from rig.observe.findings import FailureKind, Finding, FindingsFailure, Rule, fail_on, failure_kind

KERNEL = 0x2000000
USER = KERNEL | (1 << 12)
TSS, SIGNAL_ADDR, OTHER = 0xFFFFFFFF82000000, 0xFFFFFFFF82001000, 0xFFFFFFFF82002000


def per_cpu(address: int) -> str | None:
    return {TSS: "cpu_tss_rw", SIGNAL_ADDR: SIGNAL, OTHER: "jiffies"}.get(address)


@pytest.mark.parametrize(
    ("insn", "memory"),
    [
        ("mov %rax,%cr3", []),
        ("movl $0x1,%gs:0x1234(%rip)", ["%gs:0x1234(%rip)"]),
        ("mov 0x12345678,%eax", ["0x12345678"]),  # absolute: a memory load
        ("movabs 0xffffffff82000000,%al", ["0xffffffff82000000"]),  # moffs
        ("movabs $0xffffffff82000000,%rax", []),  # an immediate
        ("mov $0x1,%eax", []),
        ("mov 0x8(%rsp),%rdi", ["0x8(%rsp)"]),
        ("push %rax", []),
        ("jmp 0xffffffff81000100 <foo+0x10>", []),  # a branch target
        ("jmp *0x10(%rax)", ["*0x10(%rax)"]),
        ("lock xadd %eax,(%rdx)", ["(%rdx)"]),
        ("lea 0x8(%rsp),%rsp", []),
        ("nopl 0x0(%rax,%rax,1)", []),
        ("mov %rsp,%gs:0x6014", ["%gs:0x6014"]),
    ],
)
def test_memory_operands(insn: str, memory: list[str]) -> None:
    assert memory_operands(insn) == memory


def test_only_the_stack_and_the_listed_per_cpu_scratch_are_allowed() -> None:
    assert allowed_scratch("0x8(%rsp)")
    assert not allowed_scratch("%gs:0x6014")  # no per-CPU lookup: never allowed
    assert allowed_scratch(f"%gs:{TSS + 4:#x}", lambda a: per_cpu(a & ~0xFFF))
    assert not allowed_scratch(f"%gs:{OTHER:#x}", per_cpu)
    # RIP-relative: the target is the next instruction's address plus the displacement
    assert allowed_scratch("%gs:0x100(%rip)", per_cpu, next_pc=SIGNAL_ADDR - 0x100)
    assert not allowed_scratch("%gs:0x100(%rip)", per_cpu, next_pc=OTHER - 0x100)
    assert not allowed_scratch("%gs:0x100(%rip)", per_cpu)  # unknown next pc
    assert not allowed_scratch("0x12345678", per_cpu)
    assert not allowed_scratch("(%rdx)", per_cpu)


def test_undecodable_instructions_are_recognised() -> None:
    assert not decodable("(bad)")
    assert not decodable("?")
    assert not decodable(".byte 0xf")
    assert not decodable("")
    assert decodable("mov %rax,%cr3")


def _trace(steps: list[tuple[str, int, int]]) -> Trace:
    """A trace of vCPU 1 whose boundaries are (instruction, CR3, signal as vCPU 0 reads it)."""
    t = Trace(1, 2)
    pc = 0xFFFFFFFF81000000
    for n, (insn, cr3, sig) in enumerate(steps):
        t.snapshots.append(
            Snapshot(n, 1, [0, pc + 8 * n], [KERNEL, cr3], {SIGNAL: [sig, sig]}, insn, f"x+{n}")
        )
    t.stopped_because = "condition"
    return t


def _exit(between: list[str]) -> Trace:
    """An exit: store 0, ``between``, the CR3 write, user mode."""
    steps = [("movl $0x0,%gs:0x100(%rip)", KERNEL, 1)]
    steps += [(i, KERNEL, 0) for i in between]
    steps += [("mov %rdi,%cr3", KERNEL, 0), ("sysretq", USER, 0), ("nop", USER, 0)]
    return _trace(steps)


def test_a_clean_exit_window_has_no_findings() -> None:
    t = _exit(["mov %rsp,%rdi", "or $0x1000,%rdi"])
    assert window_findings(t, 0, SIGNAL, per_cpu) == []
    assert signal_problems(t, 0, SIGNAL) == []


@pytest.mark.parametrize(
    "insn", ["mov 0x12345678,%eax", "movabs 0xffffffff82000000,%al", "mov (%rdx),%rax", "(bad)"]
)
def test_a_memory_access_or_undecodable_instruction_in_the_window_is_a_finding(insn: str) -> None:
    found = window_findings(_exit([insn]), 0, SIGNAL, per_cpu)
    assert [f.rule for f in found] == [Rule.STORE_TO_WRITE_WINDOW]
    assert found[0].step == 1 and insn in found[0].text


def test_a_per_cpu_access_other_than_scratch_is_a_finding() -> None:
    # the second boundary is at x+2 (pc + 16): next_pc + 0x10 lands on OTHER
    t = _exit([f"mov %gs:{OTHER - (0xFFFFFFFF81000000 + 16):#x}(%rip),%rax"])
    assert [f.rule for f in window_findings(t, 0, SIGNAL, per_cpu)] == [Rule.STORE_TO_WRITE_WINDOW]
    t = _exit([f"mov %gs:{TSS - (0xFFFFFFFF81000000 + 16):#x}(%rip),%rax"])
    assert window_findings(t, 0, SIGNAL, per_cpu) == []


def test_a_far_store_is_a_finding() -> None:
    t = _exit(["mov %rsp,%rdi"] * 9)
    found = window_findings(t, 0, SIGNAL, per_cpu)
    assert [f.rule for f in found] == [Rule.STORE_TO_WRITE_WINDOW]
    assert "9 instructions between" in found[0].text
    assert {f.rule for f in signal_problems(t, 0, SIGNAL)} == {Rule.SIGNAL_0_ON_KERNEL_CR3}


def test_a_truncated_trace_is_judged_up_to_its_end() -> None:
    steps = [("nop", KERNEL, 1), ("movl $0x0,%gs:0x100(%rip)", KERNEL, 1), ("mov %rdi,%cr3", KERNEL, 0)]
    t = _trace(steps)
    t.stopped_because = "max_steps"
    assert signal_problems(t, 0, SIGNAL, complete=False) == []  # its CR3 write comes after the end
    assert [f.rule for f in signal_problems(t, 0, SIGNAL)] == [Rule.SIGNAL_0_ON_KERNEL_CR3]
    wrong = _trace([("nop", KERNEL, 1), ("nop", KERNEL, 0)] + [("nop", KERNEL, 0)] * 9)
    assert signal_problems(wrong, 0, SIGNAL, complete=False)  # too long to be a window


def test_failures_are_classified_for_the_mutant_runner() -> None:
    kernel = Finding(Rule.KERNEL_CR3_BEFORE_SIGNAL, "CR3 became the kernel CR3 with the signal 0", 3, 1)
    premise = Finding(Rule.RIG_PREMISE, "step 4: vCPU 0 moved")
    with pytest.raises(FindingsFailure) as err:
        fail_on([kernel, premise], "the table")
    assert err.value.findings == (kernel, premise)
    assert "[kernel-cr3-before-signal] CR3 became" in str(err.value) and "the table" in str(err.value)
    assert failure_kind(err.value) is FailureKind.FINDING
    assert failure_kind(FindingsFailure([premise])) is FailureKind.RIG_ERROR
    assert failure_kind(AssertionError("a testcase's own check")) is FailureKind.FINDING
    assert failure_kind(GuestError("the gdbstub connection failed")) is FailureKind.RIG_ERROR
    assert failure_kind(GuestError("QEMU exited"), crashed=True) is FailureKind.KERNEL_CRASH
    assert not FailureKind.RIG_ERROR.caught and FailureKind.KERNEL_CRASH.caught
    fail_on([])  # nothing found: no failure
