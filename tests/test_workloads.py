"""The entry-path workloads reach their CR3 switch sites on the default kernel.

Boots the reference-7.2 kernel (PTI on, IA32 emulation) under TCG ``-cpu max``
once and, for each workload, stops the isolated vCPU where only that workload's
path goes, single-steps it and checks which instruction moves CR3 between the
user and the kernel page tables:

* ``bad-iret-loop``: an IRETQ to user mode faults (#GP) and error_entry switches
  to the kernel CR3 on its ``.Lerror_bad_iret`` path, not on its from-user path;
* ``compat-sysenter-loop``: SYSENTER enters at entry_SYSENTER_compat, the return
  goes through SYSRETL at entry_SYSRETL_compat_unsafe_stack;
* ``compat-syscall-loop``: 32-bit SYSCALL enters at entry_SYSCALL_compat, returns
  through entry_SYSRETL_compat_unsafe_stack;
* ``compat-int80-loop``: int $0x80 enters at asm_int80_emulation, whose switch is
  error_entry's from-user one;
* ``compat-sysenter-tf-loop`` (on vCPU 0): SYSENTER with EFLAGS.TF set raises #DB
  in kernel mode at the start of entry_SYSENTER_compat, on the user CR3; the #DB
  returns through paranoid_exit, whose PARANOID_RESTORE_CR3 writes the user CR3
  back before the IRETQ to entry_SYSENTER_compat.

The site of each switch is printed as ``symbol+offset address`` with the time
break_on took (run with ``-s`` to see it).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rig.guest import Guest
from rig.machine.sites import find_sites
from rig.machine.stops import in_user_mode, on_kernel_tables
from rig.machine.trace import Snapshot, Trace
from rig.supply.initramfs import COMPAT_WORKLOADS
from testcases.test_cr3_signal import EXITS_TO_USER
from tests.conftest import reference_config

#: The default kernel of the rig (PTI, CONFIG_IA32_EMULATION).
KERNEL = "reference-7.2"
#: Instructions allowed from an entry point to its CR3 switch.
ENTRY_STEPS = 80
#: Instructions allowed from the SYSRETL CR3 switch back to user mode.
EXIT_STEPS = 20
#: Breakpoint hits to look through for one IRET that faults (3 IRETs per loop).
BAD_IRET_TRIES = 12
#: Instructions allowed from paranoid_exit back to the code the #DB interrupted.
PARANOID_EXIT_STEPS = 60


@pytest.fixture(scope="module")
def ref_guest() -> Iterator[Guest]:
    config = reference_config(KERNEL)
    g = Guest.boot(config)
    try:
        if not g.pti_enabled:
            pytest.fail(f"{KERNEL} booted without PTI (cmdline: {config.cmdline()})")
        yield g
    finally:
        g.close()


@pytest.fixture
def wl_guest(ref_guest: Guest) -> Iterator[Guest]:
    ref_guest.traces.clear()
    yield ref_guest
    ref_guest.kill_workloads()


@dataclass(frozen=True)
class Switch:
    """One CR3 write seen in a trace: where it is and which way it went."""

    where: str
    address: int
    to_user: bool


def switches(trace: Trace) -> list[Switch]:
    """The CR3 writes of ``trace``: the instruction before each change of table side."""
    out = []
    for i, to_user in trace.cr3_flips():
        before: Snapshot = trace.snapshots[i - 1]
        assert "cr3" in before.insn, f"CR3 changed after {before.where}: {before.insn}"
        out.append(Switch(before.where, before.pc, to_user))
    return out


def timed_break(guest: Guest, symbol: str, cpu: int) -> float:
    """Break on ``symbol`` on vCPU ``cpu``; return the seconds it took."""
    start = time.perf_counter()
    guest.break_on(guest.symbols.address(symbol), cpu, timeout=60)
    return time.perf_counter() - start


def entry_switch(guest: Guest, cpu: int, entry: str) -> Switch:
    """Break on ``entry`` (coming from user mode) and step to the switch to the kernel CR3."""
    seconds = timed_break(guest, entry, cpu)
    trace = guest.step(cpu, max_steps=ENTRY_STEPS, stop=on_kernel_tables(cpu))
    assert trace.snapshots[0].user_tables(cpu), f"{entry} was entered on the kernel CR3"
    assert trace.stopped_because == "condition", f"no CR3 switch within {ENTRY_STEPS} steps of {entry}"
    (switch,) = switches(trace)
    assert not switch.to_user
    print(f"{entry}: user->kernel CR3 at {switch.where} {switch.address:#x} (break {seconds:.3f} s)")
    return switch


def sysretl_switch(guest: Guest, cpu: int) -> Switch:
    """Break on the SYSRETL exit and step back to user mode; return its switch to the user CR3."""
    exit_symbol = "entry_SYSRETL_compat_unsafe_stack"
    seconds = timed_break(guest, exit_symbol, cpu)
    trace = guest.step(cpu, max_steps=EXIT_STEPS, stop=in_user_mode(cpu))
    assert trace.stopped_because == "condition", f"not back in user mode {EXIT_STEPS} steps after SYSRETL"
    assert trace.snapshots[-2].insn.startswith("sysretl"), trace.snapshots[-2].insn
    (switch,) = switches(trace)
    assert switch.to_user
    print(f"{exit_symbol}: kernel->user CR3 at {switch.where} {switch.address:#x} (break {seconds:.3f} s)")
    return switch


def test_compat_sysenter(wl_guest: Guest) -> None:
    guest = wl_guest
    cpu = guest.config.isolated
    guest.start_workload("compat-sysenter-loop", cpu)
    assert entry_switch(guest, cpu, "entry_SYSENTER_compat").where.startswith("entry_SYSENTER_compat+")
    assert sysretl_switch(guest, cpu).where.startswith("entry_SYSRETL_compat_unsafe_stack+")


def test_compat_syscall(wl_guest: Guest) -> None:
    guest = wl_guest
    cpu = guest.config.isolated
    guest.start_workload("compat-syscall-loop", cpu)
    assert entry_switch(guest, cpu, "entry_SYSCALL_compat").where.startswith("entry_SYSCALL_compat+")
    assert sysretl_switch(guest, cpu).where.startswith("entry_SYSRETL_compat_unsafe_stack+")


def from_user_error_entry_switch(guest: Guest, cpu: int) -> Switch:
    """error_entry's switch for an exception from user mode, via int $0x80."""
    guest.start_workload("compat-int80-loop", cpu)
    switch = entry_switch(guest, cpu, "asm_int80_emulation")
    guest.kill_workloads()
    return switch


