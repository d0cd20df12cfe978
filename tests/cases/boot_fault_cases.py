"""Boots that fault, run by tests/test_boot_faults.py as a child pytest session.

Not collected by ``pytest tests/``. Its QEMU (``--qemu``, a wrapper of the test's)
makes the first boot of the default configuration fault (a program that QEMU 7.2's TCG
faults runs before the readiness marker, with ``oops=panic``) and SIGKILLs itself in
the first boot of :data:`KILLED`: each must boot on the second try. The configuration
of :data:`PANIC` faults on every boot: booted twice, then failed, and not booted again
for the next test.
"""

from __future__ import annotations

import pytest

from rig.guest import Guest

#: a parameter the kernel ignores; the wrapper kills QEMU in the first boot that has it
KILLED = "cr3rig.test=killed"
#: no init at all: the kernel panics at every boot.
PANIC = "rdinit=/nonexistent root=/dev/nonexistent"


def test_default_boots(guest: Guest) -> None:
    assert guest.release


@pytest.mark.cmdline(KILLED)
def test_killed_qemu_boots_again(guest: Guest) -> None:
    assert KILLED in guest.config.cmdline()


@pytest.mark.cmdline(PANIC)
def test_panic_1(guest: Guest) -> None:
    raise AssertionError("unreachable: this configuration does not boot")


@pytest.mark.cmdline(PANIC)
def test_panic_2(guest: Guest) -> None:
    raise AssertionError("unreachable: this configuration does not boot")
