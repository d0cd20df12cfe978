"""Assertions about step traces that testcases share. Each returns a list of
:class:`~rig.observe.findings.Finding` (empty: the rule holds), so a testcase can report
every violation at once."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rig.machine.disasm import MOV_TO_CR3
from rig.machine.sites import SIGNAL, split_operands
from rig.machine.storepaths import StorePath
from rig.machine.symbols import SymbolTable
from rig.machine.trace import Trace
from rig.observe.findings import Finding, Rule

#: Most boundaries allowed between a signal store and the CR3 write it precedes
#: (NOTE_CR3_SWITCH sits immediately before the switch; the SGDT idiom adds a few).
MAX_STORE_TO_CR3_WINDOW = 8


def frozen_violations(trace: Trace) -> list[Finding]:
    """Every change of a non-stepping vCPU's rip or CR3 during a stepped run, and a change of
    the stepping vCPU's CR3 the run did not read (must be empty): the premise of a stepped
    check, so these are :attr:`Rule.RIG_PREMISE` findings."""
    out = []
    if trace.untracked_cr3:
        out.append(Finding(Rule.RIG_PREMISE, trace.untracked_cr3, trace.untracked_cr3_step, trace.cpu))
    if not trace.snapshots:
        return out
    first = trace.snapshots[0]
    for s in trace.snapshots[1:]:
        for n in range(trace.ncpus):
            if n == trace.cpu:
                continue
            if s.rip[n] != first.rip[n] or s.cr3[n] != first.cr3[n]:
                out.append(
                    Finding(
                        Rule.RIG_PREMISE,
                        f"step {s.step}: vCPU {n} moved: rip {first.rip[n]:#x}->{s.rip[n]:#x} "
                        f"cr3 {first.cr3[n]:#x}->{s.cr3[n]:#x}",
                        s.step,
                        n,
                    )
                )
    return out


def cr3_flip_problems(trace: Trace, *, to_user: bool) -> tuple[int | None, list[Finding]]:
    """Find the stepper's single CR3 flip in direction ``to_user``; check it happens at a
    ``mov …,%cr3``. Returns (index of the first boundary on the new tables, problems)."""
    flips = [(i, u) for i, u in trace.cr3_flips() if u == to_user]
    want = "kernel->user" if to_user else "user->kernel"
    if not flips:
        text = f"no {want} CR3 flip in {len(trace.snapshots)} steps ({trace.stopped_because})"
        return None, [Finding(Rule.CR3_SWITCH, text, cpu=trace.cpu)]
    problems: list[Finding] = []
    if len(flips) > 1:
        steps = [trace.snapshots[i].step for i, _ in flips]
        problems.append(
            Finding(Rule.CR3_SWITCH, f"{len(flips)} {want} flips at steps {steps}", steps[1], trace.cpu)
        )
    i = flips[0][0]
    before = trace.snapshots[i - 1]
    if not MOV_TO_CR3.match(before.insn):
        problems.append(
            Finding(
                Rule.CR3_SWITCH,
                f"CR3 changed {want} after step {before.step} at {before.where} `{before.insn}`, "
                "which is not a mov to %cr3",
                before.step,
                trace.cpu,
                before.where,
            )
        )
    return i, problems


def side_problems(trace: Trace, start: int, end: int, *, user: bool) -> list[Finding]:
    """Every boundary in ``[start, end)`` must show the stepper on the user (or kernel) tables."""
    want = "user" if user else "kernel"
    return [
        Finding(
            Rule.CR3_SWITCH,
            f"step {s.step} at {s.where} `{s.insn}`: CR3 {s.cr3[trace.cpu]:#x} is not on the {want} tables",
            s.step,
            trace.cpu,
            s.where,
        )
        for s in trace.snapshots[start:end]
        if s.user_tables(trace.cpu) != user
    ]


def signal_problems(
    trace: Trace,
    observer: int,
    name: str,
    max_window: int = MAX_STORE_TO_CR3_WINDOW,
    *,
    complete: bool = True,
) -> list[Finding]:
    """Check a CR3 signal (watch ``name``, as vCPU ``observer`` reads it) against the
    stepper's CR3 side at every boundary.

    On the kernel CR3 the signal must be 1, except in a run of at most ``max_window``
    boundaries right before the switch back to the user CR3 (after the store of 0,
    before the CR3 write); CR3 may only become the kernel (user) CR3 once the signal
    reads 1 (0). With ``complete=False`` (a trace cut short by its step bound) a run of 0s
    of at most ``max_window`` boundaries at its very end is not judged: its CR3 write would
    come after the last boundary.
    """
    cpu = trace.cpu
    snaps = trace.snapshots
    problems: list[Finding] = []
    for i in range(1, len(snaps)):
        prev, cur = snaps[i - 1], snaps[i]
        before = prev.words[name][observer]
        if prev.user_tables(cpu) and not cur.user_tables(cpu) and before != 1:
            problems.append(
                Finding(
                    Rule.KERNEL_CR3_BEFORE_SIGNAL,
                    f"step {cur.step}: CR3 became the kernel CR3 at {prev.where} `{prev.insn}` "
                    f"with the signal {before}",
                    cur.step,
                    cpu,
                    prev.where,
                )
            )
        if not prev.user_tables(cpu) and cur.user_tables(cpu) and before != 0:
            problems.append(
                Finding(
                    Rule.USER_CR3_BEFORE_SIGNAL,
                    f"step {cur.step}: CR3 became the user CR3 at {prev.where} `{prev.insn}` "
                    f"with the signal still {before}",
                    cur.step,
                    cpu,
                    prev.where,
                )
            )
        seen = cur.words[name][observer]
        if not cur.user_tables(cpu) and seen != 1:
            exit_at = next((k for k in range(i, len(snaps)) if snaps[k].user_tables(cpu)), None)
            window = snaps[i:exit_at] if exit_at is not None else snaps[i:]
            if (
                (exit_at is None and complete)
                or len(window) > max_window
                or any(s.words[name][observer] != 0 for s in window)
            ):
                problems.append(
                    Finding(
                        Rule.SIGNAL_0_ON_KERNEL_CR3,
                        f"step {cur.step} at {cur.where}: kernel CR3 loaded, signal reads {seen}, "
                        "and this is not the store-then-CR3-write window of an exit",
                        cur.step,
                        cpu,
                        cur.where,
                    )
                )
    return problems


#: Per-CPU variables the entry code may touch between a signal store and its CR3 write:
#: the TSS (its ``sp2`` is the SYSCALL entry's scratch slot, ``sp0``/``sp1`` the stacks) and
#: the signal itself. Any other ``%gs:`` operand there is a finding naming the variable.
SCRATCH_PER_CPU = ("cpu_tss_rw", SIGNAL)

#: Mnemonics whose bare numeric operand is a branch target, not a memory address.
_BRANCHES = ("j", "call", "loop", "xbegin")
#: Mnemonics that compute an address without accessing memory.
_NO_ACCESS = ("nop", "lea", "prefetch", "endbr")
#: Instruction text that says it could not be decoded.
_UNDECODABLE = ("(bad)", ".byte", "?", "")
_NUMBER = re.compile(r"^-?(0x[0-9a-f]+|\d+)$")


def decodable(insn: str) -> bool:
    """False for an instruction text the disassembler could not decode (``(bad)``, ``.byte``)."""
    text = insn.strip()
    return (
        bool(text)
        and not any(text == u or text.startswith(u + " ") for u in _UNDECODABLE if u)
        and ("(bad)" not in text)
    )


def memory_operands(insn: str) -> list[str]:
    """The memory operands of an AT&T instruction text: ``seg:disp(base,index,scale)``,
    ``(%reg)``, ``%seg:disp``, absolute addresses (``mov 0x1234,%eax``, ``movabs
    0xffff…,%al``) and indirect branch operands (``*0x8(%rax)``). Immediates (``$…``),
    registers and direct branch targets are not; ``nop``/``lea`` access none."""
    text = insn.split("#")[0].split("<")[0].strip()
    if not text:
        return []
    parts = text.split(None, 1)
    mnemonic = parts[0]
    while mnemonic in ("lock", "rep", "repz", "repnz", "repe", "repne", "notrack", "bnd", "ds", "cs") and (
        len(parts) > 1
    ):
        parts = parts[1].split(None, 1)
        mnemonic = parts[0]
    if mnemonic.startswith(_NO_ACCESS) or len(parts) < 2:
        return []
    branch = mnemonic.startswith(_BRANCHES)
    out = []
    for op in split_operands(parts[1]):
        indirect = op.startswith("*")
        body = op.lstrip("*")
        if body.startswith("$"):
            continue
        if "(" in body or re.match(r"^%[a-z]s:", body):
            out.append(op)
        elif _NUMBER.match(body) and (indirect or not branch):
            out.append(op)  # an absolute address (moffs, or a disp32 with no base)
    return out


def allowed_scratch(
    operand: str, per_cpu: Callable[[int], str | None] | None = None, next_pc: int | None = None
) -> bool:
    """Stack (``%rsp``-based) operands, and ``%gs:`` operands that name one of
    :data:`SCRATCH_PER_CPU`: ``per_cpu`` maps a ``%gs:`` displacement (or, for
    ``%gs:disp(%rip)``, ``next_pc + disp``) to the per-CPU symbol there; without it, or
    without ``next_pc`` for a RIP-relative operand, no ``%gs:`` operand is allowed."""
    if "(%rsp" in operand:
        return True
    if not operand.startswith("%gs:") or per_cpu is None:
        return False
    disp, _, rest = operand[4:].partition("(")
    if not _NUMBER.match(disp or "0"):
        return False
    if not rest:
        address = int(disp, 0)
    elif rest == "%rip)" and next_pc is not None:
        address = (next_pc + int(disp or "0", 0)) & ((1 << 64) - 1)
    else:
        return False
    name = per_cpu(address)
    return name is not None and name in SCRATCH_PER_CPU


def gs_symbol(symbols: SymbolTable) -> Callable[[int], str | None]:
    """A ``per_cpu`` lookup for :func:`allowed_scratch`: the per-CPU symbol containing a
    ``%gs:`` displacement (zero-based before Linux 6.15, ordinary addresses from 6.15)."""

    def lookup(address: int) -> str | None:
        where = symbols.describe(address)
        name = where.split("+")[0]
        return None if name.startswith("0x") else name

    return lookup


def window_findings(
    trace: Trace,
    observer: int,
    name: str,
    per_cpu: Callable[[int], str | None] | None = None,
    max_window: int = MAX_STORE_TO_CR3_WINDOW,
) -> list[Finding]:
    """The store-to-write rule on every CR3 write of the trace: at most ``max_window``
    instructions between the signal store and the CR3 write, none of which accesses
    memory other than the stack and :data:`SCRATCH_PER_CPU`, and none undecodable.
    A CR3 write with no signal store before it in the trace is not judged here
    (:func:`signal_problems` judges the value it finds)."""
    out: list[Finding] = []
    for w in store_windows(trace, observer, name):
        if len(w.between) > max_window:
            out.append(
                Finding(
                    Rule.STORE_TO_WRITE_WINDOW,
                    f"step {w.cr3_step}: {len(w.between)} instructions between the signal store "
                    f"`{w.store}` (step {w.store_step}) and the CR3 write (at most {max_window})",
                    w.cr3_step,
                    trace.cpu,
                )
            )
        for i, (where, insn) in enumerate(w.between):
            step = w.store_step + 1 + i
            next_pc = w.addresses[i][1] if i < len(w.addresses) else None
            if not decodable(insn):
                text = (
                    f"step {step} at {where}: `{insn}` between the store and the CR3 write cannot be decoded"
                )
                out.append(Finding(Rule.STORE_TO_WRITE_WINDOW, text, step, trace.cpu, where))
                continue
            bad = [op for op in memory_operands(insn) if not allowed_scratch(op, per_cpu, next_pc)]
            if bad:
                text = f"step {step} at {where}: `{insn}` accesses {bad} between the store and the CR3 write"
                out.append(Finding(Rule.STORE_TO_WRITE_WINDOW, text, step, trace.cpu, where))
    return out


@dataclass(frozen=True)
class StoreWindow:
    """The instructions executed between a signal store and the CR3 write it precedes."""

    store_step: int
    store: str
    cr3_step: int
    cr3_write: str
    between: tuple[tuple[str, str], ...]  # (where, instruction)
    #: (address, address of the next boundary) of each instruction in ``between``
    addresses: tuple[tuple[int, int], ...] = ()


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
        addresses = tuple((snaps[j].pc, snaps[j + 1].pc) for j in range(store_idx + 1, flip - 1))
        out.append(StoreWindow(store.step, store.insn, write.step, write.insn, between, addresses))
    return out


def static_path_findings(
    paths: Sequence[StorePath],
    per_cpu: Callable[[int], str | None] | None = None,
    max_window: int = MAX_STORE_TO_CR3_WINDOW,
) -> list[Finding]:
    """The store-to-write rule on every path of the text
    (:func:`rig.machine.storepaths.store_paths`): at most ``max_window`` instructions, no
    memory access but the stack and :data:`SCRATCH_PER_CPU` (absolute operands count),
    every instruction decodable, no call. NOPs (alternatives' padding in the unpatched
    text) do not count toward the length."""
    out: list[Finding] = []
    for p in paths:
        head = f"{p.store.where} `{p.store.insn}`"
        if p.cr3_write is None:
            text = f"after the signal store at {head}, {p.unverifiable} before any CR3 write"
            out.append(Finding(Rule.STORE_TO_WRITE_WINDOW, text, where=p.store.where))
            continue
        route = f"{head} -> {p.cr3_write.where}"
        # an unpatched image pads its alternatives with NOPs: they do nothing, so they do not count
        work = [i for i in p.between if not i.mnemonic.startswith("nop")]
        if len(work) > max_window:
            text = (
                f"{route}: {len(work)} instructions (not counting NOPs) between the store and the "
                f"CR3 write (at most {max_window})"
            )
            out.append(Finding(Rule.STORE_TO_WRITE_WINDOW, text, where=p.store.where))
        for ins in p.between:
            if not decodable(ins.text):
                text = f"{route}: `{ins.text}` at {ins.where} cannot be decoded"
                out.append(Finding(Rule.STORE_TO_WRITE_WINDOW, text, where=ins.where))
                continue
            bad = [
                op for op in memory_operands(ins.text) if not allowed_scratch(op, per_cpu, ins.next_address)
            ]
            if bad:
                text = f"{route}: `{ins.text}` at {ins.where} accesses {bad}"
                out.append(Finding(Rule.STORE_TO_WRITE_WINDOW, text, where=ins.where))
    return out
