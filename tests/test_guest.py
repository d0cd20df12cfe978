"""The rig against a real booted kernel (Debian's stock kernel): walker, relay, stepping."""

from __future__ import annotations

import re

import pytest

from rig.errors import GuestError
from rig.guest import Guest
from rig.machine.stepper import Stepper
from rig.machine.stops import in_user_mode
from rig.machine.trace import Snapshot, WatchedWord
from rig.machine.vcpu import thread_id
from rig.observe.checks import frozen_violations
from rig.observe.findings import Rule


@pytest.mark.parametrize(
    "symbol", ["entry_SYSCALL_64", "linux_banner", "__per_cpu_offset", "init_task", "_text"]
)
def test_page_walker_agrees_with_qemu_gva2gpa(booted: Guest, symbol: str) -> None:
    addr = booted.symbols.address(symbol)
    with booted.stopped():
        # vCPU 0 idles in the kernel: its CR3 is the kernel PGD of some mm
        ours = booted.translate(addr, user_tables=False, cpu=0)
        booted.machine.hmp("cpu 0")
        text = booted.machine.hmp(f"gva2gpa {addr:#x}")
    m = re.search(r"gpa: (0x[0-9a-f]+)", text)
    assert m, f"QEMU said {text!r}"
    assert ours.present and ours.physical == int(m.group(1), 16), (
        f"walker {ours.physical} vs QEMU {m.group(1)} for {symbol}: {ours.steps}"
    )


def test_walker_reports_not_present_like_qemu(booted: Guest) -> None:
    addr = 0xFFFF_8880_0000_0000 - 0x1000_0000_0000  # a hole below the direct map
    with booted.stopped():
        ours = booted.translate(addr, user_tables=False, cpu=0)
        booted.machine.hmp("cpu 0")
        text = booted.machine.hmp(f"gva2gpa {addr:#x}")
    assert not ours.present and "Unmapped" in text, text


def test_gdb_sees_the_truth_after_the_raw_link(booted: Guest) -> None:
    """After stepping on the borrowed link, GDB's own register reads match the raw ones."""
    cpu = booted.config.isolated
    pid = booted.start_workload("syscall-loop", cpu)
    try:
        booted.break_on(booted.symbols.address("entry_SYSCALL_64"), cpu)
        trace = booted.step(cpu, max_steps=25)
        last = trace.snapshots[-1]
        out = booted.gdb.command(f"-data-evaluate-expression --thread {cpu + 1} $pc").payload  # type: ignore[union-attr]
        assert int(out["value"].split()[0], 16) == last.pc
        # and GDB's current thread selection still reaches the other vCPU correctly
        other = 1 - cpu if booted.config.smp == 2 else 0
        out = booted.gdb.command(f"-data-evaluate-expression --thread {other + 1} $pc").payload  # type: ignore[union-attr]
        assert int(out["value"].split()[0], 16) == last.rip[other]
    finally:
        booted.stop_workload(pid)


def test_stepping_moves_only_the_stepped_vcpu(booted: Guest) -> None:
    cpu = booted.config.isolated
    pid = booted.start_workload("syscall-loop", cpu)
    try:
        booted.break_on(booted.symbols.address("entry_SYSCALL_64"), cpu)
        tss = WatchedWord("tss", booted.per_cpu("cpu_tss_rw", cpu), 8)
        trace = booted.step(cpu, words=[tss], max_steps=200)
    finally:
        booted.stop_workload(pid)
    assert len({s.pc for s in trace.snapshots}) > 50, "the stepped vCPU did not move"
    assert not frozen_violations(trace)
    # the sibling (kernel CR3) always reads the isolated CPU's TSS word
    sib = 1 - cpu if booted.config.smp == 2 else 0
    assert all(s.words["tss"][sib] is not None for s in trace.snapshots)
    assert trace.snapshots[0].insn == "swapgs"
    assert trace.snapshots[0].where == "entry_SYSCALL_64"