def test_compat_int80(wl_guest: Guest) -> None:
    guest = wl_guest
    switch = from_user_error_entry_switch(guest, guest.config.isolated)
    assert switch.where.startswith("error_entry+")


def test_bad_iret(wl_guest: Guest) -> None:
    guest = wl_guest
    cpu = guest.config.isolated
    normal = from_user_error_entry_switch(guest, cpu)
    guest.start_workload("bad-iret-loop", cpu)
    gp = guest.symbols.address("asm_exc_general_protection")
    start = time.perf_counter()
    hits = 0
    for _ in range(BAD_IRET_TRIES):
        hits += 1
        timed_break(guest, "native_irq_return_iret", cpu)
        trace = guest.step(cpu, max_steps=ENTRY_STEPS, stop=on_kernel_tables(cpu))
        if trace.snapshots[1].pc == gp:  # this IRETQ faulted
            break
        guest.traces.pop()
    else:
        raise AssertionError(f"none of {BAD_IRET_TRIES} IRETQs on vCPU {cpu} faulted")
    seconds = time.perf_counter() - start
    assert trace.snapshots[0].user_tables(cpu), "the faulting IRETQ ran on the kernel CR3"
    assert trace.stopped_because == "condition", "no switch to the kernel CR3 after the #GP"
    (switch,) = switches(trace)
    print(
        f"bad IRET: user->kernel CR3 at {switch.where} {switch.address:#x} "
        f"({hits} IRETQ hits, {seconds:.3f} s; from-user switch is {normal.where})"
    )
    assert switch.where.startswith("error_entry+")
    assert switch.address != normal.address, "took error_entry's from-user switch, not .Lerror_bad_iret's"


