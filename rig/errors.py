"""Errors the rig raises. Every message is one line naming the problem and the fix."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BootEnd", "ConfigError", "GdbError", "GuestError", "RigError"]


@dataclass(frozen=True)
class BootEnd:
    """How a boot that never reached the readiness marker ended, seen before its guest
    was closed (``RigError.boot_end`` of the error ``rig.guest.Guest.boot`` raised)."""

    #: Console lines kept (an oops with its call trace is 40-80 lines).
    LINES = 80

    #: QEMU's exit (status, last stderr line, triple fault) if it ended by itself, else None
    qemu_exit: str | None
    #: QEMU logged a triple fault (``-d cpu_reset``)
    triple_fault: bool
    #: the last :attr:`LINES` lines of the serial console
    console: str
    #: a boot that timed out with QEMU running: the kernel's boot state
    #: (``SYSTEM_SCHEDULING``; "" if it did not time out or was not read)
    hang_state: str = ""
    #: and where each vCPU was (``vCPU 0 at check_timer+0x3c; vCPU 1 halted at ...``)
    hang_where: str = ""
    #: that hang was the kernel's own: it had not started init yet
    hung_before_init: bool = False

    def tail(self, lines: int) -> str:
        """The last ``lines`` lines of :attr:`console`."""
        return "\n".join(self.console.splitlines()[-lines:])


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
