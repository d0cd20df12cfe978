"""Single-step one vCPU while the others stay frozen, snapshotting every vCPU each step.

The loop speaks raw RSP on the link borrowed from the GDB relay: ``vCont;s:<thread>``
steps only that vCPU (QEMU leaves vCPUs without an action stopped, as GDB's
``scheduler-locking step`` does), then one pipelined batch reads rip and CR3 of every
vCPU and each watched word through every vCPU's page tables. Two round trips a step,
no timeouts: each read blocks only until QEMU's reply arrives.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rig.errors import GuestError
from rig.machine.vcpu import RegisterMap, thread_id
from rig.machine.x86 import PTI_USER_PGTABLE_BIT
from rig.transport.rsp import RspLink, hex_le, is_error

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

    def mark(self, step: int, kind: str, text: str) -> None:
        """Attach a marker (an event delivered, a store seen…) to boundary ``step``."""
        self.marks.append(Mark(step, kind, text))

    def write_jsonl(self, path: Path) -> None:
        """One JSON object per line, one line per instruction boundary."""
        with open(path, "w") as f:
            for s in self.snapshots:
                f.write(s.to_json() + "\n")

    def frozen_violations(self) -> list[str]:
        """Every change of a non-stepping vCPU's rip or CR3 during the run (must be empty)."""
        out: list[str] = []
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
        batch: list[str] = []
        for n in range(ncpus):
            batch += [f"Hg{thread_id(n)}", regmap.packet("rip"), regmap.packet("cr3")]
            batch += [f"m{w.address:x},{w.size:x}" for w in self.watches]
        self._batch = batch
        self._per_cpu = 3 + len(self.watches)

    def snapshot(self, link: RspLink, step: int) -> Snapshot:
        """Read every vCPU's rip and CR3 and every watch through every vCPU (one round trip)."""
        replies = link.transact(self._batch)
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
        distinct rip, read through the stepping vCPU when first seen.
        """
        trace = Trace(self.cpu, self.ncpus)
        snap = self.snapshot(link, 0)
        self._remember_code(link, trace, snap)
        trace.snapshots.append(snap)
        for i in range(1, max_steps + 1):
            reply = link.transact([self._step_packet])[0]
            if not reply or reply[0] not in "ST":
                raise GuestError(f"single step of vCPU {self.cpu} answered {reply!r}")
            snap = self.snapshot(link, i)
            self._remember_code(link, trace, snap)
            trace.snapshots.append(snap)
            if on_step is not None:
                on_step(snap)
            if stop is not None and stop(snap):
                trace.stopped_because = "condition"
                return trace
        trace.stopped_because = f"max_steps={max_steps}"
        return trace

    def _remember_code(self, link: RspLink, trace: Trace, snap: Snapshot) -> None:
        pc = snap.pc
        if pc in trace.code:
            return
        replies = link.transact([f"Hg{thread_id(self.cpu)}", f"m{pc:x},{MAX_INSN:x}"])
        trace.code[pc] = b"" if is_error(replies[1]) else bytes.fromhex(replies[1])


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
