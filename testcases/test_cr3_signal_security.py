"""The signal's page in the PTI user tables: mapped for every CPU, kernel-only, writable,
NX, alone in its page; and the gate: without nohz_full/isolcpus the signal is never
written and reads 1 ("may be on the kernel CR3", the safe answer) on every CPU."""

from __future__ import annotations

import pytest

from rig.guest import Guest
from rig.machine.sites import SIGNAL
from rig.machine.stops import in_user_mode
from rig.machine.trace import WatchedWord
from rig.machine.x86 import PAGE_SIZE, US
from rig.observe.findings import Finding, Rule, fail_on


def test_signal_page_is_mapped_kernel_only_rw_nx(signal_guest: Guest) -> None:
    problems = []
    for cpu in range(signal_guest.config.smp):
        addr = signal_guest.per_cpu(SIGNAL, cpu)
        t = signal_guest.translate(addr, user_tables=True)
        k = signal_guest.translate(addr, user_tables=False)
        if not t.present:
            problems.append(f"CPU {cpu}: {addr:#x} is not mapped in the PTI user tables")
            continue
        if t.physical != k.physical:
            problems.append(f"CPU {cpu}: user tables map a different frame ({t.physical:#x} vs {k.physical})")
        if t.user or not t.writable or not t.nx:
            problems.append(f"CPU {cpu}: {addr:#x} mapped {t.flags()} (want P RW NX, not US)")
        leaf = t.steps[-1]
        if leaf.entry & US:
            problems.append(
                f"CPU {cpu}: the {leaf.level} entry {leaf.entry:#x} has _PAGE_USER (masked only by "
                "upper levels today)"
            )
    assert not problems, "\n".join(problems)


def test_signal_page_holds_nothing_else(signal_guest: Guest) -> None:
    sym = signal_guest.symbols.address(SIGNAL)
    page = sym & ~(PAGE_SIZE - 1)
    others = [
        f"{name} at {addr:#x}"
        for name, addr in signal_guest.symbols.in_range(page, page + PAGE_SIZE)
        if addr != sym
    ]
    assert not others, f"the page of {SIGNAL} ({page:#x}) also holds: {others[:20]}"


def test_user_write_to_signal_faults(signal_guest: Guest) -> None:
    g = signal_guest
    cpu = g.config.isolated
    addr = g.per_cpu(SIGNAL, cpu)
    out, status = g.shell(f"/bin/poke {cpu} {addr:#x} 0x5a5a5a5a")
    with g.stopped(), g.link() as link:
        value = g.vcpu(1 - cpu if g.config.smp == 2 else 0).read(link, addr, 4)
    assert "CR3RIG-POKE wrote" not in out, f"a user program wrote {SIGNAL}: {out}"
    assert status == 128 + 11, f"poke exited with status {status}, not SIGSEGV: {out}"
    assert value is not None and int.from_bytes(value, "little") != 0x5A5A5A5A


@pytest.mark.cmdline("", isolate=False)
def test_signal_gate_off_without_isolation(signal_guest: Guest) -> None:
    """Booted without nohz_full/isolcpus the housekeeping key is off: no stores at all, and
    every CPU's copy reads 1, through every vCPU, over a whole syscall and after it."""
    g = signal_guest
    cpu = g.config.isolated
    assert "nohz_full" not in g.config.cmdline()
    g.start_workload("syscall-loop", cpu)
    g.break_on(g.symbols.address("entry_SYSCALL_64"), cpu)
    words = [WatchedWord(f"{SIGNAL}[{n}]", g.per_cpu(SIGNAL, n), 4) for n in range(g.config.smp)]
    trace = g.step(cpu, words=words, max_steps=20000, stop=in_user_mode(cpu))
    assert trace.cr3_flips(), "no CR3 switch in the syscall"
    wrong = [
        Finding(
            Rule.SIGNAL_WRITTEN_WHILE_OFF,
            f"step {s.step} at {s.where}: CPU {w.name}'s copy reads {s.words[w.name][n]} through vCPU {n}",
            s.step,
            cpu,
            s.where,
        )
        for s in trace.snapshots
        for w in words
        for n in range(g.config.smp)
        if s.words[w.name][n] != 1
    ]
    fail_on(wrong, "without isolation the signal must read 1 everywhere")
