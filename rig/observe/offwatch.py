"""The signal where it must stay off: no store runs, and every copy reads 1.

Booted with the housekeeping gate off (no ``nohz_full``/``isolcpus``: the
``housekeeping_overridden`` key is off) or with PTI off (``nopti``: no CR3 switch at
all), the CR3 signal must never be written, and every CPU's copy must read 1 ("may be on
the kernel CR3", the answer that never lets a remote CPU skip a flush). :func:`watch_off`
checks that while the guest's workloads run at full TCG speed:

* every signal store site of the kernel (:func:`rig.machine.sites.find_sites`) is a
  breakpoint: a hit is a finding (:attr:`Rule.SIGNAL_WRITTEN_WHILE_OFF`);
* so are the entries of the events the rule must hold through (:data:`EVENT_ENTRIES`:
  the 64-bit and 32-bit system calls, a page fault, NMIs and #DBs, ``paranoid_entry``);
  at each stop, on any vCPU, every CPU's copy is read through every vCPU's page tables,
  and each must read 1;
* NMIs are made pending through QMP (they reach vCPU 0) every few stops: when vCPU 0 is
  the one stopped at an entry, the NMI is taken at its next instruction (in kernel
  mode); when another vCPU stopped, wherever vCPU 0's workload is (user mode, for a
  workload that spins there).

Each stop is classified by the entry it hit and, for exceptions, by the mode the frame
returns to, so the result says which events the rule held through (:class:`OffResult`);
a run that did not see every required event within its bound says so as an
:attr:`Rule.INCOMPLETE` finding.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rig.errors import GuestError
from rig.guest import Guest
from rig.machine.sites import Site
from rig.machine.stepper import arm_breakpoints, step_over
from rig.machine.vcpu import stopped_cpu, thread_id
from rig.observe.findings import Finding, Rule
from rig.transport.rsp import RspLink, hex_le, is_error

__all__ = ["EVENTS", "EVENT_ENTRIES", "OffResult", "OffWatcher", "watch_off"]

#: Entry symbol -> (event name, offset of the saved CS in its frame at %rsp, or None for
#: an entry that is always reached from user mode: a system call).
EVENT_ENTRIES: dict[str, tuple[str, int | None]] = {
    "entry_SYSCALL_64": ("64-bit syscall", None),
    "entry_SYSCALL_compat": ("32-bit syscall", None),
    "entry_SYSENTER_compat": ("32-bit sysenter", None),
    "asm_exc_page_fault": ("page fault", 16),  # error code, rip, cs
    "asm_exc_nmi": ("NMI", 8),  # rip, cs
    "asm_exc_debug": ("#DB", 8),
    "paranoid_entry": ("paranoid entry", None),
}
#: Every event name a stop can be classified as.
EVENTS = (
    "64-bit syscall",
    "32-bit syscall",
    "32-bit sysenter",
    "page fault from user",
    "page fault in kernel mode",
    "NMI from user",
    "NMI in kernel mode",
    "#DB from user",
    "#DB in kernel mode",
    "paranoid entry",
)
#: Seconds one ``vCont;c`` may run without any vCPU reaching a watched address.
CONTINUE_TIMEOUT = 10.0
#: The run stops collecting after this many findings.
MAX_FINDINGS = 50


@dataclass
class OffResult:
    """What one run saw: stops per event, signal stores hit, findings, time."""

    kernel: str
    events: dict[str, int] = field(default_factory=dict)
    stops: int = 0
    reads: int = 0
    nmis: int = 0
    stores_hit: int = 0
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        """The events the rule held through, with their counts."""
        counts = ", ".join(f"{e}: {self.events.get(e, 0)}" for e in EVENTS)
        return (
            f"signal off on {self.kernel}: {self.stops} stops, {self.reads} signal reads, "
            f"{self.nmis} NMIs injected, {self.stores_hit} signal stores hit, "
            f"{len(self.findings)} findings in {self.seconds:.1f} s\n  {counts}"
        )


class OffWatcher:
    """Watches every vCPU of ``guest`` (stopped, link borrowed): see the module doc."""

    def __init__(self, guest: Guest, sites: Sequence[Site], *, signal: str) -> None:
        self.guest = guest
        self.ncpus = guest.config.smp
        sym = guest.symbols
        self.stores = {s.address: s for s in sites if s.kind == "signal-store"}
        self.entries = {sym.address(n): n for n in EVENT_ENTRIES if n in sym}
        self.copies = [guest.per_cpu(signal, n) for n in range(self.ncpus)]
        self._rip, self._rsp = guest.regmap.packet("rip"), guest.regmap.packet("rsp")
        # every CPU's copy as every vCPU reads it
        self._reads = [
            p for o in range(self.ncpus) for a in self.copies for p in (f"Hg{thread_id(o)}", f"m{a:x},4")
        ]

    def _arm(self, link: RspLink) -> list[int]:
        return arm_breakpoints(link, [*self.stores, *self.entries])

    def _event(self, link: RspLink, cpu: int, pc: int) -> str:
        name = self.entries[pc]
        event, cs_at = EVENT_ENTRIES[name]
        if cs_at is None:
            return event
        rsp = hex_le(link.transact([f"Hg{thread_id(cpu)}", self._rsp])[1])
        cs = link.transact([f"m{rsp + cs_at:x},8"])[0]
        if is_error(cs):
            raise GuestError(f"vCPU {cpu} at {name}: its exception frame at {rsp:#x} cannot be read")
        return (
            f"{event} from user"
            if int.from_bytes(bytes.fromhex(cs), "little") & 3
            else f"{event} in kernel mode"
        )

    def _check_copies(self, link: RspLink, result: OffResult, cpu: int, where: str) -> None:
        replies = link.transact(self._reads)[1::2]
        result.reads += len(replies)
        for i, reply in enumerate(replies):
            reader, owner = divmod(i, self.ncpus)
            value = None if is_error(reply) else hex_le(reply)
            if value != 1:
                result.findings.append(
                    Finding(
                        Rule.SIGNAL_WRITTEN_WHILE_OFF,
                        f"vCPU {cpu} at {where}: CPU {owner}'s signal reads {value} through vCPU {reader} "
                        "(with the gate or PTI off it must read 1)",
                        cpu=cpu,
                        where=where,
                    )
                )

    def run(
        self,
        link: RspLink,
        required: Sequence[str],
        *,
        min_each: int = 1,
        nmi_every: int = 20,
        max_seconds: float = 60.0,
    ) -> OffResult:
        """Watch until every event in ``required`` (names of :data:`EVENTS`) was seen
        ``min_each`` times, or ``max_seconds`` (then an :attr:`Rule.INCOMPLETE` finding
        names what was not seen). ``nmi_every``: stops between two NMIs (0: none).

        Raises:
            GuestError: QEMU refused a breakpoint, no vCPU reached a watched address
                within :data:`CONTINUE_TIMEOUT`, or the guest stopped for another reason.
        """
        unknown = sorted(set(required) - set(EVENTS))
        if unknown:
            raise ValueError(f"unknown events {unknown}; known: {', '.join(EVENTS)}")
        g = self.guest
        sym = g.symbols
        result = OffResult(f"{g.release} ({g.config.label})" if g.config.label else g.release)
        t0 = time.monotonic()
        armed = self._arm(link)

        def missing() -> list[str]:
            return [e for e in required if result.events.get(e, 0) < min_each]

        try:
            while missing() and len(result.findings) < MAX_FINDINGS:
                if time.monotonic() - t0 > max_seconds:
                    seen = ", ".join(f"{e}: {result.events.get(e, 0)}" for e in required)
                    result.findings.append(
                        Finding(
                            Rule.INCOMPLETE,
                            f"within {max_seconds:.0f} s the guest did not take {missing()} "
                            f"(at least {min_each} each wanted; seen {seen})",
                        )
                    )
                    break
                reply = link.resume("vCont;c", CONTINUE_TIMEOUT)
                cpu = stopped_cpu(reply)
                if reply.startswith("T02"):
                    continue  # a pause nobody asked for (see runcontrol.step_over): nothing ran
                if not reply.startswith("T05") or cpu is None:
                    raise GuestError(f"the guest stopped with {reply!r} (not a breakpoint)")
                pc = hex_le(link.transact([f"Hg{thread_id(cpu)}", self._rip])[1])
                where = sym.describe(pc)
                result.stops += 1
                self._check_copies(link, result, cpu, where)
                if pc in self.stores:
                    result.stores_hit += 1
                    result.findings.append(
                        Finding(
                            Rule.SIGNAL_WRITTEN_WHILE_OFF,
                            f"vCPU {cpu} ran the signal store at {where} (with the gate or PTI off "
                            "no store may run)",
                            cpu=cpu,
                            where=where,
                        )
                    )
                elif pc in self.entries:
                    event = self._event(link, cpu, pc)
                    result.events[event] = result.events.get(event, 0) + 1
                else:
                    raise GuestError(f"vCPU {cpu} stopped at {where}, which is not watched")
                step_over(link, sym, cpu, pc, self._rip, armed=True)
                if nmi_every and result.stops % nmi_every == 0:
                    # taken at vCPU 0's next instruction once it runs: in kernel mode if
                    # vCPU 0 is the one stopped at an entry, else wherever its workload is
                    g.machine.inject_nmi()
                    result.nmis += 1
        finally:
            link.transact([f"z0,{a:x},1" for a in armed])
            result.seconds = time.monotonic() - t0
        return result


def watch_off(
    guest: Guest,
    sites: Sequence[Site],
    *,
    signal: str,
    required: Sequence[str],
    min_each: int = 1,
    nmi_every: int = 20,
    max_seconds: float = 60.0,
) -> OffResult:
    """Check (module doc) until every ``required`` event was seen ``min_each`` times.

    The workloads must already run. Kernel messages are kept off the serial console
    meanwhile; every breakpoint is removed again and the guest runs on afterwards.
    """
    with guest.userspace.quiet_console():
        guest.stop()
        with guest.link() as link:
            return OffWatcher(guest, sites, signal=signal).run(
                link, required, min_each=min_each, nmi_every=nmi_every, max_seconds=max_seconds
            )
