"""Single-step one vCPU while the others stay frozen, snapshotting every vCPU each step;
and step one vCPU over one instruction (:func:`step_over`).

The loop speaks raw RSP on the link borrowed from the GDB relay: ``vCont;s:<thread>``
steps only that vCPU, then one pipelined write reads the stepping vCPU's rip and CR3
and each watched word through every vCPU's page tables. At most two round trips a step, no
timeouts: each read blocks only until QEMU's reply arrives.

**Why the frozen vCPUs' rip and CR3 are read once per run, not per step.** QEMU's
gdbstub resumes only the vCPUs a ``vCont`` gives an action: ``gdb_continue_partial``
(gdbstub/gdbstub.c, QEMU 7.2 and later) calls ``cpu_single_step``/``cpu_resume`` for
``s``/``c`` and does nothing for a vCPU without one ("nothing to do here"), so a frozen
vCPU executes no instruction, takes no interrupt and its registers do not change while
another is stepped (only the gdbstub could write them, and this loop writes none). The
Stepper reads every vCPU's rip and CR3 before the first step and again after the last
one (the end of the run, whether by ``stop`` or ``max_steps``); the snapshots in between
carry the first reading for the frozen vCPUs, and the last snapshot carries the
re-reading, so :func:`rig.observe.checks.frozen_violations` still reports a vCPU that moved
(as "by step N"). The watched words stay per step through *every* vCPU's page tables:
memory is what the stepping vCPU changes, and reading the signal through each vCPU is
the check itself.

**Why the stepping vCPU's CR3 is read only after an instruction that may write it.** In
64-bit mode only ``MOV CR3, reg`` writes CR3 (interrupts and exceptions do not; there are
no task switches). The Stepper reads the code at each new rip anyway (for the trace's
disassembly, through the stepping vCPU: the live, patched text; in lines of 64 bytes, so
one read serves the instructions that follow, see :class:`CodeLines`); once the instruction a
step executes is known and :func:`rig.machine.x86.may_write_cr3` says it is not a CR3
write, the snapshot after it carries the CR3 before it; after a CR3 write, or an
instruction whose code is not known yet, CR3 is read. The last boundary reads CR3 again,
and a difference from the carried value is reported by :func:`rig.observe.checks.frozen_violations`.

**Pipelining.** The reads of a snapshot go in one write with their acknowledgements
(:meth:`RspLink.pipeline`); a step always ends its write (QEMU stops the VM at any byte
that arrives while a vCPU runs, so nothing may follow it), and its stop reply's ``+``
leads the next write. Without a stop condition (``max_steps`` only, e.g. the
exploration's boundary runs) the reads of boundary k, the code at a new rip and step k+1
share one write: one round trip a step, and boundary k is parsed while QEMU answers that
write (only its rip and the stop reply are needed to build it). With one, step k+1 may
only be sent once boundary k is known not to satisfy it: in general two round trips a
step (the reads that decide, then the step). A :class:`ForeseeingStop` (``in_user_mode``,
``on_kernel_tables``…) knows that earlier for most instructions: a ``mov``, a ``call``
or a ``jcc`` in kernel text cannot put rip in the user half, and only ``mov %reg,%cr3``
changes the CR3 side. After such an instruction step k+1 ends the write that reads
boundary k, as without a condition; were the condition to hold there after all, the run
ends in an error, never in a silent overshoot. Each group of reads is ordered so that no ``Hg`` is needed
beyond one per frozen vCPU: the stepping vCPU's reads (and a code read) come first,
while the stop has it selected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from rig.errors import GuestError
from rig.machine.stops import ForeseeingStop, StopCondition
from rig.machine.symbols import SymbolTable
from rig.machine.trace import Snapshot, Trace, WatchedWord
from rig.machine.vcpu import RegisterMap, stopped_cpu, thread_id
from rig.machine.x86 import may_write_cr3
from rig.transport.rsp import RspLink, frame, hex_le, is_error

__all__ = ["CODE_LINE", "MAX_INSN", "STEP_TRIES", "CodeLines", "Stepper", "step_over"]

#: Longest x86 instruction (bytes); what is kept of each new rip to disassemble later.
MAX_INSN = 15

#: Bytes of code per cached line (a power of two): see :class:`CodeLines`.
CODE_LINE = 64


class _Layout(NamedTuple):
    """Where a boundary's replies sit in a write's replies (see ``Stepper._reads_after``):
    ``first`` replies before the stepping vCPU's (its ``Hg``), ``mine`` of its reads,
    ``code`` reads of code (0 or 1) after them, ``total`` replies in all (the frozen
    vCPUs' last)."""

    first: int
    mine: int
    code: int
    total: int


class Stepper:
    """Steps vCPU ``cpu`` of an ``ncpus`` guest on a borrowed link and snapshots each boundary."""

    def __init__(self, regmap: RegisterMap, ncpus: int, cpu: int, words: Sequence[WatchedWord] = ()):
        self.ncpus = ncpus
        self.cpu = cpu
        self.words = list(words)
        self._step_packet = f"vCont;s:{thread_id(cpu)}"
        reads = [f"m{w.address:x},{w.size:x}" for w in self.words]
        rip, cr3 = regmap.packet("rip"), regmap.packet("cr3")
        # every vCPU: Hg, rip, cr3, the watched words
        self._batch: list[str] = []
        for n in range(ncpus):
            self._batch += [f"Hg{thread_id(n)}", rip, cr3, *reads]
        # a step: the stepping vCPU's rip, cr3, words; then each frozen vCPU's Hg, words.
        # No Hg for the stepping vCPU when the stop reply names it: QEMU selects the vCPU
        # that stopped for register and memory access (gdb_set_stop_cpu) and names that
        # vCPU in the stop reply (gdb_vm_state_change).
        self._mine = [rip, cr3, *reads]
        # the same without the stepping vCPU's CR3, after an instruction that cannot write it
        self._mine_same_cr3 = [rip, *reads]
        self._frozen_reads: list[str] = []
        for n in range(ncpus):
            if n != cpu and reads:
                self._frozen_reads += [f"Hg{thread_id(n)}", *reads]
        self._select = f"Hg{thread_id(cpu)}"
        self._per_cpu = 3 + len(self.words)
        # where each word's reply for each vCPU sits in a step batch, counted from the
        # stepping vCPU's first word: its own words, then per frozen vCPU Hg + words
        nw = len(self.words)
        frozen = [n for n in range(ncpus) if n != cpu]
        self._word_offsets = [
            (w.name, [i if n == cpu else nw + frozen.index(n) * (1 + nw) + 1 + i for n in range(ncpus)])
            for i, w in enumerate(self.words)
        ]
        self._named_stop = ""  # the last stop reply seen naming the stepping vCPU

    def snapshot(self, link: RspLink, step: int) -> Snapshot:
        """Read every vCPU's rip and CR3 and every watched word through every vCPU (one round trip)."""
        return self._parse_full(link.exchange(link.pipeline(self._batch), len(self._batch)), step)

    def _parse_full(self, replies: list[str], step: int) -> Snapshot:
        rips: list[int] = []
        cr3s: list[int] = []
        words: dict[str, list[int | None]] = {w.name: [] for w in self.words}
        k = self._per_cpu
        for n in range(self.ncpus):
            r = replies[n * k : (n + 1) * k]
            if is_error(r[1]) or is_error(r[2]):
                raise GuestError(f"cannot read registers of vCPU {n}: {r[1]} {r[2]}")
            rips.append(hex_le(r[1]))
            cr3s.append(hex_le(r[2]))
            for w, val in zip(self.words, r[3:], strict=True):
                words[w.name].append(None if is_error(val) else hex_le(val))
        return Snapshot(step, self.cpu, rips, cr3s, words)

    def _parse_step(self, replies: list[str], step: int, frozen: Snapshot, before: Snapshot) -> Snapshot:
        """A snapshot from a step batch (with or without CR3: ``len(replies)`` says): the
        frozen vCPUs' rip and CR3 from ``frozen``, the stepping vCPU's CR3 from ``before``
        when not read."""
        cpu = self.cpu
        if len(replies) == len(self._mine_same_cr3) + len(self._frozen_reads):
            cr3 = before.cr3[cpu]
            base = 1
        else:
            if is_error(replies[1]):
                raise GuestError(f"cannot read CR3 of vCPU {cpu}: {replies[1]}")
            cr3 = hex_le(replies[1])
            base = 2
        if is_error(replies[0]):
            raise GuestError(f"cannot read registers of vCPU {cpu}: {replies[0]}")
        rips = frozen.rip.copy()
        cr3s = frozen.cr3.copy()
        rips[cpu] = hex_le(replies[0])
        cr3s[cpu] = cr3
        words = {
            name: [None if is_error(v) else hex_le(v) for v in (replies[base + o] for o in offsets)]
            for name, offsets in self._word_offsets
        }
        return Snapshot(step, cpu, rips, cr3s, words)

    def run(
        self,
        link: RspLink,
        *,
        max_steps: int,
        stop: StopCondition | None = None,
        on_step: Callable[[Snapshot], None] | None = None,
    ) -> Trace:
        """Snapshot, then step and snapshot until ``stop`` holds or ``max_steps`` steps ran.

        The first snapshot is the boundary before any step. ``code`` gets the bytes of each
        distinct rip, read through the stepping vCPU. The frozen vCPUs' rip and CR3 are
        read at the first and the last boundary (see the module's doc); ``stop`` and
        ``on_step`` see the first reading for them in between.

        Without a ``stop`` condition the reads of boundary k and step k+1 share one write
        (the step last): one round trip a step, and the code at a new rip is read in the
        write after the one that stepped over it. With one, a step costs two round trips
        (the reads that decide whether to step again, then the step), or one after an
        instruction that a :class:`ForeseeingStop` says cannot make it hold
        (``Trace.steps_ahead`` counts those).
        """
        trace = Trace(self.cpu, self.ncpus)
        lines = CodeLines()
        full = link.pipeline(self._batch)
        first = self._parse_full(link.exchange(full, len(self._batch)), 0)
        trace.snapshots.append(first)
        if max_steps <= 0:
            snap = first
            trace.stopped_because = f"max_steps={max_steps}"
        elif stop is None:
            snap = self._run_pipelined(link, trace, lines, first, max_steps, on_step)
            trace.stopped_because = f"max_steps={max_steps}"
        else:
            snap = self._run_checked(link, trace, lines, first, max_steps, stop, on_step)
        # the last boundary: every vCPU read again (a frozen vCPU that moved shows here)
        last = self._parse_full(link.exchange(full, len(self._batch)), snap.step)
        if last.cr3[self.cpu] != snap.cr3[self.cpu]:
            trace.untracked_cr3 = (
                f"step {snap.step}: vCPU {self.cpu}'s CR3 is {last.cr3[self.cpu]:#x}, not the "
                f"{snap.cr3[self.cpu]:#x} carried since its last read (a CR3 write not decoded as one)"
            )
            trace.untracked_cr3_step = snap.step
        last.words = snap.words
        trace.snapshots[-1] = last
        self._remember_code(link, trace, lines, last)
        return trace

    def _framed(self, link: RspLink) -> tuple[bytes, bytes, bytes, bytes, bytes]:
        """The step and the parts of a boundary's reads, framed for ``link``."""
        return (
            frame(self._step_packet),
            link.pipeline([self._select]),
            link.pipeline(self._mine),
            link.pipeline(self._mine_same_cr3),
            link.pipeline(self._frozen_reads),
        )

    def _reads_after(
        self,
        link: RspLink,
        trace: Trace,
        lines: CodeLines,
        pc: int,
        named: bool,
        framed: tuple[bytes, bytes, bytes, bytes, bytes],
    ) -> tuple[bytes, _Layout]:
        """The write that reads the boundary after the instruction at ``pc``, and where its
        replies sit.

        In order: the stepping vCPU's ``Hg`` unless the stop reply ``named`` it; its rip,
        its CR3 (unless ``pc``'s code is known not to write CR3) and watched words; the code
        around ``pc`` if neither ``trace`` nor ``lines`` has it (read while the stepping
        vCPU is selected: no ``Hg`` of its own); then each frozen vCPU's ``Hg`` and watched words.
        """
        _, select, mine_full, mine_same, frozen = framed
        code_read = b""
        code = self._known_code(trace, lines, pc)
        if code is None:
            start, size = lines.span(pc)
            code_read = link.pipeline([f"m{start:x},{size:x}"])
        if code is None or may_write_cr3(code):
            mine, nm = mine_full, len(self._mine)
        else:
            mine, nm = mine_same, len(self._mine_same_cr3)
        head, first = (b"", 0) if named else (select, 1)
        k = 1 if code_read else 0
        layout = _Layout(first, nm, k, first + nm + k + len(self._frozen_reads))
        return head + mine + code_read + frozen, layout

    @staticmethod
    def _split(replies: list[str], layout: _Layout) -> tuple[list[str], str | None]:
        """The snapshot's replies (as :meth:`_parse_step` takes them) and the code read's."""
        at = layout.first + layout.mine
        return replies[layout.first : at] + replies[at + layout.code : layout.total], (
            replies[at] if layout.code else None
        )

    def _check_step(self, reply: str) -> bool:
        """Raise unless ``reply`` is a stop reply; True if it names the stepping vCPU."""
        if reply == self._named_stop:
            return True
        if not reply or reply[0] not in "ST":
            raise GuestError(f"single step of vCPU {self.cpu} answered {reply!r}")
        if stopped_cpu(reply) == self.cpu:
            self._named_stop = reply
            return True
        return False

    def _run_checked(
        self,
        link: RspLink,
        trace: Trace,
        lines: CodeLines,
        first: Snapshot,
        max_steps: int,
        stop: StopCondition,
        on_step: Callable[[Snapshot], None] | None,
    ) -> Snapshot:
        """Step i executed the instruction at boundary i-1's rip; one write reads boundary i.

        When ``stop`` foresees (:class:`ForeseeingStop`) that the instruction step i
        executed cannot make it hold, step i+1 ends that write (one round trip a step);
        otherwise step i+1 is sent alone once boundary i is known not to satisfy ``stop``
        (two). Never with an ``on_step``: it runs while the VM is stopped before the
        next step, and may use the link.
        """
        framed = self._framed(link)
        step = framed[0]
        foresee = stop.may_hold_after if on_step is None and isinstance(stop, ForeseeingStop) else None
        named = self._check_step(link.exchange(step, 1, owe_last=True)[0])
        snap = first
        for i in range(1, max_steps + 1):
            pc = snap.pc  # the instruction step i executed
            data, layout = self._reads_after(link, trace, lines, pc, named, framed)
            # i > 1: the condition was found not to hold at boundary i-1 (the first boundary
            # is not evaluated); no code read in this write: the instruction is known
            # (``_reads_after`` put it in ``trace.code``)
            ahead = (
                foresee is not None
                and 1 < i < max_steps
                and not layout.code
                and not foresee(self.cpu, pc, trace.code[pc])
            )
            if ahead:
                link.send(data + step, owe_last=True)
                replies = link.receive(layout.total + 1)
                trace.steps_ahead += 1
            else:
                replies = link.exchange(data, layout.total)
            reads, code = self._split(replies, layout)
            if code is not None:
                trace.code[pc] = lines.store(pc, code)
            snap = self._parse_step(reads, i, first, snap)
            trace.snapshots.append(snap)
            if on_step is not None:
                on_step(snap)
            if stop(snap):
                if ahead:
                    raise GuestError(
                        f"the stop condition {stop!r} holds at step {i} (rip {snap.pc:#x}) after the "
                        f"instruction at {pc:#x} ({trace.code[pc].hex()}), which it foresaw could not make "
                        f"it hold; step {i + 1} was already sent, so vCPU {self.cpu} is one step further"
                    )
                trace.stopped_because = "condition"
                return snap
            if ahead:
                named = self._check_step(replies[-1])
            elif i < max_steps:
                named = self._check_step(link.exchange(step, 1, owe_last=True)[0])
        trace.stopped_because = f"max_steps={max_steps}"
        return snap

    def _run_pipelined(
        self,
        link: RspLink,
        trace: Trace,
        lines: CodeLines,
        first: Snapshot,
        max_steps: int,
        on_step: Callable[[Snapshot], None] | None,
    ) -> Snapshot:
        """Write j carries the reads of boundary j-1 (with the code at boundary j-2's rip
        if new) and step j (none after the last step).

        Only what write j needs is taken from write j-1's replies before it is sent
        (the stop reply, boundary j-2's rip); boundary j-2's snapshot is parsed while
        QEMU answers write j, unless there is an ``on_step`` (it may use the link, so
        it runs before write j, while the VM is stopped).
        """
        framed = self._framed(link)
        step = framed[0]
        named = self._check_step(link.exchange(step, 1, owe_last=True)[0])
        snap = first
        pc = first.pc
        unparsed: list[str] = []  # boundary j-2's replies, parsed once write j is sent
        early = on_step is not None  # it may use the link: parse (and call it) while stopped

        def take(replies: list[str], step_no: int) -> None:
            nonlocal snap
            snap = self._parse_step(replies, step_no, first, snap)
            trace.snapshots.append(snap)
            if on_step is not None:
                on_step(snap)

        for j in range(2, max_steps + 2):
            last = j == max_steps + 1
            if unparsed:
                if is_error(unparsed[0]):
                    raise GuestError(f"cannot read registers of vCPU {self.cpu}: {unparsed[0]}")
                pc = hex_le(unparsed[0])  # boundary j-2's rip: the instruction step j-1 executed
                if early:
                    take(unparsed, j - 2)
            data, layout = self._reads_after(link, trace, lines, pc, named, framed)
            link.send(data + (b"" if last else step), owe_last=not last)
            if unparsed and not early:
                take(unparsed, j - 2)
            replies = link.receive(layout.total + (0 if last else 1))
            unparsed, code = self._split(replies, layout)
            if code is not None:
                trace.code[pc] = lines.store(pc, code)
            if not last:
                named = self._check_step(replies[-1])
        take(unparsed, max_steps)
        trace.steps_ahead = max_steps - 1
        return snap

    @staticmethod
    def _known_code(trace: Trace, lines: CodeLines, pc: int) -> bytes | None:
        """The code at ``pc`` if ``trace`` or ``lines`` has it (then ``trace`` has it), else None."""
        code = trace.code.get(pc)
        if code is None:
            code = lines.at(pc)
            if code is not None:
                trace.code[pc] = code
        return code

    def _remember_code(self, link: RspLink, trace: Trace, lines: CodeLines, snap: Snapshot) -> None:
        """The code at the last boundary's rip, for the trace's disassembly."""
        pc = snap.pc
        if self._known_code(trace, lines, pc) is not None:
            return
        replies = link.transact([self._select, f"m{pc:x},{MAX_INSN:x}"])
        trace.code[pc] = b"" if is_error(replies[1]) else bytes.fromhex(replies[1])


class CodeLines:
    """Code read through the stepping vCPU in aligned lines of :data:`CODE_LINE` bytes, for
    one run: a read at a new rip fetches its line and the next (up to the page's end),
    so the instructions that follow it need no read of their own.

    Invariant: a line is stored only when read whole, and only lines of the page the read
    started in (the next page may not be mapped through this vCPU's CR3). The bytes
    are those of the moment of the read, as with a read per rip: code the stepping vCPU
    patches later in the same run shows as read (the last boundary's CR3 re-check
    still catches a CR3 write hidden that way, see the module's doc).
    """

    def __init__(self) -> None:
        self._lines: dict[int, bytes] = {}

    def at(self, pc: int) -> bytes | None:
        """The :data:`MAX_INSN` bytes at ``pc`` if its line(s) were read, else None."""
        line = pc & -CODE_LINE
        first = self._lines.get(line)
        if first is None:
            return None
        off = pc - line
        if off + MAX_INSN <= CODE_LINE:
            return first[off : off + MAX_INSN]
        second = self._lines.get(line + CODE_LINE)
        return None if second is None else (first + second)[off : off + MAX_INSN]

    @staticmethod
    def span(pc: int) -> tuple[int, int]:
        """Where to read for ``pc``: (start, bytes): its line and the next, cut at the page
        end unless the instruction at ``pc`` may cross it."""
        start = pc & -CODE_LINE
        end = min(start + 2 * CODE_LINE, (pc | 0xFFF) + 1)
        return start, max(end, pc + MAX_INSN) - start

    def store(self, pc: int, reply: str) -> bytes:
        """Keep the lines of a reply to :meth:`span`'s read for ``pc``; the bytes at ``pc``
        (empty if the read failed)."""
        if is_error(reply):
            return b""
        data = bytes.fromhex(reply)
        start = pc & -CODE_LINE
        page_end = (pc | 0xFFF) + 1
        for at in range(start, min(start + len(data), page_end) - CODE_LINE + 1, CODE_LINE):
            self._lines[at] = data[at - start : at - start + CODE_LINE]
        return data[pc - start : pc - start + MAX_INSN]


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


def arm_breakpoints(link: RspLink, addresses: Iterable[int]) -> list[int]:
    """Insert a software breakpoint at each address (every vCPU); return them, sorted.

    Raises:
        GuestError: QEMU refused one; those it took are removed again first.
    """
    addrs = sorted(set(addresses))
    replies = link.transact([f"Z0,{a:x},1" for a in addrs])
    bad = [f"{a:#x}:{r}" for a, r in zip(addrs, replies, strict=True) if r != "OK"]
    if bad:
        taken = [a for a, r in zip(addrs, replies, strict=True) if r == "OK"]
        if taken:
            link.transact([f"z0,{a:x},1" for a in taken])
        raise GuestError(f"QEMU refused breakpoints {bad}")
    return addrs
