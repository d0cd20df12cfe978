"""A boot that faulted before its readiness marker, as the session report and JUnit record it.

The guest pool (:mod:`rig.pytestplugin.pool`) boots a configuration once more after a
fault (:func:`rig.pytestplugin.failfast.boot_fault` decides what is one); each fault is a
:class:`BootFault`, so a flaky emulator (the second boot reached the marker) and a broken
kernel (it faulted again) read differently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

__all__ = ["RETRY_BOOTED", "TIMEOUT_BEFORE_INIT", "BootFault"]

#: :attr:`BootFault.kind` of a boot whose timeout ran out before the kernel started init:
#: a hang of the kernel (a lost interrupt, an emulator fault) or a timeout too short.
TIMEOUT_BEFORE_INIT = "timeout before init"
#: :attr:`BootFault.then` of a fault whose configuration booted the next time.
RETRY_BOOTED = "booted again: the second boot reached the readiness marker"


@dataclass(frozen=True)
class BootFault:
    """One boot that faulted before its readiness marker, and what the other boot of its
    configuration did (``then``)."""

    #: the kernel command line of the configuration
    cmdline: str
    #: which boot of the configuration faulted (1: the first; 2: the one made after a fault)
    boot: int
    #: ``kernel crash`` (a panic, oops or BUG on the console), ``triple fault``, ``QEMU exit``
    #: or ``timeout before init`` (the boot timeout ran out before the kernel started init)
    kind: str
    #: one line: the console's panic/oops line, or how QEMU ended
    what: str
    #: the faulting RIP from the console's register dump ("" if the console shows none); of
    #: a hang, where each vCPU was (``vCPU 0 at check_timer+0x3c; vCPU 1 halted at ...``)
    rip: str
    #: the last lines of the serial console
    console_tail: str
    #: what came of it: the second boot reached the marker, faulted too, or failed otherwise
    then: str = ""

    @property
    def flaky(self) -> bool:
        """True if another boot of the same configuration reached the readiness marker."""
        return self.then.startswith(RETRY_BOOTED)

    def line(self) -> str:
        """One line: which boot, what, where, and what came of it."""
        if self.kind == TIMEOUT_BEFORE_INIT:
            where = self.rip or "the vCPUs unread"
        else:
            where = f"RIP {self.rip}" if self.rip else "no RIP on the console"
        return f"boot {self.boot} ({self.cmdline}): {self.kind}: {self.what} ({where}); {self.then}"

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> BootFault:
        text = {k: str(data.get(k, "")) for k in ("cmdline", "kind", "what", "rip", "console_tail", "then")}
        return cls(boot=int(str(data.get("boot", 1))), **text)
