"""A testcase that steps a syscall and then fails on purpose, run by tests/test_xdist.py
under ``-n 2``: its traces (written by a worker) must be linked from the controller's
one report."""

from __future__ import annotations

from rig.guest import Guest
from rig.machine.stops import in_user_mode


def test_steps_a_syscall_then_fails(pti_guest: Guest) -> None:
    cpu = pti_guest.config.isolated
    pti_guest.start_workload("syscall-loop", cpu)
    pti_guest.break_on(pti_guest.symbols.address("entry_SYSCALL_64"), cpu)
    trace = pti_guest.step(cpu, max_steps=20000, stop=in_user_mode(cpu))
    raise AssertionError(f"deliberate failure after {len(trace.snapshots)} steps (its traces are written)")