def test_pipelined_checked_and_foreseen_stepping_give_the_same_trace(booted: Guest) -> None:
    """Without a stop condition the Stepper pipelines each step with the reads before it;
    with an opaque one it reads, decides, then steps; with in_user_mode it pipelines after
    the instructions the condition foresees. Same path, same boundaries, same words."""
    cpu = booted.config.isolated
    other = 1 - cpu if booted.config.smp == 2 else 0
    tss = WatchedWord("tss", booted.per_cpu("cpu_tss_rw", cpu), 8)
    pid = booted.start_workload("syscall-loop", cpu)
    traces = []
    try:
        for stop in (None, lambda s: False, in_user_mode(cpu)):
            booted.break_on(booted.symbols.address("entry_SYSCALL_64"), cpu)
            stepper = Stepper(booted.regmap, booted.config.smp, cpu, [tss])
            with booted.link() as link:
                traces.append(stepper.run(link, max_steps=150, stop=stop))
    finally:
        booted.stop_workload(pid)
    a, b, c = traces
    assert [(s.rip[cpu], s.cr3[cpu], s.words) for s in a.snapshots] == [
        (s.rip[cpu], s.cr3[cpu], s.words) for s in b.snapshots
    ]
    assert a.code == b.code and len(a.code) > 50
    assert all(a.snapshots[0].rip[other] == s.rip[other] for s in a.snapshots)
    assert not frozen_violations(a) and not frozen_violations(b) and not frozen_violations(c)
    # the foreseen run: the same boundaries up to where it stopped (back in user mode, or 150)
    assert [(s.rip[cpu], s.cr3[cpu], s.words) for s in c.snapshots] == [
        (s.rip[cpu], s.cr3[cpu], s.words) for s in a.snapshots[: len(c.snapshots)]
    ]
    steps = len(c.snapshots) - 1
    assert b.steps_ahead == 0 and a.steps_ahead == 149
    assert steps / 2 < c.steps_ahead < steps, f"{c.steps_ahead} of {steps} steps rode with the reads"


class _Misforeseeing:
    """A stop condition that holds at step 20 but claims no instruction can make it hold."""

    def __call__(self, s: Snapshot) -> bool:
        return s.step == 20

    def may_hold_after(self, cpu: int, pc: int, code: bytes) -> bool:
        return False


def test_a_wrong_foresight_ends_the_run_in_an_error_not_an_overshoot(booted: Guest) -> None:
    """A :class:`ForeseeingStop` that is wrong would let the vCPU run one step past where
    the condition held: the Stepper says so and names the instruction, and the link stays
    usable (the next run works)."""
    cpu = booted.config.isolated
    pid = booted.start_workload("syscall-loop", cpu)
    try:
        booted.break_on(booted.symbols.address("entry_SYSCALL_64"), cpu)
        stepper = Stepper(booted.regmap, booted.config.smp, cpu)
        with booted.link() as link:
            with pytest.raises(GuestError, match=r"holds at step 20 .* it foresaw could not make it hold"):
                stepper.run(link, max_steps=100, stop=_Misforeseeing())
            again = stepper.run(link, max_steps=5)
    finally:
        booted.stop_workload(pid)
    assert len(again.snapshots) == 6 and not frozen_violations(again)


def test_a_frozen_vcpu_that_moved_is_reported(booted: Guest) -> None:
    """The frozen vCPUs' rip/CR3 are read at the first and last boundary only: a change
    in between (here: the test moves the sibling's rip through the gdbstub) still shows."""
    cpu = booted.config.isolated
    other = 1 - cpu if booted.config.smp == 2 else 0
    rip = booted.regmap.numbers["rip"]
    pid = booted.start_workload("syscall-loop", cpu)
    try:
        booted.break_on(booted.symbols.address("entry_SYSCALL_64"), cpu)
        with booted.link() as link:
            original = booted.vcpu(other).registers(link, ("rip",))["rip"]

            def move_sibling(snap: Snapshot) -> None:
                if snap.step == 10:
                    moved = (original + 1).to_bytes(8, "little").hex()
                    assert link.transact([f"Hg{thread_id(other)}", f"P{rip:x}={moved}"])[1] == "OK"

            stepper = Stepper(booted.regmap, booted.config.smp, cpu)
            try:
                trace = stepper.run(link, max_steps=20, on_step=move_sibling)
            finally:
                back = original.to_bytes(8, "little").hex()
                link.transact([f"Hg{thread_id(other)}", f"P{rip:x}={back}"])
    finally:
        booted.stop_workload(pid)
    moved = frozen_violations(trace)
    cr3 = trace.snapshots[0].cr3[other]
    assert trace.snapshots[-1].rip[other] == original + 1
    rips = f"rip {original:#x}->{original + 1:#x}"
    assert [(f.rule, f.text) for f in moved] == [
        (Rule.RIG_PREMISE, f"step 20: vCPU {other} moved: {rips} cr3 {cr3:#x}->{cr3:#x}")
    ]
