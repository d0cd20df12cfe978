"""Faults in the middle of a test, run by tests/test_faults.py as a child pytest session.

Not collected by ``pytest tests/`` (the file name does not match ``test_*.py``). Each
``test_fault_*`` makes one thing break while it runs and is expected to FAIL with a
one-line diagnosis; the ``test_after_*`` that follows must PASS on a fresh guest.
"""

from __future__ import annotations

import os
import signal

from rig.guest import Guest
from rig.machine.vcpu import thread_id

#: QEMU processes of the guests that were broken on purpose (the next test must not get one).
_BROKEN: set[int] = set()


def _qemu_pid(guest: Guest) -> int:
    assert guest.machine.proc is not None
    return guest.machine.proc.pid


def _works(guest: Guest) -> None:
    """A fresh guest: not one broken before, and it breaks and steps on a syscall."""
    assert _qemu_pid(guest) not in _BROKEN, "the test got the broken guest again"
    cpu = guest.config.isolated
    guest.start_workload("syscall-loop", cpu)
    guest.break_on(guest.symbols.address("entry_SYSCALL_64"), cpu)
    trace = guest.step(cpu, max_steps=50)
    assert len(trace.snapshots) == 51


def test_fault_qemu_killed(guest: Guest) -> None:
    _BROKEN.add(_qemu_pid(guest))
    guest.start_workload("syscall-loop")
    os.kill(_qemu_pid(guest), signal.SIGKILL)
    guest.break_on(guest.symbols.address("entry_SYSCALL_64"), guest.config.isolated)


def test_after_qemu_killed(guest: Guest) -> None:
    _works(guest)


def test_fault_gdb_killed(guest: Guest) -> None:
    _BROKEN.add(_qemu_pid(guest))
    assert guest.gdb is not None
    os.kill(guest.gdb.proc.pid, signal.SIGKILL)
    guest.break_on(guest.symbols.address("entry_SYSCALL_64"), guest.config.isolated)


def test_after_gdb_killed(guest: Guest) -> None:
    _works(guest)


def test_fault_console_closed(guest: Guest) -> None:
    _BROKEN.add(_qemu_pid(guest))
    # QEMU swaps the serial port's backend for a null one: it closes our console connection
    guest.machine.qmp("chardev-change", id="con0", backend={"type": "null", "data": {}})
    guest.shell("uname -r")


def test_after_console_closed(guest: Guest) -> None:
    _works(guest)


def test_fault_step_never_returns(guest: Guest) -> None:
    """QEMU stops answering (SIGSTOP) just before a step: the wait for the step's reply
    must end (the link's reply timeout), not hang the session."""
    _BROKEN.add(_qemu_pid(guest))
    cpu = guest.config.isolated
    guest.start_workload("syscall-loop", cpu)
    guest.break_on(guest.symbols.address("entry_SYSCALL_64"), cpu)
    assert guest.relay is not None
    guest.relay.reply_timeout = 3.0
    os.kill(_qemu_pid(guest), signal.SIGSTOP)
    guest.step(cpu, max_steps=10)


def test_after_step_never_returns(guest: Guest) -> None:
    _works(guest)


def test_fault_triple_fault_while_stepped(guest: Guest) -> None:
    """CR3 pointed at a zeroed page: the next fetch faults, so does the delivery of the
    fault and of the double fault: the CPU resets (and -no-reboot ends QEMU)."""
    _BROKEN.add(_qemu_pid(guest))
    cpu = guest.config.isolated
    zero = guest.translate(guest.symbols.address("empty_zero_page"), user_tables=False).physical
    assert zero is not None
    guest.start_workload("syscall-loop", cpu)
    guest.break_on(guest.symbols.address("entry_SYSCALL_64"), cpu)
    guest.step(cpu, max_steps=3)
    with guest.link() as link:  # write CR3 of the stepped vCPU (P packet)
        write = f"P{guest.regmap.numbers['cr3']:x}={zero.to_bytes(8, 'little').hex()}"
        reply = link.transact([f"Hg{thread_id(cpu)}", write])
    assert reply[1] == "OK", reply
    guest.step(cpu, max_steps=10)


def test_after_triple_fault(guest: Guest) -> None:
    _works(guest)


def test_fault_panic_while_stepped(guest: Guest) -> None:
    """The isolated vCPU is stepped into ``panic()`` (sysrq crash), then let run: the
    kernel panics and (panic=-1, -no-reboot) QEMU ends."""
    _BROKEN.add(_qemu_pid(guest))
    cpu = guest.config.isolated
    assert guest.console is not None
    console = guest.console

    def crash() -> None:
        console.send(f"taskset -c {cpu} sh -c 'echo c > /proc/sysrq-trigger'")

    guest.break_on(guest.symbols.address("sysrq_handle_crash"), cpu, trigger=crash)
    guest.step(cpu, max_steps=200)
    guest.shell("true")


def test_after_panic(guest: Guest) -> None:
    _works(guest)
