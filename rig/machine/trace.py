"""What a stepping run saw: a :class:`Snapshot` of every vCPU at each instruction boundary.

The Stepper (:mod:`rig.machine.stepper`) fills a :class:`Trace`; the checks
(:mod:`rig.observe.checks`) judge it; the reports draw it (:mod:`rig.report.timeline`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rig.machine.x86 import user_cr3

__all__ = ["Mark", "Snapshot", "Trace", "WatchedWord"]


@dataclass(frozen=True)
class WatchedWord:
    """A memory word the Stepper reads at every step, through each vCPU's page tables (its
    values are :attr:`Snapshot.words` ``[name]``)."""

    name: str
    address: int
    size: int = 4


@dataclass
class Snapshot:
    """The machine at one instruction boundary.

    ``rip``/``cr3`` list every vCPU in index order; ``words[name][n]`` is the watched
    word (:class:`WatchedWord`) as vCPU ``n`` reads it through its own page tables (None: not mapped there).
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
        return user_cr3(self.cr3[cpu])

    def to_json(self) -> str:
        d = asdict(self)
        d["rip"] = [f"{v:#x}" for v in self.rip]
        d["cr3"] = [f"{v:#x}" for v in self.cr3]
        return json.dumps(d)


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
    #: from its last read (an instruction not decoded as a CR3 write changed it): what
    #: and at which step (checked by :func:`rig.observe.checks.frozen_violations`)
    untracked_cr3: str = ""
    untracked_cr3_step: int | None = None
    #: steps sent in the same write as the reads of the boundary before them (one round
    #: trip each): every step of a run without a stop condition, and those a
    #: :class:`~rig.machine.stops.ForeseeingStop` allowed
    steps_ahead: int = 0

    def mark(self, step: int, kind: str, text: str) -> None:
        """Attach a marker (an event delivered, a store seen…) to boundary ``step``."""
        self.marks.append(Mark(step, kind, text))

    def write_jsonl(self, path: Path) -> None:
        """One JSON object per line, one line per instruction boundary."""
        with open(path, "w") as f:
            for s in self.snapshots:
                f.write(s.to_json() + "\n")

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
