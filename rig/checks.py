"""Assertions about step traces that testcases share. Each returns a list of problems
(empty: the rule holds), so a testcase can report every violation at once."""

from __future__ import annotations

import re

from rig.stepping import Trace

#: AT&T text of a write to CR3 (``mov %reg,%cr3``).
MOV_TO_CR3 = re.compile(r"^mov\s+%\w+,%cr3$")


def cr3_flip_problems(trace: Trace, *, to_user: bool) -> tuple[int | None, list[str]]:
    """Find the stepper's single CR3 flip in direction ``to_user``; check it happens at a
    ``mov …,%cr3``. Returns (index of the first boundary on the new tables, problems)."""
    flips = [(i, u) for i, u in trace.cr3_flips() if u == to_user]
    want = "kernel->user" if to_user else "user->kernel"
    if not flips:
        return None, [f"no {want} CR3 flip in {len(trace.snapshots)} steps ({trace.stopped_because})"]
    problems = []
    if len(flips) > 1:
        problems.append(f"{len(flips)} {want} flips at steps {[trace.snapshots[i].step for i, _ in flips]}")
    i = flips[0][0]
    before = trace.snapshots[i - 1]
    if not MOV_TO_CR3.match(before.insn):
        problems.append(
            f"CR3 changed {want} after step {before.step} at {before.where} `{before.insn}`, "
            "which is not a mov to %cr3"
        )
    return i, problems


def side_problems(trace: Trace, start: int, end: int, *, user: bool) -> list[str]:
    """Every boundary in ``[start, end)`` must show the stepper on the user (or kernel) tables."""
    want = "user" if user else "kernel"
    return [
        f"step {s.step} at {s.where} `{s.insn}`: CR3 {s.cr3[trace.cpu]:#x} is not on the {want} tables"
        for s in trace.snapshots[start:end]
        if s.user_tables(trace.cpu) != user
    ]
