"""Where a boot that hung was: the kernel's boot state and each vCPU's place, read through
the gdbstub before the guest is closed.

A boot that never printed its readiness marker, with QEMU still running at the boot
timeout, is one of two things. Either the kernel finished booting and user space never
said it was ready (a wrong ``rdinit=``, an initramfs without the rig's init): that is the
same on every boot. Or the kernel itself stopped before it started init (a lost
interrupt, a vCPU spinning on a lock, an emulator fault): that is what a second boot
can tell apart from a broken kernel. The kernel's ``system_state`` says which:
``SYSTEM_RUNNING`` is set just before init runs (``kernel_init`` in init/main.c).
"""

from __future__ import annotations

from dataclasses import dataclass

from rig.guest.runcontrol import RunControl
from rig.machine.symbols import SymbolTable

__all__ = ["SYSTEM_RUNNING", "HungBoot", "sample_hung_boot"]

#: ``enum system_states`` (include/linux/kernel.h): BOOTING, SCHEDULING, FREEING_INITMEM,
#: then RUNNING, set just before the kernel runs init.
SYSTEM_RUNNING = 3
_STATES = ("SYSTEM_BOOTING", "SYSTEM_SCHEDULING", "SYSTEM_FREEING_INITMEM", "SYSTEM_RUNNING")
#: The x86 HLT opcode: a halted vCPU's rip is just past it.
_HLT = 0xF4


@dataclass(frozen=True)
class HungBoot:
    """What a hung boot was doing when the boot timeout ran out."""

    #: the kernel's ``system_state`` (None: unread, e.g. no vmlinux symbols)
    system_state: int | None
    #: one entry per vCPU: ``vCPU 0 at check_timer+0x3c`` or ``vCPU 1 halted at ...``
    vcpus: tuple[str, ...]

    @property
    def before_init(self) -> bool:
        """True if the kernel provably had not started init: a kernel hang, not user space's."""
        return self.system_state is not None and self.system_state < SYSTEM_RUNNING

    def state(self) -> str:
        """The boot state's name (``SYSTEM_SCHEDULING``)."""
        if self.system_state is None:
            return "system_state unread"
        if self.system_state < len(_STATES):
            return _STATES[self.system_state]
        return f"system_state {self.system_state}"

    def where(self) -> str:
        """Where each vCPU was, ``; ``-separated."""
        return "; ".join(self.vcpus)


def sample_hung_boot(run: RunControl, symbols: SymbolTable | None, smp: int) -> HungBoot:
    """Stop the guest and read its boot state and each vCPU's rip (and whether it is
    halted) over the raw link. ``symbols``: the vmlinux's, or None (then the state is
    unread and rips are hex).

    Raises:
        GuestError: GDB or QEMU did not answer (the caller keeps the hang as it was).
    """
    run.stop(5.0)
    with run.link() as link:
        places = []
        for cpu in range(smp):
            vcpu = run.vcpu(cpu)
            pc = vcpu.registers(link, ("rip",)).get("rip")
            if pc is None:
                places.append(f"vCPU {cpu} unreadable")
                continue
            before = vcpu.read(link, pc - 1, 1)
            halted = before == bytes([_HLT])
            where = symbols.describe(pc) if symbols is not None else f"{pc:#x}"
            places.append(f"vCPU {cpu} {'halted ' if halted else ''}at {where}")
        state: int | None = None
        if symbols is not None and "system_state" in symbols:
            raw = run.vcpu(0).read(link, symbols.address("system_state"), 4)
            state = None if raw is None else int.from_bytes(raw, "little")
    return HungBoot(state, tuple(places))
