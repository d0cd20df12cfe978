"""The mutant runner's verdicts, from the test results of each kernel: no guest, no build.

Which mutants there are (``guests/linux/mutants/NAME.patch``), which testcases each names
(``Caught-by:``), the verdict on each (:func:`judge`, see :mod:`rig.tools.mutants`), and
the table. The JUnit XML is read by :func:`rig.report.junit.read_junit`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rig.observe.findings import FailureKind
from rig.report.junit import Outcome, read_junit
from rig.supply.kernelbuild import GUEST_DIR

__all__ = [
    "CAUGHT_BY",
    "HEADER",
    "MUTANTS_DIR",
    "MutantResult",
    "Outcome",
    "TestResults",
    "UnknownMutantError",
    "Verdict",
    "build_order",
    "caught_by_lines",
    "discover_mutants",
    "judge",
    "names_test",
    "parse_junit",
    "render_markdown",
    "render_table",
    "run_failed",
    "select_mutants",
    "short_name",
    "touches_headers",
]

#: Where the mutant patches live.
MUTANTS_DIR = GUEST_DIR / "mutants"


class Verdict(enum.Enum):
    """The verdict on one mutant."""

    CAUGHT = "CAUGHT"
    MISNAMED = "MISNAMED"
    ERRORED = "ERRORED"
    SURVIVED = "SURVIVED"
    BUILD_FAILED = "BUILD-FAILED"
    NO_RESULT = "NO-RESULT"


class UnknownMutantError(ValueError):
    """``--only`` named a mutant that does not exist; the one-line message lists the valid ones."""


@dataclass
class TestResults:
    """Outcomes of one pytest run: test id -> outcome, the messages of failures/errors,
    and what made each failure (:class:`~rig.observe.findings.FailureKind`)."""

    __test__ = False  # not a pytest test class

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, FailureKind] = field(default_factory=dict)

    def ids(self, outcome: Outcome) -> list[str]:
        """Return the ids with ``outcome``, in sorted order."""
        return sorted(t for t, o in self.outcomes.items() if o is outcome)

    @property
    def passed(self) -> list[str]:
        """Ids of the tests that passed."""
        return self.ids(Outcome.PASSED)

    @property
    def failed(self) -> list[str]:
        """Ids of the tests that failed."""
        return self.ids(Outcome.FAILED)

    @property
    def errored(self) -> list[str]:
        """Ids of the tests that errored (setup/teardown/collection)."""
        return self.ids(Outcome.ERROR)

    @property
    def skipped(self) -> list[str]:
        """Ids of the tests that were skipped."""
        return self.ids(Outcome.SKIPPED)

    def kind(self, tid: str) -> FailureKind | None:
        """What made ``tid`` fail (a rig error if the plugin did not say); None if it did not."""
        if self.outcomes.get(tid) not in (Outcome.FAILED, Outcome.ERROR):
            return None
        return self.kinds.get(tid, FailureKind.RIG_ERROR)

    def summary(self) -> str:
        """``N passed, N failed, N error, N skipped``."""
        return ", ".join(f"{len(self.ids(o))} {o.value}" for o in Outcome)


@dataclass
class MutantResult:
    """What happened to one mutant (or to the reference, with ``name="reference"``)."""

    name: str
    verdict: Verdict
    #: Test ids that caught the mutant (failed on a finding or a kernel crash).
    caught_by: list[str] = field(default_factory=list)
    #: Test ids that failed with a rig error (the rig could not judge: never a catch).
    other_errors: list[str] = field(default_factory=list)
    #: The test ids its header names (``Caught-by:``); empty for the reference.
    named: list[str] = field(default_factory=list)
    results: TestResults | None = None
    detail: str = ""
    build_seconds: float = 0.0
    test_seconds: float = 0.0


def parse_junit(source: str | Path) -> TestResults:
    """Parse a pytest JUnit XML report (a path, or the XML text itself) with
    :func:`rig.report.junit.read_junit`.

    Raises :class:`ValueError` if the XML cannot be parsed.
    """
    results = TestResults()
    for tid, case in read_junit(source).items():
        results.outcomes[tid] = case.outcome
        if case.outcome in (Outcome.FAILED, Outcome.ERROR):
            results.messages[tid] = case.message
            kind = case.failure_kind
            if kind is not None:
                results.kinds[tid] = kind
    return results


#: The header line that names a testcase which must catch the mutant (one per line).
CAUGHT_BY = "Caught-by:"


def caught_by_lines(patch: Path) -> list[str]:
    """The test ids of the ``Caught-by:`` lines of a mutant's header (before its ``---``)."""
    out = []
    for line in patch.read_text(errors="replace").splitlines():
        if line.strip() == "---":
            break
        if line.startswith(CAUGHT_BY):
            out.append(line.removeprefix(CAUGHT_BY).strip())
    return out


def names_test(named: str, tid: str) -> bool:
    """A ``Caught-by:`` id names ``tid`` exactly, or all of its parameters (``test_x``)."""
    return tid == named or tid.startswith(named + "[")


