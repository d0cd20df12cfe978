"""The exploration engine: an NMI at one boundary of a window, then a fast-forward.

:class:`Explorer` works on the raw link (:meth:`Guest.link <rig.guest.Guest.link>`): it
arrives at a window's entry (:meth:`Explorer.arrive_on_link`), steps to boundary k, makes
an NMI pending and runs the vCPU to user mode with breakpoints on every switch site,
checking the transitions at each stop (:meth:`Explorer.run_boundary`; the rules and why
the stops cover every boundary: :mod:`rig.observe.exploration`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rig.errors import GuestError
from rig.guest import Guest
from rig.guest.tasks import task_names
from rig.machine.sites import Site, entry_disassembly
from rig.machine.stepper import Stepper, step_over
from rig.machine.storepaths import Instruction, parse_instructions
from rig.machine.trace import Snapshot, Trace, WatchedWord
from rig.machine.vcpu import stopped_cpu, thread_id
from rig.machine.x86 import cr3_side, in_user_half, may_leave_kernel_half, may_write_cr3, user_cr3
from rig.observe.findings import Finding, Rule
from rig.observe.transitions import PARANOID_RESTORE_FUNCTIONS, CR3Sides, Hit, TransitionChecker
from rig.observe.windows import BoundaryRun, Stop, Window
from rig.transport.qemu import NMI_CPU
from rig.transport.rsp import RspLink, hex_le, is_error

__all__ = [
    "CALL_SEARCH",
    "CONTINUE_TIMEOUT",
    "MAX_STOPS",
    "SCOUT_TRIES",
    "Explorer",
    "ScoutStop",
    "not_executed",
]

#: Most switch-site stops one boundary's run may take before it is declared stuck (a
#: single-stepped SYSENTER takes ~40 #DBs of 3 stops each before it is back in user mode).
MAX_STOPS = 400
#: Scouts of a window tried when QEMU answers one of its single steps without executing.
SCOUT_TRIES = 3


def not_executed(trace: Trace) -> int | None:
    """The index of the first boundary whose step did not move the vCPU (the same rip as
    the boundary before, and not a ``rep`` string instruction, which may repeat itself):
    a single step QEMU answered without executing (a stop it still owed). None if every
    step executed."""
    snaps = trace.snapshots
    for i in range(1, len(snaps)):
        if snaps[i].pc == snaps[i - 1].pc and not snaps[i - 1].insn.lstrip().startswith("rep"):
            return i
    return None


#: How many instructions from an entry symbol :meth:`Explorer.entry_addresses` searches
#: for the call whose return starts an exit window.
CALL_SEARCH = 200
#: Seconds one arrival at a window's entry may take, all its hits together.
ARRIVAL_SECONDS = 60.0
#: Seconds one continue may run before the vCPU is interrupted and the run fails.
CONTINUE_TIMEOUT = 10.0


@dataclass
class ScoutStop:
    """A scout's stop condition (a :class:`~rig.machine.stops.ForeseeingStop`): holds
    ``after`` boundaries past the first one on the wanted CR3 side (user tables if
    ``want_user``), or at a user-mode boundary once there.

    It counts steps, so it keeps state: ``flipped`` (the boundary that first had the
    wanted side) and ``seen`` (the last boundary evaluated; the Stepper asks
    :meth:`may_hold_after` about the instruction that leads from that boundary to the next).
    """

    cpu: int
    want_user: bool
    after: int
    flipped: int | None = None
    seen: int = 0

    def __call__(self, s: Snapshot) -> bool:
        self.seen = s.step
        if self.flipped is None and s.user_tables(self.cpu) == self.want_user:
            self.flipped = s.step
        return self.flipped is not None and (s.step - self.flipped >= self.after or in_user_half(s.pc))

    def may_hold_after(self, cpu: int, pc: int, code: bytes) -> bool:
        """Before the switch only a CR3 write can make it hold; after it, the step count
        or a return to user mode."""
        if cpu != self.cpu:
            return False
        if self.flipped is None:
            return may_write_cr3(code)
        return self.seen + 1 - self.flipped >= self.after or may_leave_kernel_half(code, pc)


class Explorer:
    """Explores windows on vCPU ``cpu`` of ``guest`` (stopped between calls).

    ``sites`` are the kernel's CR3 writes and signal stores; ``signal`` the per-CPU
    variable; the observer is the first other vCPU, frozen while ``cpu`` runs alone.
    """

    def __init__(self, guest: Guest, sites: Sequence[Site], *, cpu: int = NMI_CPU, signal: str) -> None:
        self.guest = guest
        self.cpu = cpu
        self.observer = next(n for n in range(guest.config.smp) if n != cpu)
        self.signal = signal
        self.signal_address = guest.per_cpu(signal, cpu)
        self.sites = {s.address: s for s in sites}
        #: the CR3 writes of exits to user mode (a paranoid exit's restore of a user CR3
        #: may return to kernel mode: see :meth:`to_user_mode`)
        self._exit_writes = [
            s.address for s in sites if s.kind == "cr3-write" and s.function not in PARANOID_RESTORE_FUNCTIONS
        ]
        sym = guest.symbols
        self.nmi_entry = sym.address("asm_exc_nmi")
        self.handler = sym.get("exc_nmi")
        self.paranoid = sym.get("paranoid_entry")
        self._thread = thread_id(cpu)
        self._armed: set[int] = set()
        self._seed: list[list[Any]] = []
        self._text: list[Instruction] | None = None
        self._sibling_checker = TransitionChecker(guest.config.smp, list(sites))
        self._sibling_sides = CR3Sides(guest.config.smp)
        self._tasks = task_names(guest)
        self.mismatch = ""
        #: single steps QEMU answered without executing the instruction (repeated)
        self.repeated_steps = 0
        rm = guest.regmap
        self._read = [
            f"Hg{self._thread}",
            rm.packet("rip"),
            rm.packet("cr3"),
            rm.packet("rsp"),
            f"Hg{thread_id(self.observer)}",
            f"m{self.signal_address:x},4",
        ]

    # -- arriving ---------------------------------------------------------------------
    def _arrive(self, window: Window) -> None:
        self.guest.stop()
        with self.guest.link() as link:
            self.arrive_on_link(link, window)

    def _word(self) -> WatchedWord:
        return WatchedWord(self.signal, self.signal_address, 4)

    def scout(self, window: Window) -> tuple[Trace, int, int]:
        """Step the window's path once; return (trace, store index, CR3-write index)."""
        want_user = window.direction == "exit"
        stop = ScoutStop(self.cpu, want_user, window.after)
        for _ in range(SCOUT_TRIES):
            self._arrive(window)
            trace = self.guest.step(self.cpu, words=[self._word()], max_steps=window.scout_steps, stop=stop)
            idle = not_executed(trace)
            if idle is None:
                break
            # a boundary counted twice: every later index would be one off the arrivals'
            self.guest.effort.discarded.append(
                f"{window.name}: scout: a single step QEMU answered without executing, at "
                f"{trace.snapshots[idle].where or hex(trace.snapshots[idle].pc)}; scouted again"
            )
            self.guest.traces.pop()
        else:
            raise GuestError(
                f"{window.name}: {SCOUT_TRIES} scouts in a row had a single step QEMU answered "
                "without executing"
            )
        snaps = trace.snapshots
        flip = next((i for i in range(1, len(snaps)) if snaps[i].user_tables(self.cpu) == want_user), None)
        if flip is None:
            raise GuestError(
                f"{window.name}: no CR3 switch within {window.scout_steps} steps of {window.entry}"
            )
        store = next(
            (
                i
                for i in range(flip - 1, -1, -1)
                if self.sites.get(snaps[i].pc, None) is not None
                and self.sites[snaps[i].pc].kind == "signal-store"
            ),
            flip - 1,
        )
        return trace, store, flip - 1

    # -- one boundary -----------------------------------------------------------------
    def _state(self, link: RspLink) -> tuple[int, int, int, int | None]:
        r = link.transact(self._read)
        if is_error(r[1]) or is_error(r[2]):
            raise GuestError(f"cannot read vCPU {self.cpu}'s registers: {r[1]} {r[2]}")
        return hex_le(r[1]), hex_le(r[2]), hex_le(r[3]), None if is_error(r[5]) else hex_le(r[5])

    def _step_over(self, link: RspLink, cpu: int, pc: int) -> None:
        """Step vCPU ``cpu`` alone over the instruction at ``pc`` (:func:`step_over`)."""
        _, repeated = step_over(
            link, self.guest.symbols, cpu, pc, self.guest.regmap.packet("rip"), armed=pc in self._armed
        )
        self.repeated_steps += repeated

    def _arm(self, link: RspLink, addrs: Iterable[int]) -> None:
        new = [a for a in addrs if a not in self._armed]
        if new:
            replies = link.transact([f"Z0,{a:x},1" for a in new])
            bad = [f"{a:#x}:{r}" for a, r in zip(new, replies, strict=True) if r != "OK"]
            if bad:
                raise GuestError(f"QEMU refused breakpoints {bad}")
            self._armed |= set(new)

    def _disarm(self, link: RspLink, addr: int) -> None:
        if addr in self._armed:
            link.transact([f"z0,{addr:x},1"])
            self._armed.discard(addr)

    def arrive_on_link(
        self, link: RspLink, window: Window, tries: int = 200, *, at: int | None = None
    ) -> None:
        """Run the guest until vCPU ``cpu`` reaches the window's entry on the wanted CR3
        side (on the raw link: every vCPU runs, siblings' hits are stepped over)."""
        g = self.guest
        entries = {at} if at is not None else self.entry_addresses(window)
        self._arm(link, entries)
        try:
            seen: list[str] = []
            deadline = time.monotonic() + ARRIVAL_SECONDS
            for _ in range(tries):
                if time.monotonic() > deadline:
                    raise GuestError(
                        f"{window.name}: vCPU {self.cpu} did not arrive at {window.entry} from the "
                        f"{'user' if window.from_user else 'kernel'} CR3 within {ARRIVAL_SECONDS:.0f} s "
                        f"(is {window.workload} running there? last hits: {seen})"
                    )
                if window.nmi_arrival:
                    self.to_user_mode(link, window)
                    self.guest.machine.inject_nmi()  # taken at once: at this user-mode boundary
                pc = self._continue(link, window, None)
                cr3 = hex_le(link.transact([f"Hg{self._thread}", g.regmap.packet("cr3")])[1])
                if (
                    pc in entries
                    and user_cr3(cr3) == window.from_user
                    and self._mode_ok(link, window)
                    and self._runs_workload(link, window)
                ):
                    return
                r = link.transact([g.regmap.packet("rsp")])
                frame = link.transact([f"m{hex_le(r[0]):x},8"])[0]
                came = (
                    "?"
                    if is_error(frame)
                    else g.symbols.describe(int.from_bytes(bytes.fromhex(frame), "little"))
                )
                seen = [*seen[-4:], f"{g.symbols.describe(pc)} on {cr3:#x} from {came}"]
                self._step_over(link, self.cpu, pc)
                if window.from_user and not user_cr3(cr3):
                    # taken in kernel mode: run to user mode with the entries disarmed, so
                    # that kernel-mode events run at full speed. Stopping at each of them
                    # can livelock the vCPU in kernel mode: every stop lets the guest's
                    # clock run on (QEMU 10), so the next timer interrupt is due by the
                    # time the handler's softirqs enable interrupts again.
                    for a in entries:
                        self._disarm(link, a)
                    self.to_user_mode(link, window)
                    self._arm(link, entries)
        finally:
            for a in entries:
                self._disarm(link, a)
        want = "user" if window.from_user else "kernel"
        raise GuestError(
            f"{window.name}: {tries} hits of {window.entry} in a row were not {window.workload}'s "
            f"on the {want} CR3 (last: {seen})"
        )

    def entry_addresses(self, window: Window) -> set[int]:
        """Where the window's path starts: its entry symbols, or the return addresses of
        the calls to ``window.after_call_to`` inside them (from the vmlinux's text).

        Raises:
            GuestError: no vmlinux, or no such call in the entry symbols.
        """
        sym = self.guest.symbols
        names = [n for n in window.entry if n in sym]
        if not window.after_call_to:
            return {sym.address(n) for n in names}
        if self._text is None:
            vmlinux = self.guest.config.vmlinux
            if vmlinux is None:
                raise GuestError(
                    f"{window.name}: finding the return of {window.after_call_to} needs a vmlinux"
                )
            self._text = parse_instructions(entry_disassembly(vmlinux, sym))
        index = {ins.address: i for i, ins in enumerate(self._text)}
        found = set()
        for n in names:  # the first such call within the symbol's first instructions
            start = index.get(sym.address(n))
            for ins in self._text[start : start + CALL_SEARCH] if start is not None else ():
                if ins.mnemonic.startswith("call") and f"<{window.after_call_to}>" in ins.text:
                    found.add(ins.next_address)
                    break
        if not found:
            raise GuestError(f"{window.name}: no call to {window.after_call_to} in {names}")
        return found

    def _runs_workload(self, link: RspLink, window: Window) -> bool:
        """Whether an arrival on the kernel CR3 is in the window's workload: another task
        on the vCPU (the console shell finishing its last command, its syscalls leaving
        by SYSRET where iret-loop's leave by IRET) takes another path. (On the user CR3
        the task is not readable; those windows' paths do not depend on it.)"""
        if window.from_user or self._tasks is None:
            return True
        return self._tasks.runs(link, self.guest.vcpu(self.cpu), window.workload)

    def _mode_ok(self, link: RspLink, window: Window) -> bool:
        """For ``kernel_mode_only`` windows: the IRET frame at %rsp returns to kernel mode."""
        if not window.kernel_mode_only:
            return True
        rsp = hex_le(link.transact([f"Hg{self._thread}", self.guest.regmap.packet("rsp")])[1])
        frame = link.transact([f"m{rsp:x},8"])[0]
        return not is_error(frame) and not in_user_half(int.from_bytes(bytes.fromhex(frame), "little"))

    def to_user_mode(self, link: RspLink, window: Window, max_steps: int = 64) -> None:
        """Bring vCPU ``cpu`` to a user-mode boundary, the first one of the path it is on.

        In kernel mode on the user CR3 (past an exit's switch to the user CR3: where a
        fast-forward leaves an event taken in user mode), it steps to user mode. On the
        kernel CR3 it runs to the next CR3 write of an exit to user mode that loads the
        user CR3, then steps. (Running on past the exit would wait for the vCPU's next
        kernel entry: a spinning task on a ``nohz_full`` CPU can go many seconds without
        one.) A paranoid exit's restore of a user CR3 is not an exit: the exception may
        have interrupted kernel mode on the user CR3 (a #DB at the SYSENTER entry), and
        it returns there, to the entry's own switch to the kernel CR3, which the steps
        run into. An NMI made pending before is taken at the first continue (the steps
        mask it); one made pending once this returns is an NMI from user mode.

        Raises:
            GuestError: the vCPU did not get to user mode within 20 rounds.
        """
        g = self.guest
        cs_packet, cr3_packet, rip_packet = (g.regmap.packet(r) for r in ("cs", "cr3", "rip"))
        writes = self._exit_writes
        for _ in range(20):
            for _ in range(max_steps):
                r = link.transact([f"Hg{self._thread}", cs_packet, cr3_packet, rip_packet])
                if hex_le(r[1]) & 3:
                    return
                if not user_cr3(hex_le(r[2])):
                    break
                self._step_over(link, self.cpu, hex_le(r[3]))
            else:
                continue
            self._arm(link, writes)
            try:
                pc = self._continue(link, window, None)
                self._step_over(link, self.cpu, pc)
            finally:
                for a in writes:
                    self._disarm(link, a)
        raise GuestError(f"{window.name}: vCPU {self.cpu} did not get back to user mode")

    def run_boundary(
        self, link: RspLink, window: Window, k: int, scout: Snapshot, *, start: int | None = None
    ) -> BoundaryRun | None:
        """Arrive (at ``start``, the scout's first instruction, if given: of a window with
        several entries, the one the scout took), step to boundary ``k``, inject an NMI
        there and fast-forward.

        None if this arrival took another path (its pc at ``k`` is not the scout's).
        """
        t0 = time.monotonic()
        self.arrive_on_link(link, window, at=start)
        stepper = Stepper(self.guest.regmap, self.guest.config.smp, self.cpu, [self._word()])
        arrival = stepper.run(link, max_steps=k)
        stepped = arrival.snapshots
        idle = not_executed(arrival)
        if idle is not None:
            where = self.guest.symbols.describe(stepped[idle].pc)
            self.mismatch = f"a single step QEMU answered without executing, at {where}"
            return None
        at = stepped[-1]
        # paranoid entries the window's own path took before k: their exits must put back
        # the signal they found
        self._seed = [
            [s.words[self.signal][self.observer], False] for s in stepped[:-1] if s.pc == self.paranoid
        ]
        if at.pc != scout.pc:
            self.mismatch = f"at {self.guest.symbols.describe(at.pc)}, not {scout.where}"
            return None
        run = BoundaryRun(
            k, scout.where, scout.insn, at.cr3[self.cpu], at.words[self.signal][self.observer], "NMI"
        )
        self.guest.machine.inject_nmi()  # pending; taken at the next continue, before the instruction at k
        try:
            self._fast_forward(link, window, run, at.pc)
        finally:
            armed, self._armed = sorted(self._armed), set()
            if armed:
                link.transact([f"z0,{a:x},1" for a in armed])
        run.seconds = time.monotonic() - t0
        return run

    def _continue(self, link: RspLink, window: Window, run: BoundaryRun | None) -> int:
        """Run every vCPU until vCPU ``cpu`` stops at a breakpoint; return its pc.

        The siblings run too (frozen, one could hold a lock the stepping vCPU needs);
        a breakpoint they hit is stepped over on them alone.
        """
        sym = self.guest.symbols
        for _ in range(1000):
            try:
                reply = link.resume("vCont;c", CONTINUE_TIMEOUT)
            except GuestError as exc:
                pc, cr3, _, signal = self._state(link)
                k = "arrival" if run is None else f"boundary {run.k}"
                last = run.stops[-1].where if run is not None and run.stops else k
                raise GuestError(
                    f"{window.name} {k}: vCPU {self.cpu} hit no switch site after {last} "
                    f"({exc}); it is at {sym.describe(pc)} on the {cr3_side(cr3)} CR3, signal {signal}"
                ) from None
            cpu = stopped_cpu(reply)
            if not reply.startswith("T05") or cpu is None:
                raise GuestError(f"the guest stopped with {reply!r} (not a breakpoint)")
            pc = hex_le(link.transact([f"Hg{thread_id(cpu)}", self.guest.regmap.packet("rip")])[1])
            if cpu == self.cpu:
                return pc
            if run is None:
                self._step_over(link, cpu, pc)  # arriving: not every site is armed yet
            else:
                run.problems += self._sibling_hit(link, cpu, pc)
        raise GuestError(f"{window.name}: the siblings kept hitting switch sites")

    def _sibling_hit(self, link: RspLink, cpu: int, pc: int) -> list[Finding]:
        """A sibling stopped at ``pc`` during a fast-forward (every site armed): step it
        over, and check a switch site it ran as watch mode does (its signal read through
        the exploring vCPU; its CR3 side continuous since its last site)."""
        site = self.sites.get(pc)
        rm = self.guest.regmap
        addr = self.guest.per_cpu(self.signal, cpu)
        reads = [rm.packet("cr3"), f"Hg{self._thread}", f"m{addr:x},4"]
        before = link.transact([f"Hg{thread_id(cpu)}", *reads])
        replies, repeated = step_over(
            link, self.guest.symbols, cpu, pc, rm.packet("rip"), armed=pc in self._armed, after=reads
        )
        self.repeated_steps += repeated
        cr3, signal = hex_le(before[1]), None if is_error(before[3]) else hex_le(before[3])
        where = self.guest.symbols.describe(pc)
        found = self._sibling_sides.continues(cpu, cr3, where)
        if pc == self.paranoid:
            return found + self._sibling_checker.paranoid_entry(cpu, signal)
        if site is None:
            return found + self._sibling_checker.observe(cpu, signal, where)
        cr3_after = hex_le(replies[2])
        signal_after = None if is_error(replies[4]) else hex_le(replies[4])
        self._sibling_sides.left(cpu, cr3_after)
        return found + self._sibling_checker.check(Hit(cpu, site, cr3, cr3_after, signal, signal_after))

    def _fast_forward(self, link: RspLink, window: Window, run: BoundaryRun, pc_k: int) -> None:
        sym = self.guest.symbols
        fixed = set(self.sites) | {self.nmi_entry}
        fixed |= {a for a in (self.handler, self.paranoid) if a is not None}
        # A deliverable NMI is taken before the instruction at pc_k, so pc_k is armed only
        # once it is taken. Inside an NMI (an nmi_arrival window) the new one is latched
        # until the IRET: the instruction at pc_k runs first, and is a stop of its own.
        latched = window.nmi_arrival
        self._arm(link, fixed if latched else fixed - {pc_k})
        first: int | None = pc_k if latched else None
        found_signal, found_cr3 = run.signal, run.cr3
        depth = 0
        return_to: int | None = None
        return_rsp = 0
        delivered = returned = False
        after_return_user_write = False
        wrong_kernel_since: str | None = None
        # the rules of each transition; the paranoid entries the stepped part took are its
        # stack, and every later one is a stop, so a restore without an entry is checked
        # as an ordinary user CR3 write
        checker = TransitionChecker(self.guest.config.smp, list(self.sites.values()), strict_restores=True)
        checker.paranoid[self.cpu] = self._seed
        checker.last_signal[self.cpu] = run.signal
        # between two stops only a listed CR3 write may change a vCPU's CR3 side; the
        # siblings' sites are checked too, from their first hit in this run on
        sides = CR3Sides(self.guest.config.smp)
        sides.left(self.cpu, run.cr3)
        self._sibling_checker = TransitionChecker(self.guest.config.smp, list(self.sites.values()))
        self._sibling_sides = CR3Sides(self.guest.config.smp)
        for _ in range(MAX_STOPS):
            initial = first is not None
            pc = first if first is not None else self._continue(link, window, run)
            first = None
            self._arm(link, fixed)
            _, cr3, rsp, signal = self._state(link)
            where = sym.describe(pc)
            run.problems += checker.observe(self.cpu, signal, where)
            run.problems += sides.continues(self.cpu, cr3, where)
            kind = ""
            if initial:
                pass  # the interrupted instruction itself, not an event's stop
            elif pc == self.nmi_entry:
                kind = "event"
                depth += 1
                frame = bytes.fromhex(link.transact([f"Hg{self._thread}", f"m{rsp:x},28"])[1])
                ret = int.from_bytes(frame[0:8], "little")  # the IRET frame: rip, cs, rflags, rsp, ss
                ret_rsp = int.from_bytes(frame[24:32], "little")
                if not delivered:
                    delivered = True
                    return_to, return_rsp = ret, ret_rsp
                    found_signal, found_cr3 = signal, cr3  # as the event found them
                    if in_user_half(ret):
                        run.path = "from user"
                    elif ret != pc_k:
                        run.path = f"latched, taken at {sym.describe(ret)}"
                    self._arm(link, fixed | {ret})
            elif pc == self.paranoid:
                kind = "paranoid_entry"
                run.problems += checker.paranoid_entry(self.cpu, signal)  # its exit must put it back
                if not run.path or depth > 0:
                    run.path = f"paranoid_entry on the {cr3_side(cr3)} CR3"
            elif pc == self.handler:
                kind = "handler"
                if user_cr3(cr3) or signal != 1:
                    run.problems.append(
                        Finding(
                            Rule.EVENT_LEFT_STATE,
                            f"the NMI handler exc_nmi ran on the {cr3_side(cr3)} CR3 "
                            f"with the signal {signal}",
                            cpu=self.cpu,
                            where=where,
                        )
                    )
            # the return: the interrupted instruction on the interrupted stack (the handler
            # may run the same instruction itself, e.g. a nested paranoid_entry)
            if (
                return_to is not None
                and pc == return_to
                and rsp == return_rsp
                and depth > 0
                and kind != "event"
            ):
                depth -= 1
                returned = True
                self._record(run, "return", pc, where, depth, cr3, cr3, signal, signal)
                if signal != found_signal:
                    run.problems.append(
                        Finding(
                            Rule.EVENT_LEFT_STATE,
                            f"the NMI left the signal {signal}; it found {found_signal} "
                            f"(returning to {where})",
                            cpu=self.cpu,
                            where=where,
                        )
                    )
                if pc == pc_k and cr3 != found_cr3:
                    run.problems.append(
                        Finding(
                            Rule.EVENT_LEFT_STATE,
                            f"the NMI left CR3 {cr3:#x}; it found {found_cr3:#x}",
                            cpu=self.cpu,
                            where=where,
                        )
                    )
                if pc not in fixed:
                    self._disarm(link, pc)
                if in_user_half(pc) or (window.direction == "exit" and user_cr3(cr3) and pc == pc_k):
                    return  # back in user mode, or back past the exit's CR3 write
            elif kind:
                self._record(run, kind, pc, where, depth, cr3, cr3, signal, signal)
            site = self.sites.get(pc)
            if site is None:
                self._step_over(link, self.cpu, pc)  # a breakpoint that is not a switch
                continue
            paranoid_restore = checker.restores_paranoid_entry(self.cpu, site)
            self._step_over(link, self.cpu, pc)
            _, cr3_after, _, signal_after = self._state(link)
            sides.left(self.cpu, cr3_after)
            self._record(run, site.kind, pc, where, depth, cr3, cr3_after, signal, signal_after)
            run.problems += checker.check(Hit(self.cpu, site, cr3, cr3_after, signal, signal_after))
            if site.kind == "cr3-write" and user_cr3(cr3) and not user_cr3(cr3_after):
                if signal != 1:
                    wrong_kernel_since = where
            elif site.kind == "cr3-write" and not user_cr3(cr3) and user_cr3(cr3_after):
                if returned and (not paranoid_restore or depth == 0):
                    # an exit to user mode: every frame is unwound (an unexpected event taken
                    # in user mode after ours returned leaves that way too). Or, once ours
                    # returned, the paranoid exit of the exception it interrupted (the
                    # debug-trap window's #DB): that exception's state is then checked, and
                    # what follows is the window's own path, stepped by the scout (a #DB
                    # storm of the SYSENTER with TF: ~170 stops more to user mode)
                    depth = 0
                    after_return_user_write = True
                if depth == 1 and return_to is not None and in_user_half(return_to):
                    # an event taken in user mode leaves for user mode here (swapgs, iretq
                    # follow; a breakpoint on the user address is not reliable under TCG)
                    if signal_after != found_signal:
                        run.problems.append(
                            Finding(
                                Rule.EVENT_LEFT_STATE,
                                f"the NMI left the signal {signal_after}; it found {found_signal} ({where})",
                                cpu=self.cpu,
                                where=where,
                            )
                        )
                    return
            elif site.kind == "signal-store" and wrong_kernel_since is not None and signal_after == 1:
                run.problems.append(
                    Finding(
                        Rule.SIGNAL_0_ON_KERNEL_CR3,
                        f"the kernel ran on the kernel CR3 with the signal 0 from {wrong_kernel_since} "
                        f"until the store at {where}",
                        cpu=self.cpu,
                        where=where,
                    )
                )
                wrong_kernel_since = None
            if delivered and returned and depth == 0 and after_return_user_write:
                if wrong_kernel_since is not None:
                    run.problems.append(
                        Finding(
                            Rule.SIGNAL_0_ON_KERNEL_CR3,
                            f"the kernel ran on the kernel CR3 with the signal 0 from {wrong_kernel_since} "
                            f"until the user CR3 write at {where}",
                            cpu=self.cpu,
                            where=where,
                        )
                    )
                return
        last = "; ".join(s.render() for s in run.stops[-8:])
        run.problems.append(
            Finding(
                Rule.INCOMPLETE,
                f"not back in user mode within {MAX_STOPS} stops "
                f"(delivered={delivered}, returned={returned}, "
                f"return to {sym.describe(return_to) if return_to is not None else '-'}); last stops: {last}",
                cpu=self.cpu,
            )
        )

    @staticmethod
    def _record(
        run: BoundaryRun,
        kind: str,
        pc: int,
        where: str,
        depth: int,
        cr3_before: int,
        cr3_after: int,
        sig_before: int | None,
        sig_after: int | None,
    ) -> None:
        run.stops.append(Stop(kind, pc, where, depth, cr3_before, cr3_after, sig_before, sig_after))
