"""Mutation testing of the testcases: mutant kernels that the testcases must catch.

A *mutant* is a small patch in ``guests/linux/mutants/NAME.patch``, applied on top
of a flavor's patch series (by :func:`rig.supply.kernelbuild.build_kernel`, as
``patches_extra``), that plants one realistic mistake in the CR3-signal code.
The runner first runs ``pytest testcases/`` on the unmutated reference kernel,
then on each mutant kernel, and gives each mutant a verdict:

``CAUGHT``
    every testcase its header names (``Caught-by:`` lines) failed on a finding (a check
    about the kernel failed, or the guest kernel crashed: the plugin's
    ``cr3rig.failure`` in the JUnit XML) and had passed on the reference;
``MISNAMED``
    a check caught it, but not in every testcase its header names;
``ERRORED``
    a testcase that would have judged it failed with a rig error (a transport, QEMU or
    GDB failure, a timeout): the rig could not judge, so this is never a catch;
``SURVIVED``
    nothing caught it;
``BUILD-FAILED``
    the patch does not apply or the kernel does not build;
``NO-RESULT``
    pytest left no readable JUnit XML (it crashed or timed out).

Each mutant's named testcases run first; if they do not all catch it, the whole of
``testcases/`` runs (stopping at its first failure) to say what else does.

Command line::

    python -m rig.tools.mutants [--only NAME ...] [--flavor reference-7.2] [--all-failures]

prints a table (also written as Markdown to ``results/mutants.md``) and exits 1
if the reference failed or errored any testcase, or any mutant is not CAUGHT.
Progress lines go to stderr; the build and pytest output of each kernel goes to
``results/mutants/<name>.build.log`` / ``<name>.pytest.log``, its traces, timelines and
session report to ``results/mutants/<name>/`` (``--trace-dir``), and
``results/mutants.html`` links each kernel's report from the table.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rig.observe.findings import FailureKind
from rig.report.junit import Outcome, read_junit
from rig.report.session import MUTANTS_MD, write_mutants_page
from rig.supply.kernelbuild import (
    GUEST_DIR,
    REPO_ROOT,
    KernelBuild,
    KernelBuildError,
    UnknownFlavorError,
    build_kernel,
    get_flavor,
)

__all__ = [
    "CAUGHT_BY",
    "MUTANTS_DIR",
    "MutantResult",
    "Outcome",
    "TestResults",
    "UnknownMutantError",
    "Verdict",
    "caught_by_lines",
    "discover_mutants",
    "judge",
    "main",
    "parse_junit",
    "render_markdown",
    "render_table",
    "select_mutants",
    "short_name",
]

#: Where the mutant patches live.
MUTANTS_DIR = GUEST_DIR / "mutants"
#: Default flavor the mutants apply to.
DEFAULT_FLAVOR = "reference-7.2"
#: Seconds one pytest run may take before it is interrupted.
DEFAULT_PYTEST_TIMEOUT = 1800.0
#: Seconds between SIGINT (the rig cleans up QEMU/GDB) and SIGKILL on timeout.
_KILL_GRACE = 30.0

LogFn = Callable[[str], None]


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


# --------------------------------------------------------------------------
# Pure logic


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


def _matches(named: str, tid: str) -> bool:
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
    missing = [n for n in named if not any(_matches(n, t) for t in caught)]
    if not missing:
        res.verdict = Verdict.CAUGHT
    elif any(_matches(n, t) for n in missing for t in rig_errors):
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


# --------------------------------------------------------------------------
# Running pytest on a kernel


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_testcases(
    build: KernelBuild,
    log_file: Path,
    *,
    timeout: float = DEFAULT_PYTEST_TIMEOUT,
    extra_args: Sequence[str] = (),
    targets: Sequence[str] = ("testcases/",),
) -> tuple[TestResults | None, str]:
    """Run ``pytest testcases/`` (or the test ids ``targets``) on ``build`` in a
    subprocess (cwd = repo root).

    Its output goes to ``log_file``. Returns the parsed JUnit results, or
    ``None`` and a one-line reason if there are none (pytest timed out or
    left no readable XML).
    """
    with tempfile.TemporaryDirectory(prefix="cr3rig-mutants-") as tmp:
        junit = Path(tmp, "junit.xml")
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            *targets,
            "--kernel",
            str(build.bzimage),
            "--vmlinux",
            str(build.vmlinux),
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
            *extra_args,
        ]
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("w") as out:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            # A session of its own: on timeout or Ctrl-C the whole group (pytest,
            # QEMU, GDB) gets SIGINT, so that the rig shuts its guests down.
            proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            reason = ""
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop_group(proc)
                reason = f"pytest timed out after {timeout:.0f} s"
                rc = proc.returncode
            except BaseException:
                _stop_group(proc)
                raise
        if reason:
            return None, reason
        try:
            return parse_junit(junit), ""
        except ValueError as e:
            return None, f"pytest exited {rc} without a readable JUnit report ({e})"


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT the process group of ``proc``, then SIGKILL it if it lingers."""
    for sig, wait in ((signal.SIGINT, _KILL_GRACE), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            return


# --------------------------------------------------------------------------
# The run


def _build(
    flavor: str, name: str, patches: Sequence[Path], logs: Path, log: LogFn
) -> tuple[KernelBuild | None, str, float]:
    """Build one kernel; return (build or None, one-line failure reason, seconds)."""
    build_log = logs / f"{name}.build.log"
    build_log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with build_log.open("w") as f:

        def to_file(line: str) -> None:
            f.write(line + "\n")

        try:
            build = build_kernel(flavor, patches_extra=[p.resolve() for p in patches], log=to_file)
        except KernelBuildError as e:
            f.write(str(e) + "\n")
            seconds = time.monotonic() - start
            log(f"mutants: {name}: build FAILED after {seconds:.0f} s: {e.summary} (log: {build_log})")
            return None, e.summary, seconds
    seconds = time.monotonic() - start
    log(f"mutants: {name}: build {seconds:.1f} s")
    return build, "", seconds


def _test(
    name: str,
    build: KernelBuild,
    logs: Path,
    timeout: float,
    log: LogFn,
    extra_args: Sequence[str] = (),
    targets: Sequence[str] = ("testcases/",),
) -> tuple[TestResults | None, str, float]:
    start = time.monotonic()
    # each kernel's traces, timelines and index.html in a directory of its own
    extra_args = ["--trace-dir", str(logs / name), *extra_args]
    results, reason = run_testcases(
        build, logs / f"{name}.pytest.log", timeout=timeout, extra_args=extra_args, targets=targets
    )
    seconds = time.monotonic() - start
    summary = results.summary() if results else reason
    log(f"mutants: {name}: test {seconds:.1f} s: {summary}")
    return results, reason, seconds


def run(
    flavor: str,
    mutants: dict[str, Path],
    *,
    logs: Path,
    timeout: float = DEFAULT_PYTEST_TIMEOUT,
    log: LogFn = _stderr,
    all_failures: bool = False,
) -> tuple[MutantResult, list[MutantResult]]:
    """Test the reference kernel of ``flavor``, then each mutant; return all results.

    Unless ``all_failures``, a mutant's named testcases (``Caught-by:``) run first, and
    the whole of ``testcases/`` only if they did not all catch it, stopping at its first
    failure (``-x``) when the reference passed everything.
    """
    build, reason, bsec = _build(flavor, "reference", [], logs, log)
    if build is None:
        ref = MutantResult("reference", Verdict.BUILD_FAILED, detail=reason, build_seconds=bsec)
        return ref, []
    ref_results, reason, tsec = _test("reference", build, logs, timeout, log)
    # The reference's verdict only tells NO-RESULT apart; its row is made from its results.
    ref = MutantResult(
        "reference",
        Verdict.NO_RESULT if ref_results is None else Verdict.SURVIVED,
        results=ref_results,
        detail=reason,
        build_seconds=bsec,
        test_seconds=tsec,
    )
    out: list[MutantResult] = []
    for i, (name, patch) in enumerate(sorted(mutants.items(), key=build_order), 1):
        log(f"mutants: [{i}/{len(mutants)}] {name}")
        build, reason, bsec = _build(flavor, name, [patch], logs, log)
        if build is None:
            out.append(MutantResult(name, Verdict.BUILD_FAILED, detail=reason, build_seconds=bsec))
            continue
        named = caught_by_lines(patch)
        known = set(ref.results.outcomes) if ref.results is not None else set()
        unknown = [n for n in named if not any(_matches(n, t) for t in known)]
        if unknown:
            detail = f"its Caught-by names no testcase of the reference run: {', '.join(unknown)}"
            out.append(MutantResult(name, Verdict.MISNAMED, named=named, detail=detail, build_seconds=bsec))
            log(f"mutants: {name}: {Verdict.MISNAMED.value}: {detail}")
            continue
        results: TestResults | None = None
        tsec = 0.0
        if named and not all_failures:
            # the testcases the header names first: they must catch it
            targets = sorted({n.split("[")[0] if n not in known else n for n in named})
            results, reason, tsec = _test(name, build, logs, timeout, log, targets=targets)
        res = judge(name, results, ref.results, named) if results is not None else None
        if res is None or res.verdict is not Verdict.CAUGHT:
            # what else catches it (or nothing): the whole of testcases/
            clean = ref.results is not None and not (ref.results.failed or ref.results.errored)
            first = ["-x"] if clean and not all_failures else []
            full, reason, more = _test(f"{name}-all" if results else name, build, logs, timeout, log, first)
            tsec += more
            if full is not None:
                if results is not None:  # the named run's outcomes stand for its testcases
                    full.outcomes.update(results.outcomes)
                    full.messages.update(results.messages)
                    full.kinds.update(results.kinds)
                res = judge(name, full, ref.results, named)
        if res is None:
            res = MutantResult(name, Verdict.NO_RESULT, detail=reason, named=named)
        res.build_seconds, res.test_seconds = bsec, tsec
        log(f"mutants: {name}: {res.verdict.value}")
        out.append(res)
    return ref, out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    available = discover_mutants()
    parser = argparse.ArgumentParser(
        prog="python -m rig.tools.mutants",
        description="Build each mutant kernel and check that the testcases catch it.",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        action="extend",
        metavar="NAME",
        default=[],
        help="run only these mutants (repeatable); known: " + (", ".join(available) or "(none)"),
    )
    parser.add_argument("--flavor", default=DEFAULT_FLAVOR, help=f"kernel flavor (default {DEFAULT_FLAVOR})")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_PYTEST_TIMEOUT,
        help=f"seconds per pytest run (default {DEFAULT_PYTEST_TIMEOUT:.0f})",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=REPO_ROOT / "results",
        help="where mutants.md and the per-kernel logs (mutants/) go (default: results/)",
    )
    parser.add_argument(
        "--all-failures",
        action="store_true",
        help="run every testcase against each mutant (default: stop at its first failure)",
    )
    args = parser.parse_args(argv)
    try:
        get_flavor(args.flavor)
        selected = select_mutants(available, args.only)
    except (UnknownMutantError, UnknownFlavorError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    if not selected:
        print(f"ERROR: no mutants in {MUTANTS_DIR}", file=sys.stderr)
        return 2
    start = time.monotonic()
    try:
        ref, results = run(
            args.flavor,
            selected,
            logs=args.results / "mutants",
            timeout=args.timeout,
            all_failures=args.all_failures,
        )
    except KeyboardInterrupt:
        print("mutants: interrupted", file=sys.stderr)
        return 130
    table = render_table(ref, results)
    print(table, end="")
    args.results.mkdir(parents=True, exist_ok=True)
    md = args.results / MUTANTS_MD
    markdown = f"# Mutants ({args.flavor})\n\n" + render_markdown(ref, results)
    md.write_text(markdown)
    page = write_mutants_page(args.results, markdown, args.results / "mutants")
    _stderr(f"mutants: done in {time.monotonic() - start:.0f} s; table in {md} and {page}")
    return 1 if run_failed(ref, results) else 0


if __name__ == "__main__":
    sys.exit(main())