def test_compat_sysenter_tf(wl_guest: Guest) -> None:
    """A #DB from kernel mode on the user CR3 returns through paranoid_exit's CR3 write.

    Runs on vCPU 0 (a paranoid exit is not tied to the isolated vCPU). The sites are
    paranoid_exit's CR3 write and signal stores as :func:`find_sites` lists them in
    the vmlinux; each must be hit by vCPU 0 and return to entry_SYSENTER_compat, the
    code the #DB interrupted; the CR3 write must load the user CR3 there.
    """
    guest = wl_guest
    cpu = 0
    assert guest.config.vmlinux is not None
    sites = [s for s in find_sites(guest.config.vmlinux, guest.symbols) if s.function == "paranoid_exit"]
    (write,) = [s for s in sites if s.kind == "cr3-write"]
    pid = guest.start_workload("compat-sysenter-tf-loop", cpu)
    start = guest.symbols.address("entry_SYSENTER_compat")
    sysenter = range(start, guest.symbols.address("__end_entry_SYSENTER_compat"))

    def back_in_sysenter(s: Snapshot) -> bool:
        return s.pc in sysenter

    for site in sorted(sites, key=lambda s: s.kind != "cr3-write"):
        begin = time.perf_counter()
        guest.break_on(site.address, cpu, timeout=60)
        seconds = time.perf_counter() - begin
        trace = guest.step(cpu, max_steps=PARANOID_EXIT_STEPS, stop=back_in_sysenter)
        assert trace.stopped_because == "condition", (
            f"{site.where} did not return to entry_SYSENTER_compat within {PARANOID_EXIT_STEPS} steps"
        )
        back = trace.snapshots[-1]
        flips = switches(trace)
        if site is write:
            assert not trace.snapshots[0].user_tables(cpu), f"{site.where} ran on the user CR3"
            assert flips == [Switch(site.where, site.address, to_user=True)], flips
            assert back.user_tables(cpu), f"returned to {back.where} on the kernel CR3"
            what = "kernel->user CR3"
        else:
            what = f"signal store, then {len(flips)} CR3 writes,"
        print(f"{what} at {site.where} {site.address:#x} (break {seconds:.3f} s; back to {back.where})")
    # Still looping: every getpid() returned the pid and brought exactly one SIGTRAP.
    out, status = guest.shell(f"kill -0 {pid}")
    assert status == 0, f"compat-sysenter-tf-loop (pid {pid}) is gone: {out}"


# --------------------------------------------------------------------------
# The 32-bit binaries on the host (no guest): their freestanding start-up code.


