"""Single-step one vCPU while the others stay frozen, snapshotting every vCPU each step.

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
re-reading, so :meth:`Trace.frozen_violations` still reports a vCPU that moved
(as "by step N"). The watched words stay per step through *every* vCPU's page tables:
memory is what the stepping vCPU changes, and reading the signal through each vCPU is
the check itself.

**Why the stepping vCPU's CR3 is read only after an instruction that may write it.** In
64-bit mode only ``MOV CR3, reg`` writes CR3 (interrupts and exceptions do not; there are
no task switches). The Stepper reads the code at each new rip anyway (for the trace's
disassembly, through the stepping vCPU: the live, patched text); once the instruction a
step executes is known and :func:`rig.machine.x86.may_write_cr3` says it is not a CR3
write, the snapshot after it carries the CR3 before it; after a CR3 write, or an
instruction whose code is not known yet, CR3 is read. The last boundary reads CR3 again,
and a difference from the carried value is reported by :meth:`Trace.frozen_violations`.

**Pipelining.** The reads of a snapshot go in one write with their acknowledgements
(:meth:`RspLink.pipeline`); a step always ends its write (QEMU stops the VM at any byte
that arrives while a vCPU runs, so nothing may follow it), and its stop reply's ``+``
leads the next write. With a stop condition a step is two round trips (step; reads that
decide). Without one (``max_steps`` only, e.g. the exploration's boundary runs) the reads
of boundary k, the code at a new rip and step k+1 share one write: one round trip a step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rig.errors import GuestError
from rig.machine.vcpu import RegisterMap, stopped_cpu, thread_id
from rig.machine.x86 import PTI_USER_PGTABLE_BIT, may_write_cr3
from rig.transport.rsp import RspLink, frame, hex_le, is_error

#: Longest x86 instruction (bytes); what is read at each new rip to disassemble later.
MAX_INSN = 15


@dataclass(frozen=True)
class Watch:
    """A memory word to read at every step, through each vCPU's page tables."""

    name: str
    address: int
    size: int = 4


@dataclass
class Snapshot:
    """The machine at one instruction boundary.

    ``rip``/``cr3`` list every vCPU in index order; ``words[name][n]`` is the watched
    word as vCPU ``n`` reads it through its own page tables (None: not mapped there).
    ``insn`` is the instruction at the stepping vCPU's rip, about to execute.
    """

    step: int
    cpu: int
    rip: list[int]
    cr3: list[int]
    words: dict[str, list[int | None]]
    insn: str = ""
    where: str = ""

    @property
    def pc(self) -> int:
        """rip of the stepping vCPU."""
        return self.rip[self.cpu]

    def user_tables(self, cpu: int) -> bool:
        """True if vCPU ``cpu`` has the PTI user page tables loaded at this boundary."""
        return bool(self.cr3[cpu] & (1 << PTI_USER_PGTABLE_BIT))

    def to_json(self) -> str:
        d = asdict(self)
        d["rip"] = [f"{v:#x}" for v in self.rip]
        d["cr3"] = [f"{v:#x}" for v in self.cr3]
        return json.dumps(d)


StopCondition = Callable[[Snapshot], bool]


@dataclass(frozen=True)
class Mark:
    """Something that happened at a step, for reports (e.g. ``Mark(0, "event", "NMI")``)."""

    step: int
    kind: str
    text: str


