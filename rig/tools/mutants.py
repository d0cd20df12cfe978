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

The verdicts and the table are :mod:`rig.tools.mutantverdicts` (this module re-exports
their names); this module builds the kernels and runs pytest on them.

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
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rig.report.junit import Outcome
from rig.report.session import MUTANTS_MD, write_mutants_page
from rig.supply.kernelbuild import (
    REPO_ROOT,
    KernelBuild,
    KernelBuildError,
    UnknownFlavorError,
    build_kernel,
    get_flavor,
)
from rig.tools.mutantverdicts import (
    CAUGHT_BY,
    MUTANTS_DIR,
    MutantResult,
    TestResults,
    UnknownMutantError,
    Verdict,
    build_order,
    caught_by_lines,
    discover_mutants,
    judge,
    names_test,
    parse_junit,
    render_markdown,
    render_table,
    run_failed,
    select_mutants,
    short_name,
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
    "run",
    "run_failed",
    "run_testcases",
    "select_mutants",
    "short_name",
]

#: Default flavor the mutants apply to.
DEFAULT_FLAVOR = "reference-7.2"
#: Seconds one pytest run may take before it is interrupted.
DEFAULT_PYTEST_TIMEOUT = 1800.0
#: Seconds between SIGINT (the rig cleans up QEMU/GDB) and SIGKILL on timeout.
_KILL_GRACE = 30.0

LogFn = Callable[[str], None]


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
        unknown = [n for n in named if not any(names_test(n, t) for t in known)]
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
