"""Boots that fail, run by tests/test_boot_failures.py as a child pytest session.

Not collected by ``pytest tests/``. Three tests need a configuration that hangs at boot
and two one that panics: each configuration must be booted once, the later tests
erroring at once with the same line; the default configuration still boots.
"""

from __future__ import annotations

import pytest

from rig.guest import Guest

#: init is a shell: the guest never prints the readiness marker (a boot that hangs).
HANG = "rdinit=/bin/sh"
#: no init at all: the kernel panics at boot.
PANIC = "rdinit=/nonexistent root=/dev/nonexistent"


def test_default_boots(guest: Guest) -> None:
    assert guest.release


@pytest.mark.cmdline(HANG)
def test_hang_1(guest: Guest) -> None:
    raise AssertionError("unreachable: this configuration does not boot")


@pytest.mark.cmdline(HANG)
def test_hang_2(guest: Guest) -> None:
    raise AssertionError("unreachable: this configuration does not boot")


@pytest.mark.cmdline(HANG)
def test_hang_3(guest: Guest) -> None:
    raise AssertionError("unreachable: this configuration does not boot")


@pytest.mark.cmdline(PANIC)
def test_panic_1(guest: Guest) -> None:
    raise AssertionError("unreachable: this configuration does not boot")


@pytest.mark.cmdline(PANIC)
def test_panic_2(guest: Guest) -> None:
    raise AssertionError("unreachable: this configuration does not boot")
