"""Assertions about step traces that testcases share. Each returns a list of problems
(empty: the rule holds), so a testcase can report every violation at once."""

from __future__ import annotations

import re
from dataclasses import dataclass

from rig.observe.stepping import Trace

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


def signal_problems(trace: Trace, observer: int, name: str, max_window: int) -> list[str]:
    """Check a CR3 signal (watch ``name``, as vCPU ``observer`` reads it) against the
    stepper's CR3 side at every boundary.

    On the kernel CR3 the signal must be 1, except in a run of at most ``max_window``
    boundaries right before the switch back to the user CR3 (after the store of 0,
    before the CR3 write); CR3 may only become the kernel (user) CR3 once the signal
    reads 1 (0).
    """
    cpu = trace.cpu
    snaps = trace.snapshots
    problems = []
    for i in range(1, len(snaps)):
        prev, cur = snaps[i - 1], snaps[i]
        before = prev.words[name][observer]
        if prev.user_tables(cpu) and not cur.user_tables(cpu) and before != 1:
            problems.append(
                f"step {cur.step}: CR3 became the kernel CR3 at {prev.where} `{prev.insn}` "
                f"with the signal {before}"
            )
        if not prev.user_tables(cpu) and cur.user_tables(cpu) and before != 0:
            problems.append(
                f"step {cur.step}: CR3 became the user CR3 at {prev.where} `{prev.insn}` "
                f"with the signal still {before}"
            )
        seen = cur.words[name][observer]
        if not cur.user_tables(cpu) and seen != 1:
            exit_at = next((k for k in range(i, len(snaps)) if snaps[k].user_tables(cpu)), None)
            window = snaps[i:exit_at] if exit_at is not None else snaps[i:]
            if (
                exit_at is None
                or len(window) > max_window
                or any(s.words[name][observer] != 0 for s in window)
            ):
                problems.append(
                    f"step {cur.step} at {cur.where}: kernel CR3 loaded, signal reads {seen}, "
                    "and this is not the store-then-CR3-write window of an exit"
                )
    return problems


#: A memory operand in AT&T syntax: ``seg:disp(base,index,scale)``, ``(%reg)``, or an absolute.
_MEM = re.compile(r"(%[a-z]s:)?-?(0x[0-9a-f]+|\d+)?\((%\w+)?(?:,%\w+)?(?:,\d)?\)|%[a-z]s:0x[0-9a-f]+")


def memory_operands(insn: str) -> list[str]:
    """The memory operands of an AT&T instruction text (``nop``/``lea`` have none that access)."""
    mnemonic = insn.split()[0] if insn else ""
    if mnemonic.startswith(("nop", "lea")):
        return []
    body = insn.split("#")[0]
    return [m.group(0) for m in _MEM.finditer(body)]


def allowed_scratch(operand: str) -> bool:
    """Stack (``%rsp``-based) and per-CPU (``%gs:``) operands: the entry path's own scratch."""
    return operand.startswith("%gs:") or "(%rsp" in operand


@dataclass(frozen=True)
class StoreWindow:
    """The instructions executed between a signal store and the CR3 write it precedes."""

    store_step: int
    store: str
    cr3_step: int
    cr3_write: str
    between: tuple[tuple[str, str], ...]  # (where, instruction)


def store_windows(trace: Trace, observer: int, name: str) -> list[StoreWindow]:
    """For each CR3 write of the stepper, the last instruction that changed the signal
    (as ``observer`` reads it) before it, and everything executed in between."""
    snaps = trace.snapshots
    out = []
    for flip, _ in trace.cr3_flips():
        write = snaps[flip - 1]
        store_idx = next(
            (
                k - 1
                for k in range(flip - 1, 0, -1)
                if snaps[k].words[name][observer] != snaps[k - 1].words[name][observer]
            ),
            None,
        )
        if store_idx is None:
            continue
        store = snaps[store_idx]
        between = tuple((s.where, s.insn) for s in snaps[store_idx + 1 : flip - 1])
        out.append(StoreWindow(store.step, store.insn, write.step, write.insn, between))
    return out
