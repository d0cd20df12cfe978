"""Errors the rig raises. Every message is one line naming the problem and the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rig.guest import BootEnd


class RigError(RuntimeError):
    """Base class: a problem the user can act on; ``str(e)`` is a one-line message."""

    #: set on the error of a boot that never reached the readiness marker (rig.guest.Guest.boot)
    boot_end: BootEnd | None = None


class ConfigError(RigError):
    """Bad input: a missing kernel, an impossible option combination, a missing tool."""


class GuestError(RigError):
    """The guest did something unexpected: panic, hang, lost QEMU, unexpected output."""


class GdbError(RigError):
    """GDB answered ``^error`` or died."""
