"""Exploration windows and what their exploration found: the data, no guest.

A :class:`Window` names an entry (or exit) path, the workload that drives it, and how
many boundaries around its signal store and CR3 write to try (:func:`boundaries_of`). An
:class:`Exploration` holds what :func:`rig.observe.exploration.explore` found for one: a
:class:`BoundaryRun` per boundary, each with the :class:`Stop` s of its fast-forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rig.machine.trace import Trace
from rig.machine.x86 import cr3_side
from rig.observe.findings import Finding, Rule

__all__ = ["SAMPLE_EVERY", "BoundaryRun", "Exploration", "Stop", "Window", "boundaries_of"]


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


#: In a sampled exploration, every how many boundaries outside the race window one is tried.
SAMPLE_EVERY = 4


def boundaries_of(
    window: Window, store: int, cr3_write: int, last: int, *, every: bool = False, stride: int = SAMPLE_EVERY
) -> list[int]:
    """The boundaries of a scouted path (last index ``last``) that get an event.

    ``every``: all of them, from the first instruction to ``after`` boundaries past the
    CR3 write (an exit's scout ends in user mode: its user-mode boundaries are skipped
    by the caller). Otherwise a deterministic sample: boundary 0, ``before`` boundaries
    ahead of the store through ``after`` past the CR3 write (the race window, always
    whole), and every ``stride``-th boundary of the rest (none with ``stride`` 0).
    """
    end = min(last, cr3_write + window.after)
    if every:
        return list(range(end + 1))
    race = set(range(max(0, store - window.before), end + 1))
    return sorted({0, *race, *(range(0, end + 1, stride) if stride else ())})
