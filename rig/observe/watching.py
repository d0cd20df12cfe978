"""Watch mode: check every CR3 switch of every vCPU while the guest runs at full TCG speed.

Stepping checks every instruction boundary of one path, at two gdbstub round trips per
instruction. Watch mode checks only the instructions that can change what matters: every
CR3 write and every store to the signal in the kernel's entry and noinstr text
(:func:`rig.machine.sites.find_sites`, from the vmlinux), plus ``paranoid_entry``. Each
is a breakpoint that is not thread-specific (TCG matches the virtual PC on every vCPU),
and every vCPU runs (``vCont;c``) until one of them hits one. On the vCPU that hit:

* its CR3 and the signal before the instruction, the signal read as each *other* vCPU
  reads it (``per_cpu(signal, cpu)`` through the other vCPU's page tables: the view a
  remote CPU deciding on a TLB flush has);
* the instruction is single-stepped alone (its breakpoint lifted for the step), then
  CR3 and the signal are read again: the value the write loaded, the value the store
  wrote.

Checks (:class:`rig.observe.transitions.TransitionChecker`, pure, shared with the
exploration):

* a CR3 write that loads the kernel CR3 finds the signal at 1;
* a CR3 write that loads the user CR3 finds it at 0, except a paranoid restore
  (:data:`rig.observe.transitions.PARANOID_RESTORE_FUNCTIONS`), which must find the value its paranoid entry
  found (a per-vCPU stack of paranoid entries, as in :mod:`rig.observe.exploration`);
* the store of a paranoid exit puts back the value its entry found;
* the signal changes only at a store site (between two hits of one vCPU it is
  unchanged: every instruction that can change it is a breakpoint);
* every other vCPU reads the same value.

Between two stops of a vCPU neither its CR3 nor its signal can change, so the checks at
the stops cover every boundary of the run without stepping it.
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
from rig.machine.x86 import user_cr3
from rig.observe.findings import Finding, Rule
from rig.observe.transitions import CR3Sides, Hit, TransitionChecker, agreed_signal
from rig.transport.qemu import NMI_CPU
from rig.transport.rsp import RspLink, hex_le, is_error

#: Seconds one ``vCont;c`` may run without any vCPU hitting a switch site.
CONTINUE_TIMEOUT = 10.0
#: The run stops collecting after this many problems (the first ones say it all).
MAX_PROBLEMS = 50


@dataclass
class SiteTally:
    """How often one site ran, and which CR3 side changes it made."""

    site: Site
    hits: int = 0
    to_kernel: int = 0
    to_user: int = 0
    by_cpu: dict[int, int] = field(default_factory=dict)

    @property
    def transitions(self) -> int:
        return self.to_kernel + self.to_user


@dataclass
class WatchResult:
    """Everything one watch run saw: per-site tallies, problems, time."""

    kernel: str
    ncpus: int
    tallies: dict[int, SiteTally]
    hits: int = 0
    transitions: int = 0
    paranoid_entries: int = 0
    nmis: int = 0
    unverified_restores: int = 0
    repeated_steps: int = 0
    running_seconds: float = 0.0
    paused: int = 0
    hits_by_cpu: dict[int, int] = field(default_factory=dict)
    problems: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        """CR3 transitions (side changes) checked per second of the run."""
        return self.transitions / self.seconds if self.seconds > 0 else 0.0

    def record(self, hit: Hit) -> None:
        t = self.tallies[hit.site.address]
        t.hits += 1
        t.by_cpu[hit.cpu] = t.by_cpu.get(hit.cpu, 0) + 1
        self.hits += 1
        self.hits_by_cpu[hit.cpu] = self.hits_by_cpu.get(hit.cpu, 0) + 1
        if hit.site.kind == "cr3-write" and user_cr3(hit.cr3_before) != user_cr3(hit.cr3_after):
            if user_cr3(hit.cr3_after):
                t.to_user += 1
            else:
                t.to_kernel += 1
            self.transitions += 1

    def executed(self) -> set[int]:
        """Addresses of the sites that ran at least once."""
        return {a for a, t in self.tallies.items() if t.hits}

    def table(self) -> str:
        """One line per site that ran: hits, side changes, hits per vCPU; then the totals."""
        per_cpu = ", ".join(f"vCPU {c}: {n}" for c, n in sorted(self.hits_by_cpu.items()))
        lines = [
            f"watch mode on {self.kernel}: {self.transitions} CR3 transitions checked "
            f"({self.hits} site hits; {per_cpu}) in {self.seconds:.1f} s = {self.rate:.0f}/s "
            f"({self.running_seconds:.1f} s of it running between hits); "
            f"{self.paranoid_entries} paranoid entries, {self.nmis} NMIs injected, "
            f"{len(self.problems)} problems",
            f"{'site':<44} {'kind':<12} {'hits':>7} {'->kernel':>8} {'->user':>7}  per vCPU",
        ]
        for t in sorted(self.tallies.values(), key=lambda t: t.site.address):
            if not t.hits:
                continue
            cpus = " ".join(f"{c}:{n}" for c, n in sorted(t.by_cpu.items()))
            lines.append(
                f"{t.site.where:<44.44} {t.site.kind:<12} {t.hits:>7} {t.to_kernel:>8} {t.to_user:>7}  {cpus}"
            )
        idle = [t.site.where for t in self.tallies.values() if not t.hits]
        if idle:
            lines.append(f"not hit: {', '.join(idle)}")
        if self.repeated_steps or self.paused:
            lines.append(
                f"{self.repeated_steps} single steps answered without executing (repeated), "
                f"{self.paused} continues answered by a pause (T02, resumed)"
            )
        if self.unverified_restores:
            lines.append(
                f"{self.unverified_restores} paranoid restores whose entry ran before the watch began"
            )
        return "\n".join(lines)


class Watcher:
    """Watches every vCPU of ``guest`` (stopped, link borrowed) at ``sites``.

    ``signal`` is the per-CPU variable; the guest needs at least two vCPUs (the signal
    of the vCPU that hit is read through the others' page tables).
    """

    def __init__(self, guest: Guest, sites: Sequence[Site], *, signal: str) -> None:
        ncpus = guest.config.smp
        if ncpus < 2:
            raise GuestError(
                "watch mode needs --smp 2 or more: other vCPUs read the signal of the one that hit"
            )
        self.guest = guest
        self.ncpus = ncpus
        self.sites = {s.address: s for s in sites}
        if not self.sites:
            raise GuestError("no CR3 switch sites to watch (find_sites found none in the vmlinux)")
        self.paranoid = guest.symbols.get("paranoid_entry")
        rm = guest.regmap
        self._rip, self._cr3 = rm.packet("rip"), rm.packet("cr3")
        self._signal = [guest.per_cpu(signal, n) for n in range(ncpus)]
        # per hitting vCPU: read its signal through every other vCPU
        self._observe = [
            [p for o in range(ncpus) if o != n for p in (f"Hg{thread_id(o)}", f"m{self._signal[n]:x},4")]
            for n in range(ncpus)
        ]
        self.armed: list[int] = []
        #: single steps QEMU answered without executing the instruction (repeated)
        self.repeated_steps = 0
        #: per vCPU, the CR3 side its last stop left it on (reset at each run)
        self.sides = CR3Sides(ncpus)

    def arm(self, link: RspLink) -> None:
        paranoid = [self.paranoid] if self.paranoid is not None else []
        self.armed = arm_breakpoints(link, [*self.sites, *paranoid])

    def disarm(self, link: RspLink) -> None:
        if self.armed:
            link.transact([f"z0,{a:x},1" for a in self.armed])
        self.armed = []

    def _step_over(self, link: RspLink, cpu: int, pc: int) -> list[str]:
        """Step vCPU ``cpu`` alone over ``pc`` (:func:`step_over`); return the replies of
        [Hg, rip, cr3, the observers' signal reads] after it."""
        replies, repeated = step_over(
            link, self.guest.symbols, cpu, pc, self._rip, armed=True, after=[self._cr3, *self._observe[cpu]]
        )
        self.repeated_steps += repeated
        return replies

    def _signal_reads(self, replies: Sequence[str]) -> list[int | None]:
        # replies alternate Hg (OK) and m (value or Exx)
        return [None if is_error(r) else hex_le(r) for r in replies[1::2]]

    def new_result(self) -> WatchResult:
        """An empty result with a tally for every site."""
        g = self.guest
        return WatchResult(
            f"{g.release} ({g.config.label})" if g.config.label else g.release,
            self.ncpus,
            {a: SiteTally(s) for a, s in self.sites.items()},
        )

    def check_hit(self, link: RspLink, cpu: int, result: WatchResult, checker: TransitionChecker) -> None:
        """Check the site vCPU ``cpu`` stopped at: read, step over it, read, feed ``checker``."""
        g = self.guest
        r = link.transact([f"Hg{thread_id(cpu)}", self._rip, self._cr3, *self._observe[cpu]])
        pc, cr3 = hex_le(r[1]), hex_le(r[2])
        before, disagree = agreed_signal(self._signal_reads(r[3:]))
        where = g.symbols.describe(pc)
        if disagree:
            result.problems.append(
                Finding(Rule.VIEWS_DISAGREE, f"vCPU {cpu} at {where}: {disagree}", cpu=cpu, where=where)
            )
        if before is None:  # fail closed: no vCPU could read it
            result.problems.append(
                Finding(
                    Rule.SIGNAL_UNREADABLE,
                    f"vCPU {cpu} at {where}: no vCPU can read its signal",
                    cpu=cpu,
                    where=where,
                )
            )
        # between two stops only a listed site may change a vCPU's CR3 side
        result.problems += self.sides.continues(cpu, cr3, where)
        r = self._step_over(link, cpu, pc)
        site = self.sites.get(pc)
        if site is None:
            if pc == self.paranoid:
                result.paranoid_entries += 1
                result.problems += checker.paranoid_entry(cpu, before)
                return
            raise GuestError(f"vCPU {cpu} stopped at {g.symbols.describe(pc)}, which is not watched")
        after, disagree = agreed_signal(self._signal_reads(r[3:]))
        if disagree:
            text = f"vCPU {cpu} after {site.where}: {disagree}"
            result.problems.append(Finding(Rule.VIEWS_DISAGREE, text, cpu=cpu, where=site.where))
        if after is None:
            text = f"vCPU {cpu} after {site.where}: no vCPU can read its signal"
            result.problems.append(Finding(Rule.SIGNAL_UNREADABLE, text, cpu=cpu, where=site.where))
        self.sides.left(cpu, hex_le(r[2]))
        hit = Hit(cpu, site, cr3, hex_le(r[2]), before, after)
        result.record(hit)
        result.problems += checker.check(hit)

    def run(
        self,
        link: RspLink,
        transitions: int,
        *,
        nmi_every: int = 0,
        max_seconds: float = 120.0,
    ) -> WatchResult:
        """Watch until ``transitions`` CR3 side changes were checked (or ``max_seconds``).

        ``nmi_every``: make an NMI (QMP; it reaches vCPU 0) due every ``nmi_every``
        continues; every other one is injected only once another vCPU has stopped, so
        that vCPU 0 takes it wherever its workloads were (in user mode, too), the others
        at once, i.e. at the switch site vCPU 0 may be stopped at.
        """
        g = self.guest
        result = self.new_result()
        checker = TransitionChecker(self.ncpus, list(self.sites.values()))
        self.sides = CR3Sides(self.ncpus)  # the guest ran unwatched before this run
        t0 = time.monotonic()
        continues = nmi_due = 0
        last_cpu = NMI_CPU
        self.arm(link)
        try:
            while result.transitions < transitions and len(result.problems) < MAX_PROBLEMS:
                if time.monotonic() - t0 > max_seconds:
                    result.seconds = time.monotonic() - t0
                    raise GuestError(
                        f"watch mode checked only {result.transitions} of {transitions} transitions in "
                        f"{max_seconds:.0f} s (are the workloads running?)\n{result.table()}"
                    )
                if nmi_every and continues % nmi_every == nmi_every - 1:
                    nmi_due += 1
                # every other NMI waits for a stop of another vCPU: vCPU 0 is then wherever
                # its workloads are (often user mode); the rest land on vCPU 0 at a site
                if nmi_due and (result.nmis % 2 == 0 or last_cpu != NMI_CPU):
                    g.machine.inject_nmi()
                    result.nmis += 1
                    nmi_due -= 1
                continues += 1
                tr = time.monotonic()
                reply = link.resume("vCont;c", CONTINUE_TIMEOUT)
                result.running_seconds += time.monotonic() - tr
                stopped = stopped_cpu(reply)
                if reply.startswith("T02"):
                    result.paused += 1  # a pause nobody asked for (see _step_over): no site ran
                    continue
                if not reply.startswith("T05") or stopped is None:
                    raise GuestError(f"the guest stopped with {reply!r} (not a breakpoint)")
                cpu = last_cpu = stopped
                self.check_hit(link, cpu, result, checker)
        finally:
            self.disarm(link)
            result.seconds = time.monotonic() - t0
            result.unverified_restores = checker.unverified_restores
            result.repeated_steps = self.repeated_steps
        return result


def watch(
    guest: Guest,
    sites: Sequence[Site],
    *,
    signal: str,
    transitions: int,
    nmi_every: int = 0,
    max_seconds: float = 120.0,
) -> WatchResult:
    """Watch every vCPU of ``guest`` for ``transitions`` CR3 side changes (see the module doc).

    The workloads must already run. Kernel messages are kept off the serial console
    meanwhile; every breakpoint is removed again and the guest runs on afterwards.
    """
    with guest.userspace.quiet_console():
        guest.stop()
        with guest.link() as link:
            result = Watcher(guest, sites, signal=signal).run(
                link, transitions, nmi_every=nmi_every, max_seconds=max_seconds
            )
    return result