def judge(
    name: str, results: TestResults, reference: TestResults | None = None, named: Sequence[str] = ()
) -> MutantResult:
    """Give the verdict on mutant ``name`` from its test results (see the module doc).

    A testcase catches it when it failed on a finding or a kernel crash
    (:attr:`FailureKind.caught`) and did not fail on ``reference``. With ``named`` (its
    ``Caught-by:`` ids), each must have caught it: CAUGHT; caught elsewhere only:
    MISNAMED; a named testcase that ended in a rig error: ERRORED. Without ``named``,
    any catch is CAUGHT.
    """
    bad_on_reference = set(reference.failed + reference.errored) if reference else set()
    caught: list[str] = []
    rig_errors: list[str] = []
    for tid in results.failed + results.errored:
        kind = results.kind(tid)
        if tid in bad_on_reference or kind is None:
            continue
        (caught if kind.caught else rig_errors).append(tid)
    res = MutantResult(
        name, Verdict.SURVIVED, caught_by=sorted(caught), other_errors=sorted(rig_errors), results=results
    )
    res.named = list(named)
    if not named:
        res.verdict = Verdict.CAUGHT if caught else (Verdict.ERRORED if rig_errors else Verdict.SURVIVED)
        return res
    missing = [n for n in named if not any(names_test(n, t) for t in caught)]
    if not missing:
        res.verdict = Verdict.CAUGHT
    elif any(names_test(n, t) for n in missing for t in rig_errors):
        res.verdict = Verdict.ERRORED
    elif caught:
        res.verdict = Verdict.MISNAMED
        res.detail = "not caught by " + ", ".join(short_name(n) for n in missing)
    return res


def short_name(test_id: str) -> str:
    """``testcases/test_x.py::test_y[p]`` -> ``test_y[p]``."""
    return test_id.rsplit("::", 1)[-1]


def _describe(result: MutantResult) -> str:
    """The third column of the table: the testcases that caught it, or why not."""
    parts: list[str] = []
    if result.verdict in (Verdict.BUILD_FAILED, Verdict.NO_RESULT) or result.results is None:
        return result.detail
    for tid in result.caught_by:
        kind = result.results.kind(tid) if result.results else None
        parts.append(short_name(tid) + (" (crash)" if kind is FailureKind.KERNEL_CRASH else ""))
    for tid in result.other_errors:
        parts.append(short_name(tid) + " (rig error)")
    text = ", ".join(parts) if parts else "-"
    return f"{text}; {result.detail}" if result.detail else text


def _reference_row(reference: MutantResult) -> tuple[str, str, str]:
    res = reference.results
    if res is None:
        return ("reference", reference.verdict.value, reference.detail)
    bad = [short_name(t) + ("" if t in res.failed else " (error)") for t in res.failed + res.errored]
    verdict = "OK" if not bad else "FAILED"
    return ("reference", verdict, (", ".join(bad) + "; " if bad else "") + res.summary())


def _rows(reference: MutantResult | None, mutants: Sequence[MutantResult]) -> list[tuple[str, str, str]]:
    rows = [_reference_row(reference)] if reference else []
    rows += [(m.name, m.verdict.value, _describe(m)) for m in mutants]
    return rows


HEADER = ("mutant", "verdict", "testcases that failed")


def render_table(reference: MutantResult | None, mutants: Sequence[MutantResult]) -> str:
    """A plain-text table ``mutant | verdict | testcases that failed``, reference line first."""
    rows = [HEADER, *_rows(reference, mutants)]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}} | {b:<{w1}} | {c}".rstrip() for a, b, c in rows]
    lines.insert(1, f"{'-' * w0}-+-{'-' * w1}-+-{'-' * max(len(HEADER[2]), 3)}")
    return "\n".join(lines) + "\n"


def render_markdown(reference: MutantResult | None, mutants: Sequence[MutantResult]) -> str:
    """The same table as Markdown."""

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(HEADER) + " |", "| --- | --- | --- |"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in _rows(reference, mutants)]
    return "\n".join(lines) + "\n"


def run_failed(reference: MutantResult | None, mutants: Iterable[MutantResult]) -> bool:
    """True if the run must exit non-zero: reference not clean, or a mutant not CAUGHT."""
    if reference is not None:
        res = reference.results
        if res is None or res.failed or res.errored:
            return True
    return any(m.verdict is not Verdict.CAUGHT for m in mutants)


def touches_headers(patch: Path) -> bool:
    """True if ``patch`` edits a header under ``include/`` (most of the kernel rebuilds)."""
    return any(
        line.startswith("+++ ") and "/include/" in line and line.rstrip().endswith(".h")
        for line in patch.read_text(errors="replace").splitlines()
    )


def build_order(item: tuple[str, Path]) -> tuple[bool, str]:
    """Mutants that only touch a few objects first, header-wide ones last: each switch
    between builds rebuilds what the previous and the next mutant touched, so this order
    costs one near-full rebuild per header mutant instead of two."""
    return touches_headers(item[1]), item[0]


def discover_mutants(directory: Path = MUTANTS_DIR) -> dict[str, Path]:
    """Return ``{name: patch}`` for every ``NAME.patch`` in ``directory``, sorted by name."""
    return {p.stem: p for p in sorted(directory.glob("*.patch"))}


def select_mutants(available: dict[str, Path], only: Sequence[str] | None) -> dict[str, Path]:
    """Keep the mutants named in ``only`` (all if empty/None), in sorted order.

    Raises :class:`UnknownMutantError` (one line, naming the valid mutants) for
    a name that is not available.
    """
    if not only:
        return dict(available)
    unknown = sorted(set(only) - set(available))
    if unknown:
        valid = ", ".join(available) or "(none)"
        raise UnknownMutantError(f"unknown mutant(s) {', '.join(unknown)}; valid mutants: {valid}")
    return {n: p for n, p in available.items() if n in set(only)}