@dataclass
class Trace:
    """The snapshots of one stepping run, plus the raw bytes of each distinct rip."""

    cpu: int
    ncpus: int
    snapshots: list[Snapshot] = field(default_factory=list)
    code: dict[int, bytes] = field(default_factory=dict)
    stopped_because: str = ""
    marks: list[Mark] = field(default_factory=list)
    #: the stepping vCPU's CR3 at the last boundary differed from the value carried
    #: from its last read (an instruction not decoded as a CR3 write changed it)
    untracked_cr3: str = ""

    def mark(self, step: int, kind: str, text: str) -> None:
        """Attach a marker (an event delivered, a store seen…) to boundary ``step``."""
        self.marks.append(Mark(step, kind, text))

    def write_jsonl(self, path: Path) -> None:
        """One JSON object per line, one line per instruction boundary."""
        with open(path, "w") as f:
            for s in self.snapshots:
                f.write(s.to_json() + "\n")

    def frozen_violations(self) -> list[str]:
        """Every change of a non-stepping vCPU's rip or CR3 during the run, and a change of
        the stepping vCPU's CR3 the run did not read (must be empty)."""
        out: list[str] = [self.untracked_cr3] if self.untracked_cr3 else []
        if not self.snapshots:
            return out
        first = self.snapshots[0]
        for s in self.snapshots[1:]:
            for n in range(self.ncpus):
                if n == self.cpu:
                    continue
                if s.rip[n] != first.rip[n] or s.cr3[n] != first.cr3[n]:
                    out.append(
                        f"step {s.step}: vCPU {n} moved: rip {first.rip[n]:#x}->{s.rip[n]:#x} "
                        f"cr3 {first.cr3[n]:#x}->{s.cr3[n]:#x}"
                    )
        return out

    def cr3_flips(self) -> list[tuple[int, bool]]:
        """(index into snapshots, now-on-user-tables) for each change of the stepper's CR3 side."""
        out = []
        for i in range(1, len(self.snapshots)):
            before = self.snapshots[i - 1].user_tables(self.cpu)
            after = self.snapshots[i].user_tables(self.cpu)
            if before != after:
                out.append((i, after))
        return out

    def render(self, limit: int = 60) -> str:
        """A human-readable table of the last ``limit`` snapshots."""
        lines = []
        names = list(self.snapshots[0].words) if self.snapshots else []
        for s in self.snapshots[-limit:]:
            cr3s = " ".join(f"{c:#x}" for c in s.cr3)
            words = " ".join(
                f"{n}=" + "/".join("-" if v is None else str(v) for v in s.words[n]) for n in names
            )
            lines.append(f"{s.step:5d} {s.pc:#018x} {s.where:<40.40} {s.insn:<40.40} cr3=[{cr3s}] {words}")
        return "\n".join(lines)