@pytest.fixture(scope="module")
def compat_binaries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 32-bit workloads, compiled the way the initramfs compiles them."""
    from rig.supply import initramfs

    out = tmp_path_factory.mktemp("compat")
    cc = initramfs._find_cc("gcc")
    for name in COMPAT_WORKLOADS:
        src = initramfs.SOURCE_DIR / "workloads" / f"{name}.c"
        subprocess.run(
            [cc, *initramfs.COMPAT_CFLAGS, "-o", str(out / name), str(src)],
            check=True,
            capture_output=True,
            timeout=120,
        )
    return out


@pytest.mark.parametrize("name", COMPAT_WORKLOADS)
def test_compat_usage_errors(compat_binaries: Path, name: str) -> None:
    exe = str(compat_binaries / name)
    try:
        usage = subprocess.run([exe], capture_output=True, text=True, timeout=10)
    except OSError as exc:  # ENOEXEC: this host kernel runs no 32-bit programs
        pytest.skip(f"host kernel cannot run i386 programs (CONFIG_IA32_EMULATION off?): {exc}")
    assert (usage.returncode, usage.stdout, usage.stderr) == (2, "", f"usage: {name} <cpu>\n")
    bad = subprocess.run([exe, "12x"], capture_output=True, text=True, timeout=10)
    assert (bad.returncode, bad.stderr) == (2, f"{name}: bad cpu number 12x\n")


def test_timer_spin_takes_timer_interrupts_from_user_mode_on_a_nohz_full_cpu(wl_guest: Guest) -> None:
    """timer-spin's interval timer interrupts it in user mode on the isolated (nohz_full)
    CPU, where user-spin's tick stops: the exploration's interrupt window arrives there.
    Each stop lets the guest's clock run on, so the interrupt after a stop is often due at
    once, in kernel mode: as the testcases do, such a hit is run back to user mode first."""
    cpu = wl_guest.config.isolated
    nohz, _ = wl_guest.shell("cat /sys/devices/system/cpu/nohz_full")
    assert nohz.strip() == str(cpu), nohz
    wl_guest.start_workload("timer-spin", cpu)
    exits = [wl_guest.symbols.address(n) for n in EXITS_TO_USER]
    modes = []
    for _ in range(8):
        seconds = timed_break(wl_guest, "asm_sysvec_apic_timer_interrupt", cpu)
        assert seconds < 5, f"{seconds:.2f} s to the next timer interrupt"
        user = wl_guest.step(cpu, max_steps=0).snapshots[0].user_tables(cpu)
        modes.append("user" if user else "kernel")
        if user:
            break
        wl_guest.break_on(exits, cpu)  # back to user mode before the next hit
        wl_guest.step(cpu, max_steps=400, stop=in_user_mode(cpu))
    assert "user" in modes, modes


def test_timer_spin_interrupts_come_from_its_own_cpus_local_timer(wl_guest: Guest) -> None:
    """timer-spin keeps the nohz_full CPU's own tick running (its CPU-time timer is a tick
    dependency): about 250 local timer interrupts in one second of guest time at HZ=250,
    where a spinning task alone there gets its residual tick (a few a second)."""
    cpu = wl_guest.config.isolated
    wl_guest.start_workload("timer-spin", cpu)
    col = cpu + 2  # /proc/interrupts: "LOC:", then one column per CPU
    out, _ = wl_guest.shell(
        f"a=$(awk '$1 == \"LOC:\" {{print ${col}}}' /proc/interrupts); sleep 1; "
        f"b=$(awk '$1 == \"LOC:\" {{print ${col}}}' /proc/interrupts); "
        "echo $((b - a))"
    )
    local = out.strip()
    assert int(local) >= 100, f"{local} local timer interrupts on CPU {cpu} in one second"


def test_every_workload_is_killed_by_one_command(wl_guest: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill_workloads ends every workload with one shell command (each command is a
    round trip through a shell sharing its CPU with them: the watch testcase's 17
    workloads took 5.4 s to kill one by one), and none is left."""
    g = wl_guest
    pids = [g.start_workload(name, cpu) for cpu in (0, 1) for name in ("syscall-loop", "iret-loop")]
    console = g.console
    assert console is not None
    commands: list[str] = []
    run = console.run
    monkeypatch.setattr(console, "run", lambda c, t=30.0: commands.append(c) or run(c, t))
    g.kill_workloads()
    monkeypatch.undo()
    assert len(commands) == 1, f"kill_workloads typed {len(commands)} commands: {commands}"
    left, _ = g.shell(f"for p in {' '.join(map(str, pids))}; do [ -d /proc/$p ] && echo $p; done; true")
    assert left == "", f"workloads still running after kill_workloads: {left}"
    assert g.userspace.workloads == {}
