"""A rig error in a test, run by tests/test_faults.py as a child session (no guest, no
boot): its report is one line unless ``--tb=long`` asks for the traceback."""

from __future__ import annotations

from rig.errors import GuestError


def _deep_in_the_rig() -> None:
    raise GuestError("QEMU is gone: QEMU exited with signal 9 (SIGKILL)")


def test_rig_error() -> None:
    _deep_in_the_rig()
