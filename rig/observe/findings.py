"""Findings: what a check found wrong, as data.

Every check of the rig (:mod:`rig.observe.checks`, :mod:`rig.observe.transitions`, the
exploration, the watch modes) returns a list of :class:`Finding`; an empty list means the
rule held. A finding names the :class:`Rule` it breaks, where (step, vCPU, symbol) and a
one-line text. Reports, timelines and the mutant runner read the fields, never the text.

A testcase fails on findings by :func:`fail_on`, which raises :class:`FindingsFailure`
(an :class:`AssertionError` that carries them). The pytest plugin records what kind of
failure a testcase had (:func:`failure_kind`) in its JUnit properties, so that a mutant
counts as caught only when a check failed, never when the rig itself broke.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "FailureKind",
    "Finding",
    "FindingsFailure",
    "Rule",
    "SkipKind",
    "fail_on",
    "failure_kind",
    "render",
]


class Rule(enum.Enum):
    """The rule a finding breaks. ``kernel`` rules are about the kernel under test; the
    others say the rig could not judge (the verdict is then an error, not a catch)."""

    #: CR3 became the kernel CR3 while the signal did not read 1.
    KERNEL_CR3_BEFORE_SIGNAL = "kernel-cr3-before-signal"
    #: CR3 became the user CR3 while the signal did not read 0.
    USER_CR3_BEFORE_SIGNAL = "user-cr3-before-signal"
    #: The kernel CR3 is loaded and the signal reads 0 outside an exit's store-to-write window.
    SIGNAL_0_ON_KERNEL_CR3 = "signal-0-on-kernel-cr3"
    #: A paranoid exit put back another value than its entry found.
    PARANOID_RESTORE = "paranoid-restore"
    #: An event (NMI, #DB) returned with the signal or CR3 changed, or ran its handler wrongly.
    EVENT_LEFT_STATE = "event-left-state"
    #: The signal changed with no listed store site executed.
    UNLISTED_STORE = "unlisted-store"
    #: CR3 changed side with no listed CR3 write executed.
    UNLISTED_CR3_WRITE = "unlisted-cr3-write"
    #: Between a signal store and its CR3 write: a memory access other than scratch, too
    #: many instructions, or an instruction that cannot be decoded.
    STORE_TO_WRITE_WINDOW = "store-to-write-window"
    #: A CR3 switch that is missing, doubled, not a ``mov`` to CR3, or on the wrong side.
    CR3_SWITCH = "cr3-switch"
    #: The signal cannot be read where it must be mapped.
    SIGNAL_UNREADABLE = "signal-unreadable"
    #: With the gate off (no isolation) or PTI off, the signal was written or read not 1.
    SIGNAL_WRITTEN_WHILE_OFF = "signal-written-while-off"
    #: The vCPUs or physical memory disagree about the signal's value.
    VIEWS_DISAGREE = "views-disagree"
    #: A frozen vCPU moved, or a read failed: the rig's premise broke (not a kernel finding).
    RIG_PREMISE = "rig-premise"
    #: The run could not reach a state where it can judge (not back in user mode, boundaries
    #: left unexplored): not a kernel finding.
    INCOMPLETE = "incomplete"

    @property
    def kernel(self) -> bool:
        """True if the rule is about the kernel (a finding that counts as a catch)."""
        return self not in (Rule.RIG_PREMISE, Rule.INCOMPLETE)


@dataclass(frozen=True)
class Finding:
    """One broken rule: ``rule``, the one-line ``text``, and where (``step`` in the trace,
    ``cpu`` that ran it, ``where`` a symbol+offset), each None/empty when not known."""

    rule: Rule
    text: str
    step: int | None = None
    cpu: int | None = None
    where: str = ""

    def __str__(self) -> str:
        return self.text

    def prefixed(self, prefix: str) -> Finding:
        """The same finding with ``prefix`` before its text (the window or path it came from)."""
        return Finding(self.rule, f"{prefix}{self.text}", self.step, self.cpu, self.where)


def render(findings: Iterable[Finding], limit: int = 12) -> str:
    """The findings' texts, one a line, at most ``limit`` (and how many more)."""
    items = list(findings)
    lines = [f"[{f.rule.value}] {f.text}" for f in items[:limit]]
    if len(items) > limit:
        lines.append(f"... and {len(items) - limit} more")
    return "\n".join(lines)


class FindingsFailure(AssertionError):
    """A testcase failed because checks found something: ``findings`` says what."""

    def __init__(self, findings: Sequence[Finding], context: str = "") -> None:
        self.findings = tuple(findings)
        self.context = context
        super().__init__(render(self.findings) + (f"\n{context}" if context else ""))

    @property
    def kernel(self) -> bool:
        """True if at least one finding is about the kernel (not only the rig's premise)."""
        return any(f.rule.kernel for f in self.findings)


def fail_on(findings: Sequence[Finding], context: str = "") -> None:
    """Raise :class:`FindingsFailure` if ``findings`` is not empty.

    Raises:
        FindingsFailure: carrying ``findings`` and ``context`` (a table, a trace summary).
    """
    if findings:
        raise FindingsFailure(findings, context)


class FailureKind(enum.Enum):
    """What made a testcase fail, as recorded in its JUnit properties (``cr3rig.failure``)."""

    #: A check about the kernel failed (typed findings, or a testcase's own assertion).
    FINDING = "finding"
    #: The guest kernel crashed (panic, oops, triple fault): a finding about the kernel.
    KERNEL_CRASH = "kernel-crash"
    #: The rig could not judge: a transport or QEMU/GDB error, a timeout, an incomplete run.
    RIG_ERROR = "rig-error"

    @property
    def caught(self) -> bool:
        """True if this failure says something about the kernel under test."""
        return self is not FailureKind.RIG_ERROR


class SkipKind(enum.Enum):
    """Why a testcase could not judge here, when the reason is one a tool must tell apart
    (the container matrix: which skips a kernel kind may give), as recorded in its JUnit
    properties (``cr3rig.skip``, :data:`rig.report.junit.SKIP_KIND`)."""

    #: The guest has no PCID (TCG): the PCID CR3 sites are not covered by this run.
    PCID_OFF = "pcid-off"
    #: The kernel lacks the CR3 signal (``kernel_cr3_loaded``, CONFIG_TRACK_CR3).
    NO_SIGNAL = "no-signal"
    #: The QEMU here refuses the watch plugin's API version, and no QEMU that loads it runs here.
    PLUGIN_REFUSED = "plugin-refused"


def failure_kind(exc: BaseException | None, crashed: bool = False) -> FailureKind:
    """Classify an exception that failed a testcase. ``crashed``: the guest kernel is
    known to have crashed (its console shows a panic or oops)."""
    if crashed:
        return FailureKind.KERNEL_CRASH
    if isinstance(exc, FindingsFailure):
        return FailureKind.FINDING if exc.kernel else FailureKind.RIG_ERROR
    if isinstance(exc, AssertionError):
        return FailureKind.FINDING
    return FailureKind.RIG_ERROR
