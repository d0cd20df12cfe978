"""Explore asynchronous events at every instruction boundary of a CR3 switch window.

A :class:`Window` names an entry (or exit) path, the workload that drives it, and how
many boundaries around its signal store and CR3 write to try. :func:`explore`:

1. *scouts* the path once: breaks on the window's entry on the chosen vCPU and
   single-steps it past the CR3 write, locating the signal store and the CR3 write;
2. for each boundary k of the window, arrives afresh, steps k instructions, makes an NMI
   pending (QMP ``inject-nmi``: single-stepping masks interrupts, so it is taken on the
   next continue, exactly at boundary k), then *fast-forwards*: the vCPU runs alone at
   full TCG speed with breakpoints on every CR3 write and every signal store of the
   kernel (:mod:`rig.machine.sites`), on the NMI entry, ``paranoid_entry``, the C handler
   and the interrupted instruction. At each stop it reads CR3 and the signal (as a
   frozen sibling reads it), steps the one switch instruction, and checks:

   * a CR3 write that loads the kernel CR3 finds the signal at 1;
   * a CR3 write that loads the user CR3 finds it at 0, except the paranoid restore
     of the interrupted user CR3, which must find the value the event found;
   * the NMI handler body runs on the kernel CR3 with the signal at 1;
   * the event leaves the signal as it found it (checked when it returns to the
     interrupted instruction);
   * the signal changes only at a known store site.

   Between two stops neither CR3 nor the signal can change (every instruction that can
   change them is a breakpoint), so the checks at the stops cover every boundary of
   the run, the handler body included, without stepping it.

The run of boundary k ends once the event has returned and the interrupted path has
loaded the user CR3 again (or, for an exit window, when it returns to the user CR3).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rig.errors import GuestError
from rig.guest import Guest
from rig.machine.sites import Site, entry_disassembly
from rig.machine.stepper import Stepper, step_over
from rig.machine.storepaths import Instruction, parse_instructions
from rig.machine.trace import Snapshot, Trace, WatchedWord
from rig.machine.vcpu import stopped_cpu, thread_id
from rig.machine.x86 import cr3_side, in_user_half, may_leave_kernel_half, may_write_cr3, user_cr3
from rig.observe.checks import frozen_violations, gs_symbol, signal_problems, window_findings
from rig.observe.findings import Finding, Rule
from rig.observe.transitions import PARANOID_RESTORE_FUNCTIONS, CR3Sides, Hit, TransitionChecker
from rig.transport.rsp import RspLink, hex_le, is_error

#: NMIs injected through QMP reach vCPU 0 only (LINT1 is masked on the APs).
NMI_CPU = 0
#: Most switch-site stops one boundary's run may take before it is declared stuck (a
#: single-stepped SYSENTER takes ~40 #DBs of 3 stops each before it is back in user mode).
MAX_STOPS = 400
#: How many instructions from an entry symbol :meth:`Explorer.entry_addresses` searches
#: for the call whose return starts an exit window.
CALL_SEARCH = 200
#: Seconds one continue may run before the vCPU is interrupted and the run fails.
CONTINUE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Window:
    """A CR3 switch path to explore.

    ``entry``: symbols to break on (the first one the vCPU reaches starts the path);
    ``direction``: ``entry`` (user->kernel CR3) or ``exit`` (kernel->user);
    ``from_user``: the arrival must be on the user CR3 (entry paths from user mode);
    ``before``/``after``: boundaries tried before the signal store and past the CR3
    write; boundary 0 (the first instruction) is always tried; ``nmi_arrival``: the
    path is itself an NMI's (one is injected for each arrival); ``kernel_mode_only``: the
    entry (an exception without error code) must have interrupted kernel mode;
    ``after_call_to``: the path starts where the call to that function inside ``entry``
    returns (an exit window from the last C return to user mode).
    """

    name: str
    workload: str
    entry: tuple[str, ...]
    direction: Literal["entry", "exit"]
    from_user: bool = True
    before: int = 2
    after: int = 3
    scout_steps: int = 400
    nmi_arrival: bool = False
    kernel_mode_only: bool = False
    #: start at the instruction after the call to this function inside the ``entry``
    #: symbols (an exit window from its last C return), not at the symbols themselves
    after_call_to: str = ""


@dataclass(frozen=True)
class Stop:
    """One stop of a fast-forward: what ran there and the state around it.

    ``signal_*`` is the signal as the observer reads it; ``depth`` counts the events
    taken and not yet returned.
    """

    kind: str  # event | paranoid_entry | handler | return | cr3-write | signal-store
    address: int
    where: str
    depth: int
    cr3_before: int
    cr3_after: int
    signal_before: int | None
    signal_after: int | None

    def render(self) -> str:
        change = f"cr3 {cr3_side(self.cr3_before)}"
        if cr3_side(self.cr3_after) != cr3_side(self.cr3_before):
            change += f"->{cr3_side(self.cr3_after)}"
        sig = f"signal {self.signal_before}"
        if self.signal_after != self.signal_before:
            sig += f"->{self.signal_after}"
        return f"{self.kind:<14} {self.where:<40} depth {self.depth} {change:<16} {sig}"


@dataclass
class BoundaryRun:
    """The event delivered at boundary ``k`` of a window, and what followed."""

    k: int
    where: str
    insn: str
    cr3: int
    signal: int | None
    event: str
    path: str = ""
    stops: list[Stop] = field(default_factory=list)
    problems: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        return "ok" if not self.problems else "FAIL"


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


@dataclass
class Exploration:
    """Every boundary run of one window, with the scouted path."""

    window: Window
    cpu: int
    scout: Trace
    store_index: int
    cr3_index: int
    runs: list[BoundaryRun] = field(default_factory=list)
    seconds: float = 0.0
    #: single steps QEMU answered without executing (repeated; see runcontrol.step_over)
    repeated_steps: int = 0
    #: scouts given up before this one, each with why (their runs had no findings)
    abandoned: list[str] = field(default_factory=list)

    def unexplored(self) -> list[int]:
        """The boundaries from the signal store through its CR3 write (the race window)
        that have no run: an exploration that skipped them proves nothing there."""
        done = {r.k for r in self.runs}
        return [k for k in range(self.store_index, self.cr3_index + 1) if k not in done]

    def problems(self) -> list[Finding]:
        """Every violation, each naming the window, boundary, event and path; and any
        boundary of the race window left unexplored."""
        out: list[Finding] = []
        missing = self.unexplored()
        if missing:
            out.append(
                Finding(
                    Rule.INCOMPLETE,
                    f"{self.window.name}: boundaries {missing} between the signal store ({self.store_index}) "
                    f"and its CR3 write ({self.cr3_index}) were not explored",
                    cpu=self.cpu,
                )
            )
        for r in self.runs:
            for p in r.problems:
                out.append(
                    p.prefixed(
                        f"{self.window.name}: {r.event} at boundary {r.k} ({r.where} `{r.insn}`, "
                        f"{cr3_side(r.cr3)} CR3, signal {r.signal}), path {r.path}: "
                    )
                )
        return out

    def executed(self) -> set[int]:
        """Addresses of the switch sites this exploration executed (scout and runs)."""
        out = {s.pc for s in self.scout.snapshots}
        for r in self.runs:
            out |= {st.address for st in r.stops if st.kind in ("cr3-write", "signal-store")}
        return out

    def table(self) -> str:
        """One line per boundary: boundary, instruction, CR3, signal, event, path, verdict."""
        head = (
            f"{self.window.name}: {len(self.runs)} boundaries, store at {self.store_index}, "
            f"CR3 write at {self.cr3_index}, {self.seconds:.1f} s"
            + (f", {self.repeated_steps} single steps repeated" if self.repeated_steps else "")
        )
        lines = [head, f"{'k':>3} {'where':<36} {'instruction':<32} {'cr3':<6} sig event path verdict"]
        for r in self.runs:
            lines.append(
                f"{r.k:>3} {r.where:<36.36} {r.insn:<32.32} {cr3_side(r.cr3):<6} {r.signal!s:>3} "
                f"{r.event} {r.path} {r.verdict}{'' if not r.problems else ': ' + r.problems[0].text}"
            )
        for why in self.abandoned:
            lines.append(f"abandoned {why}")
        return "\n".join(lines)


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
        #: may return to kernel mode: see :meth:`_to_user_mode`)
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
        self._arrive(window)
        trace = self.guest.step(self.cpu, words=[self._word()], max_steps=window.scout_steps, stop=stop)
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
            for _ in range(tries):
                if window.nmi_arrival:
                    self._to_user_mode(link, window)
                    self.guest.machine.inject_nmi()  # taken at once: at this user-mode boundary
                pc = self._continue(link, window, None)
                cr3 = hex_le(link.transact([f"Hg{self._thread}", g.regmap.packet("cr3")])[1])
                if pc in entries and user_cr3(cr3) == window.from_user and self._mode_ok(link, window):
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
                    self._to_user_mode(link, window)
                    self._arm(link, entries)
        finally:
            for a in entries:
                self._disarm(link, a)
        want = "user" if window.from_user else "kernel"
        raise GuestError(
            f"{window.name}: {tries} hits of {window.entry} in a row were not on the {want} CR3 "
            f"(last: {seen})"
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

    def _mode_ok(self, link: RspLink, window: Window) -> bool:
        """For ``kernel_mode_only`` windows: the IRET frame at %rsp returns to kernel mode."""
        if not window.kernel_mode_only:
            return True
        rsp = hex_le(link.transact([f"Hg{self._thread}", self.guest.regmap.packet("rsp")])[1])
        frame = link.transact([f"m{rsp:x},8"])[0]
        return not is_error(frame) and not in_user_half(int.from_bytes(bytes.fromhex(frame), "little"))

    def _to_user_mode(self, link: RspLink, window: Window, max_steps: int = 64) -> None:
        """Bring vCPU ``cpu`` to a user-mode boundary: run to the next CR3 write of an exit
        to user mode that loads the user CR3, then step to user mode. (An NMI made pending
        in kernel mode would be taken there; one made pending in user mode is an NMI from
        user.) A paranoid exit's restore of a user CR3 is not one: the exception may have
        interrupted kernel mode on the user CR3 (a #DB at the SYSENTER entry), and it
        returns there, to the entry's own switch to the kernel CR3."""
        g = self.guest
        cs_packet, cr3_packet, rip_packet = (g.regmap.packet(r) for r in ("cs", "cr3", "rip"))
        writes = self._exit_writes
        for _ in range(20):
            if hex_le(link.transact([f"Hg{self._thread}", cs_packet])[1]) & 3:
                return
            self._arm(link, writes)
            try:
                pc = self._continue(link, window, None)
                self._step_over(link, self.cpu, pc)
            finally:
                for a in writes:
                    self._disarm(link, a)
            for _ in range(max_steps):
                r = link.transact([f"Hg{self._thread}", cs_packet, cr3_packet, rip_packet])
                if hex_le(r[1]) & 3 or not user_cr3(hex_le(r[2])):
                    break
                self._step_over(link, self.cpu, hex_le(r[3]))
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
        stepped = stepper.run(link, max_steps=k).snapshots
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
                if not paranoid_restore and returned:
                    # an exit to user mode: every frame is unwound (an unexpected event taken
                    # in user mode after ours returned leaves that way too)
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


#: In a sampled exploration, every how many boundaries outside the race window one is tried.
SAMPLE_EVERY = 4


def boundaries_of(window: Window, store: int, cr3_write: int, last: int, *, every: bool = False) -> list[int]:
    """The boundaries of a scouted path (last index ``last``) that get an event.

    ``every``: all of them, from the first instruction to ``after`` boundaries past the
    CR3 write (an exit's scout ends in user mode: its user-mode boundaries are skipped
    by the caller). Otherwise a deterministic sample: boundary 0, ``before`` boundaries
    ahead of the store through ``after`` past the CR3 write (the race window, always
    whole), and every :data:`SAMPLE_EVERY`-th boundary of the rest.
    """
    end = min(last, cr3_write + window.after)
    if every:
        return list(range(end + 1))
    race = set(range(max(0, store - window.before), end + 1))
    return sorted({0, *race, *range(0, end + 1, SAMPLE_EVERY)})


def explore(
    guest: Guest,
    sites: Sequence[Site],
    window: Window,
    *,
    signal: str,
    cpu: int = NMI_CPU,
    tries: int = 5,
    every: bool = False,
) -> Exploration:
    """Explore ``window`` on vCPU ``cpu``: an NMI at each of its boundaries (see the module
    doc; ``every``: all of them, else the sample of :func:`boundaries_of`).

    The window's workload must already run on ``cpu``. Each boundary's arrival is retried
    up to ``tries`` times when the path differs from the scouted one.
    """
    t0 = time.monotonic()
    with quiet_console(guest):
        result = _explore(guest, sites, window, signal, cpu, tries, every=every)
    result.seconds = time.monotonic() - t0
    return result


@contextlib.contextmanager
def quiet_console(guest: Guest) -> Iterator[None]:
    """Keep kernel messages off the serial console for the block (console_loglevel 0).

    Every injected NMI makes the kernel print "Uhhuh. NMI received for unknown reason"
    at KERN_EMERG; under TCG each line on the emulated UART costs the vCPU ~0.5 s, which
    would dominate the exploration. Panics and oopses still reach the console (they
    call console_verbose()); the messages stay in the kernel log.
    """
    out, status = guest.shell("cat /proc/sys/kernel/printk")
    if status != 0 or not out.split():
        yield  # no sysctl: nothing to quiet
        return
    guest.shell("echo 0 > /proc/sys/kernel/printk")
    try:
        yield
    finally:
        if guest.machine.alive and not guest.closed:
            guest.shell(f"echo {out.split()[0]} > /proc/sys/kernel/printk")


def _explore(
    guest: Guest,
    sites: Sequence[Site],
    window: Window,
    signal: str,
    cpu: int,
    tries: int,
    scouts: int = 3,
    *,
    every: bool = False,
) -> Exploration:
    """Scout, then explore; a scout whose path the arrivals do not follow (it took a rare
    branch) is replaced by a new one, up to ``scouts`` times."""
    ex = Explorer(guest, sites, cpu=cpu, signal=signal)
    abandoned: list[str] = []
    k = 0
    for attempt in range(1, scouts + 1):
        scout, store, cr3_write = ex.scout(window)
        result = Exploration(window, cpu, scout, store, cr3_write)
        # the scout is a stepped trace: held to the stepped rules, the store-to-write rule too
        problems = signal_problems(scout, ex.observer, signal, complete=False)
        problems += window_findings(scout, ex.observer, signal, gs_symbol(guest.symbols))
        problems += frozen_violations(scout)
        if problems:
            result.runs.append(
                BoundaryRun(
                    -1, "scout", "", scout.snapshots[0].cr3[cpu], None, "none", "stepped", problems=problems
                )
            )
        last = len(scout.snapshots) - 1
        guest.stop()
        with guest.link() as link:
            for k in boundaries_of(window, store, cr3_write, last, every=every):
                if in_user_half(scout.snapshots[k].pc):
                    continue  # user mode: not part of the window
                run = next(
                    (
                        r
                        for r in (
                            ex.run_boundary(link, window, k, scout.snapshots[k], start=scout.snapshots[0].pc)
                            for _ in range(tries)
                        )
                        if r
                    ),
                    None,
                )
                if run is None:
                    complete = False
                    break
                result.runs.append(run)
            else:
                complete = True
            # a finding in any run ends the exploration with this scout, even if a later
            # boundary's arrivals took another path: no judged run is thrown away
            if complete or any(r.problems for r in result.runs):
                result.repeated_steps = ex.repeated_steps
                result.abandoned = abandoned
                _mark_runs(scout, result)
                return result
        # every run of this attempt was judged and clean; its scout's path is not the one
        # the arrivals follow, so a new scout replaces it (listed in the report)
        abandoned.append(
            f"scout {attempt}: arrivals took another path to boundary {k} ({ex.mismatch}); "
            f"{len(result.runs)} boundaries explored, no findings"
        )
        if attempt == scouts:
            raise GuestError(
                f"{window.name}: {tries} arrivals in a row took another path to boundary {k} "
                f"(last {ex.mismatch}), after {scouts} scouts"
            )
        guest.traces.pop()  # that scout's trace: replaced by the next one
    raise AssertionError("unreachable")


def _mark_runs(scout: Trace, result: Exploration) -> None:
    """Mark each explored boundary on the scout (the trace a failure's timeline shows)."""
    for r in result.runs:
        if r.k >= 0:
            scout.mark(r.k, "event", f"{r.event} at boundary {r.k}: path {r.path}, {r.verdict}")
