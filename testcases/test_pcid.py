"""The PCID CR3 sites: only a guest with PCID (KVM, ``-cpu host``) runs them.

With PCID on, the PTI CR3 switches do more than flip bit 12 (arch/x86/entry/calling.h):

* the user half of each pair carries the user-PCID bit 11 (``PTI_USER_PCID_MASK``) with
  the same ASID in bits 0-10;
* the kernel CR3 write sets NOFLUSH (bit 63, ``SET_NOFLUSH_BIT`` in ADJUST_KERNEL_CR3);
* the user CR3 write sets NOFLUSH unless this ASID's bit in the per-CPU
  ``user_pcid_flush_mask`` is set (a kernel TLB flush of the user ASID requested it):
  then it clears that bit (``btr``) and writes without NOFLUSH, so the user TLB entries
  are flushed.

NOFLUSH is write-only (CR3 never reads it back), so these tests stop the vCPU *at* the
``mov %reg,%cr3`` and read the value about to be written.

Under TCG there is no PCID (QEMU 7.2 and 10.0 alike): every test here skips, saying the
PCID sites are not covered by that run. They have not been run on KVM by the rig's
authors (no VT-x/AMD-V on their machines): see the README.
"""

from __future__ import annotations

import re

import pytest

from rig.guest import Guest
from rig.machine.stops import in_user_mode
from rig.machine.trace import Trace
from rig.machine.x86 import (
    PTI_USER_PCID_MASK,
    PTI_USER_PGTABLE_MASK,
    X86_CR3_PCID_NOFLUSH,
    X86_CR4_PCIDE,
)
from rig.observe.findings import Finding, Rule, SkipKind, fail_on
from rig.pytestplugin.caseoptions import skip

NOFLUSH = X86_CR3_PCID_NOFLUSH
USER_PCID = PTI_USER_PCID_MASK
USER_PGTABLE = PTI_USER_PGTABLE_MASK
ASID_MASK = 0x7FF
SYSCALL_STEPS = 20000
_MOV_TO_CR3 = re.compile(r"mov\s+%(\w+),\s*%cr3")
#: ``bt %reg, THIS_CPU_user_pcid_flush_mask`` (not ``btr``/``bts``), AT&T as objdump prints it
_BT = re.compile(r"bt\s+%\w+,\s*%gs:")
#: Carry flag: what ``bt`` found.
X86_EFLAGS_CF = 1 << 0
#: SYSRET exits of fault-loop to look at for one that follows a flush (a pass is at most
#: three syscalls: madvise, then munmap and mmap where madvise is ENOSYS).
FLUSH_EXITS = 12


@pytest.fixture
def pcid_guest(pti_guest: Guest, request: pytest.FixtureRequest) -> Guest:
    """The PTI guest with PCID on, or a skip saying the PCID sites are not covered."""
    cpu = pti_guest.config.isolated
    with pti_guest.stopped(), pti_guest.link() as link:
        cr4 = pti_guest.vcpu(cpu).registers(link, ("cr4",)).get("cr4", 0)
    if not cr4 & X86_CR4_PCIDE:
        skip(
            request.node,
            SkipKind.PCID_OFF,
            f"NOT COVERED: PCID is off in this guest (CR4.PCIDE=0, accel={pti_guest.config.accel}; TCG has "
            "no PCID), so the PCID CR3 sites (user-PCID bit 11, NOFLUSH, user_pcid_flush_mask) are not "
            "tested by this run; run with --accel kvm on a VT-x/AMD-V host",
        )
    return pti_guest


def syscall_trace(guest: Guest, workload: str) -> Trace:
    cpu = guest.config.isolated
    guest.start_workload(workload, cpu)
    guest.break_on(guest.symbols.address("entry_SYSCALL_64"), cpu)
    return guest.step(cpu, max_steps=SYSCALL_STEPS, stop=in_user_mode(cpu))


def cr3_write_site(trace: Trace, to_user: bool) -> tuple[int, str]:
    """(pc, source register) of the ``mov %reg,%cr3`` that flips to the user (or kernel) tables."""
    flips = [i for i, side in trace.cr3_flips() if side == to_user]
    assert flips, f"no {'kernel->user' if to_user else 'user->kernel'} CR3 flip in the trace"
    mov = trace.snapshots[flips[-1 if to_user else 0] - 1]
    m = _MOV_TO_CR3.search(mov.insn)
    assert m, f"the CR3 flip is not a mov to %cr3: `{mov.insn}` at {mov.where}"
    return mov.pc, m.group(1)


def value_written_at(guest: Guest, pc: int, register: str) -> int:
    """Run to ``pc`` on the isolated vCPU and read the register the mov writes to CR3."""
    cpu = guest.config.isolated
    guest.break_on(pc, cpu)
    with guest.link() as link:
        regs = guest.vcpu(cpu).registers(link, (register,))
    assert register in regs, f"cannot read %{register}"
    return regs[register]


def test_user_cr3_carries_the_user_pcid_bit(pcid_guest: Guest) -> None:
    trace = syscall_trace(pcid_guest, "syscall-loop")
    cpu = trace.cpu
    problems = []
    asids = set()
    for s in trace.snapshots:
        cr3 = s.cr3[cpu]
        asids.add(cr3 & ASID_MASK)
        if bool(cr3 & USER_PGTABLE) != bool(cr3 & USER_PCID):
            text = f"step {s.step} at {s.where}: CR3 {cr3:#x} has bit 12 and bit 11 disagreeing"
            problems.append(Finding(Rule.CR3_SWITCH, text, s.step, cpu, s.where))
    fail_on(problems)
    assert len(asids) == 1, f"the ASID (bits 0-10) changed over one syscall: {sorted(asids)}"


