"""Errors the rig raises. Every message is one line naming the problem and the fix."""


class RigError(RuntimeError):
    """Base class: a problem the user can act on; ``str(e)`` is a one-line message."""


class ConfigError(RigError):
    """Bad input: a missing kernel, an impossible option combination, a missing tool."""


class GuestError(RigError):
    """The guest did something unexpected: panic, hang, lost QEMU, unexpected output."""


class GdbError(RigError):
    """GDB answered ``^error`` or died."""