class Stepper:
    """Steps vCPU ``cpu`` of an ``ncpus`` guest on a borrowed link and snapshots each boundary."""

    def __init__(self, regmap: RegisterMap, ncpus: int, cpu: int, watches: Sequence[Watch] = ()):
        self.ncpus = ncpus
        self.cpu = cpu
        self.watches = list(watches)
        self._step_packet = f"vCont;s:{thread_id(cpu)}"
        reads = [f"m{w.address:x},{w.size:x}" for w in self.watches]
        rip, cr3 = regmap.packet("rip"), regmap.packet("cr3")
        # every vCPU: Hg, rip, cr3, the watches
        self._batch: list[str] = []
        for n in range(ncpus):
            self._batch += [f"Hg{thread_id(n)}", rip, cr3, *reads]
        # a step: the stepping vCPU's rip, cr3, watches; then each frozen vCPU's Hg, watches.
        # No Hg for the stepping vCPU when the stop reply names it: QEMU selects the vCPU
        # that stopped for register and memory access (gdb_set_stop_cpu) and names that
        # vCPU in the stop reply (gdb_vm_state_change).
        self._step_batch = [rip, cr3, *reads]
        for n in range(ncpus):
            if n != cpu and reads:
                self._step_batch += [f"Hg{thread_id(n)}", *reads]
        # the same without the stepping vCPU's CR3, after an instruction that cannot write it
        self._step_batch_same_cr3 = [p for i, p in enumerate(self._step_batch) if i != 1]
        self._select = f"Hg{thread_id(cpu)}"
        self._per_cpu = 3 + len(self.watches)

    def snapshot(self, link: RspLink, step: int) -> Snapshot:
        """Read every vCPU's rip and CR3 and every watch through every vCPU (one round trip)."""
        return self._parse_full(link.exchange(link.pipeline(self._batch), len(self._batch)), step)

    def _parse_full(self, replies: list[str], step: int) -> Snapshot:
        rips: list[int] = []
        cr3s: list[int] = []
        words: dict[str, list[int | None]] = {w.name: [] for w in self.watches}
        k = self._per_cpu
        for n in range(self.ncpus):
            r = replies[n * k : (n + 1) * k]
            if is_error(r[1]) or is_error(r[2]):
                raise GuestError(f"cannot read registers of vCPU {n}: {r[1]} {r[2]}")
            rips.append(hex_le(r[1]))
            cr3s.append(hex_le(r[2]))
            for w, val in zip(self.watches, r[3:], strict=True):
                words[w.name].append(None if is_error(val) else hex_le(val))
        return Snapshot(step, self.cpu, rips, cr3s, words)

    def _batch_after(self, trace: Trace, pc: int) -> list[str]:
        """The step batch for the boundary after executing the instruction at ``pc``."""
        code = trace.code.get(pc)
        return self._step_batch if code is None or may_write_cr3(code) else self._step_batch_same_cr3

    def _parse_step(self, replies: list[str], step: int, frozen: Snapshot, before: Snapshot) -> Snapshot:
        """A snapshot from a step batch (with or without CR3: ``len(replies)`` says): the
        frozen vCPUs' rip and CR3 from ``frozen``, the stepping vCPU's CR3 from ``before``
        when not read."""
        if len(replies) == len(self._step_batch_same_cr3):
            replies = [replies[0], "", *replies[1:]]
            cr3 = before.cr3[self.cpu]
        else:
            if is_error(replies[1]):
                raise GuestError(f"cannot read CR3 of vCPU {self.cpu}: {replies[1]}")
            cr3 = hex_le(replies[1])
        if is_error(replies[0]):
            raise GuestError(f"cannot read registers of vCPU {self.cpu}: {replies[0]}")
        rips = list(frozen.rip)
        cr3s = list(frozen.cr3)
        rips[self.cpu] = hex_le(replies[0])
        cr3s[self.cpu] = cr3
        nw = len(self.watches)
        words: dict[str, list[int | None]] = {w.name: [] for w in self.watches}
        at = 2 + nw  # the frozen vCPUs' groups follow the stepping vCPU's (Hg + watches each)
        for n in range(self.ncpus):
            if n == self.cpu:
                vals = replies[2 : 2 + nw]
            else:
                vals = replies[at + 1 : at + 1 + nw]
                at += 1 + nw
            for w, val in zip(self.watches, vals, strict=True):
                words[w.name].append(None if is_error(val) else hex_le(val))
        return Snapshot(step, self.cpu, rips, cr3s, words)

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

        With a ``stop`` condition each step costs two round trips: the step, then the
        reads that decide whether to step again. Without one, the reads of boundary k and
        step k+1 share one write (the step last): one round trip a step, and the code at
        a new rip is read in the write after the one that stepped over it.
        """
        trace = Trace(self.cpu, self.ncpus)
        full = link.pipeline(self._batch)
        first = self._parse_full(link.exchange(full, len(self._batch)), 0)
        trace.snapshots.append(first)
        if max_steps <= 0:
            snap = first
            trace.stopped_because = f"max_steps={max_steps}"
        elif stop is None:
            snap = self._run_pipelined(link, trace, first, max_steps, on_step)
            trace.stopped_because = f"max_steps={max_steps}"
        else:
            snap = self._run_checked(link, trace, first, max_steps, stop, on_step)
        # the last boundary: every vCPU read again (a frozen vCPU that moved shows here)
        last = self._parse_full(link.exchange(full, len(self._batch)), snap.step)
        if last.cr3[self.cpu] != snap.cr3[self.cpu]:
            trace.untracked_cr3 = (
                f"step {snap.step}: vCPU {self.cpu}'s CR3 is {last.cr3[self.cpu]:#x}, not the "
                f"{snap.cr3[self.cpu]:#x} carried since its last read (a CR3 write not decoded as one)"
            )
        last.words = snap.words
        trace.snapshots[-1] = last
        self._remember_code(link, trace, last)
        return trace

    def _code_read(self, link: RspLink, trace: Trace, pc: int) -> tuple[bytes, int]:
        """The pipelined read of the code at ``pc`` (and how many replies), or nothing if known."""
        if pc in trace.code:
            return b"", 0
        return link.pipeline([self._select, f"m{pc:x},{MAX_INSN:x}"]), 2

    def _check_step(self, reply: str) -> bool:
        """Raise unless ``reply`` is a stop reply; True if it names the stepping vCPU."""
        if not reply or reply[0] not in "ST":
            raise GuestError(f"single step of vCPU {self.cpu} answered {reply!r}")
        return stopped_cpu(reply) == self.cpu

    def _run_checked(
        self,
        link: RspLink,
        trace: Trace,
        first: Snapshot,
        max_steps: int,
        stop: StopCondition,
        on_step: Callable[[Snapshot], None] | None,
    ) -> Snapshot:
        step = frame(self._step_packet)
        select = link.pipeline([self._select])
        batches = {id(b): (link.pipeline(b), len(b)) for b in (self._step_batch, self._step_batch_same_cr3)}
        snap = first
        for i in range(1, max_steps + 1):
            # the code at a new rip, read through the stepping vCPU, then the step
            pc = snap.pc
            code, k = self._code_read(link, trace, pc)
            replies = link.exchange(code + step, k + 1, owe_last=True)
            if k:
                trace.code[pc] = _code_bytes(replies[1])
            reads, n = batches[id(self._batch_after(trace, pc))]
            if self._check_step(replies[-1]):
                snap = self._parse_step(link.exchange(reads, n), i, first, snap)
            else:
                snap = self._parse_step(link.exchange(select + reads, n + 1)[1:], i, first, snap)
            trace.snapshots.append(snap)
            if on_step is not None:
                on_step(snap)
            if stop(snap):
                trace.stopped_because = "condition"
                return snap
        trace.stopped_because = f"max_steps={max_steps}"
        return snap

    def _run_pipelined(
        self,
        link: RspLink,
        trace: Trace,
        first: Snapshot,
        max_steps: int,
        on_step: Callable[[Snapshot], None] | None,
    ) -> Snapshot:
        """Write j carries the reads of boundary j-1, the code at boundary j-2's rip if
        new, and step j (none after the last step)."""
        step = frame(self._step_packet)
        select = link.pipeline([self._select])
        batches = {id(b): (link.pipeline(b), len(b)) for b in (self._step_batch, self._step_batch_same_cr3)}
        code, k = self._code_read(link, trace, first.pc)
        replies = link.exchange(code + step, k + 1, owe_last=True)
        if k:
            trace.code[first.pc] = _code_bytes(replies[1])
        named = self._check_step(replies[-1])
        snap = first
        for j in range(2, max_steps + 2):
            last = j == max_steps + 1
            pc = snap.pc  # boundary j-2's rip: the instruction step j-1 executed
            # CR3 is read unless that instruction's code is already known not to write it
            reads, n = batches[id(self._batch_after(trace, pc))]
            head, nh = (reads, n) if named else (select + reads, n + 1)
            code, k = self._code_read(link, trace, pc)
            data = head + code + (b"" if last else step)
            replies = link.exchange(data, nh + k + (0 if last else 1), owe_last=not last)
            snap = self._parse_step(replies[nh - n : nh], j - 1, first, snap)
            if k:
                trace.code[pc] = _code_bytes(replies[nh + 1])
            trace.snapshots.append(snap)
            if on_step is not None:
                on_step(snap)
            if not last:
                named = self._check_step(replies[-1])
        return snap

    def _remember_code(self, link: RspLink, trace: Trace, snap: Snapshot) -> None:
        pc = snap.pc
        if pc in trace.code:
            return
        replies = link.transact([f"Hg{thread_id(self.cpu)}", f"m{pc:x},{MAX_INSN:x}"])
        trace.code[pc] = b"" if is_error(replies[1]) else bytes.fromhex(replies[1])


def _code_bytes(reply: str) -> bytes:
    return b"" if is_error(reply) else bytes.fromhex(reply)


def in_user_mode(cpu: int) -> StopCondition:
    """Stop once vCPU ``cpu``'s rip is in the lower (user) half."""

    def cond(s: Snapshot) -> bool:
        return s.rip[cpu] < 0x8000_0000_0000_0000

    return cond


def at_any(addresses: Iterable[int]) -> StopCondition:
    """Stop once the stepping vCPU's rip is one of ``addresses``."""
    targets = frozenset(addresses)

    def cond(s: Snapshot) -> bool:
        return s.pc in targets

    return cond