def test_kernel_cr3_write_sets_noflush(pcid_guest: Guest) -> None:
    pc, reg = cr3_write_site(syscall_trace(pcid_guest, "syscall-loop"), to_user=False)
    value = value_written_at(pcid_guest, pc, reg)
    assert value & NOFLUSH, f"the kernel CR3 write {value:#x} lacks NOFLUSH (bit 63)"
    assert not value & (USER_PCID | USER_PGTABLE), f"the kernel CR3 write {value:#x} keeps user bits"


def test_user_cr3_write_sets_noflush_when_no_flush_is_pending(pcid_guest: Guest) -> None:
    """getppid() flushes nothing: the exit keeps the user TLB (NOFLUSH, user PCID)."""
    pc, reg = cr3_write_site(syscall_trace(pcid_guest, "syscall-loop"), to_user=True)
    value = value_written_at(pcid_guest, pc, reg)
    assert value & USER_PCID and value & USER_PGTABLE, f"the user CR3 write {value:#x} lacks bit 11/12"
    assert value & NOFLUSH, f"the user CR3 write {value:#x} lacks NOFLUSH with no flush pending"


def flush_test_site(trace: Trace) -> int:
    """The pc right after the exit's ``bt %reg, user_pcid_flush_mask`` (its ``jnc``, ``jae``
    in objdump): there CF is the bit ``bt`` found for this ASID, i.e. whether a user-ASID
    flush is pending."""
    flips = [i for i, side in trace.cr3_flips() if side]
    assert flips, "no kernel->user CR3 flip in the trace"
    for i in range(flips[-1] - 1, 0, -1):
        if _BT.match(trace.snapshots[i - 1].insn):
            return trace.snapshots[i].pc
    raise AssertionError(
        "no `bt %reg,%gs:…` (the user_pcid_flush_mask test of SWITCH_TO_USER_CR3) before the user CR3 "
        "write of the SYSRET exit, although PCID is on"
    )


def test_user_cr3_write_flushes_after_user_pcid_flush_mask(pcid_guest: Guest) -> None:
    """A SYSRET exit that finds its ASID's bit set in user_pcid_flush_mask must clear it
    (``btr``) and write the user CR3 without NOFLUSH; one that finds it clear writes with
    NOFLUSH.

    The request comes from fault-loop (guests/initramfs/workloads/fault-loop.c): each pass
    touches 256 pages, then drops them with madvise(MADV_DONTNEED) or, where madvise is
    ENOSYS (reference-7.2's tinyconfig), munmap and mmap. Zapping 256 present pages is a
    flush_tlb_mm_range() over more than tlb_single_page_flush_ceiling (33) pages, so a
    full local flush (arch/x86/mm/tlb.c: flush_tlb_func -> flush_tlb_local ->
    invalidate_user_asid), which sets the bit with or without INVPCID; the madvise that
    fails with ENOSYS and the mmap flush nothing, so their exits keep NOFLUSH. Which exit
    follows a flush is not guessed from the syscall order: each exit is stopped just
    after its ``bt``, where CF is the bit the kernel found, then at its ``mov %reg,%cr3``.
    Exits run until one found the bit set (at most :data:`FLUSH_EXITS`).
    """
    trace = syscall_trace(pcid_guest, "syscall-loop")
    pc, reg = cr3_write_site(trace, to_user=True)
    tested = flush_test_site(trace)
    pcid_guest.kill_workloads()
    cpu = pcid_guest.config.isolated
    pid = pcid_guest.start_workload("fault-loop", cpu)
    seen: list[tuple[bool, int]] = []  # (flush requested, value written) per exit
    for _ in range(FLUSH_EXITS):
        pcid_guest.break_on(tested, cpu)
        with pcid_guest.link() as link:
            flags = pcid_guest.vcpu(cpu).registers(link, ("eflags",))
        assert "eflags" in flags, "cannot read eflags"
        requested = bool(flags["eflags"] & X86_EFLAGS_CF)
        seen.append((requested, value_written_at(pcid_guest, pc, reg)))
        if requested:
            break
    alive = pcid_guest.shell(f"kill -0 {pid}")[1] == 0
    shown = ", ".join(f"{'flush' if r else 'no flush'}: {v:#x}" for r, v in seen)
    for requested, value in seen:
        assert value & USER_PCID and value & USER_PGTABLE, f"a user CR3 write {value:#x} lacks bit 11/12"
        if not requested:
            assert value & NOFLUSH, f"a user CR3 write {value:#x} with no flush requested lacks NOFLUSH"
    assert seen[-1][0], (
        f"{len(seen)} SYSRET exits on vCPU {cpu} while fault-loop ran (alive: {alive}), none found its "
        f"ASID's bit in user_pcid_flush_mask set: fault-loop's zap of 256 pages must request a user-ASID "
        f"flush (exits: {shown})"
    )
    assert not seen[-1][1] & NOFLUSH, (
        f"the user CR3 write {seen[-1][1]:#x} after a user-ASID flush request keeps NOFLUSH: the "
        f"user_pcid_flush_mask request was lost (exits: {shown})"
    )
