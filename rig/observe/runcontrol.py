"""Run control on a borrowed raw gdbstub link: step one vCPU over one instruction.

Shared by the exploration (:mod:`rig.observe.exploration`) and watch mode
(:mod:`rig.observe.watching`), which both run every vCPU with ``vCont;c`` and stop at
breakpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

from rig.errors import GuestError
from rig.machine.symbols import SymbolTable
from rig.machine.vcpu import thread_id
from rig.transport.rsp import RspLink, hex_le

#: Single steps tried on one instruction before the vCPU is declared stuck.
STEP_TRIES = 5


def step_over(
    link: RspLink,
    symbols: SymbolTable,
    cpu: int,
    pc: int,
    rip_packet: str,
    *,
    armed: bool,
    after: Sequence[str] = (),
) -> tuple[list[str], int]:
    """Step vCPU ``cpu`` alone (interrupts masked) over the instruction at ``pc``.

    Returns the replies of ``[Hg<cpu>, rip, *after]`` read after the step, and how many
    steps were repeated because the vCPU had not moved (its rip still ``pc``).

    QEMU's TCG lets a single step override a breakpoint at the stepped pc, so a
    breakpoint there (``armed``) stays armed. If the vCPU did not move (a QEMU that
    re-reports the breakpoint, or a stop it still owed), the step is repeated with the
    breakpoint lifted, and the breakpoint is put back afterwards. The step packet is
    always sent alone: on a link with acknowledgements the ``+`` for an earlier reply
    would reach QEMU while the vCPU runs, and any byte arriving then pauses the VM (a
    ``T02`` reply, nothing executed).

    Not for an instruction that may leave rip unchanged (a ``rep`` string instruction
    interrupted mid-way): each such step would count as not executed.
    """
    thread = thread_id(cpu)
    reads = [f"Hg{thread}", rip_packet, *after]
    lifted = False
    repeated = 0
    try:
        for _ in range(STEP_TRIES):
            step = link.transact([f"vCont;s:{thread}"])[0]
            if not step or step[0] not in "ST":
                raise GuestError(f"single step of vCPU {cpu} at {symbols.describe(pc)} answered {step!r}")
            replies = link.transact(reads)
            if hex_le(replies[1]) != pc:
                return replies, repeated
            repeated += 1
            if armed and not lifted:
                link.transact([f"z0,{pc:x},1"])
                lifted = True
    finally:
        if lifted:
            link.transact([f"Z0,{pc:x},1"])
    raise GuestError(f"vCPU {cpu} did not execute {symbols.describe(pc)} in {STEP_TRIES} single steps")
