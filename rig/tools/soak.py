"""Soak: run ``pytest testcases/`` N times; print pass/fail per run, retries and leftovers.

    scripts/soak N [--workdir DIR] [-- extra pytest args]   (runs python -m rig.tools.soak)

Each run is a child pytest with a JUnit XML report; the cr3rig plugin puts into it,
per testcase, the breakpoint hits it took (``cr3rig.breaks``) and the steps of each
``Guest.step`` call (``cr3rig.steps``, e.g. ``0,3127``). A try is a trace of at least
one step: a 0-step trace is a probe that only reads where a breakpoint stopped
(``guest.step(cpu, max_steps=0)``; ``Stepper.run`` takes a step whenever
``max_steps > 0``), and a testcase that discards a probe (``guest.traces.pop()``) still
has it in ``cr3rig.steps``. Every
process a run starts carries ``CR3RIG_SOAK_TAG=<run tag>`` in its environment; any
still alive after the run is printed (and then killed, so it cannot spoil the next
run). Exit status: 0 only if every run passed and none left a process behind.
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
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rig.report.junit import read_junit

REPO = Path(__file__).resolve().parents[2]
TAG_VARIABLE = "CR3RIG_SOAK_TAG"


@dataclass
class CaseResult:
    """One testcase of one run: outcome, breakpoint hits, steps per stepped trace."""

    name: str
    outcome: str  # passed | failed | error | skipped
    seconds: float
    breaks: int = 0
    steps: list[int] = field(default_factory=list)  # of every Guest.step call, probes included
    message: str = ""
    #: the tries the testcase discarded, each with its reason (each was judged first)
    discarded: list[str] = field(default_factory=list)

    @property
    def try_steps(self) -> list[int]:
        """Steps of each stepped trace of at least one step (not the 0-step probes)."""
        return [s for s in self.steps if s > 0]

    @property
    def traces(self) -> int:
        """How many traces the testcase stepped (a testcase may step one path in parts)."""
        return len(self.try_steps)

    @property
    def retries(self) -> int:
        """How many tries the testcase discarded (and made again): each was judged first,
        and each has its reason in :attr:`discarded`."""
        return len(self.discarded)


@dataclass
class RunResult:
    index: int
    returncode: int
    seconds: float
    cases: list[CaseResult]
    leftovers: list[str]
    reason: str = ""  # why pytest exited non-zero, when no testcase failed

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not any(c.outcome in ("failed", "error") for c in self.cases)

    def count(self, outcome: str) -> int:
        return sum(c.outcome == outcome for c in self.cases)


def processes_tagged(tag: str) -> list[tuple[int, str]]:
    """(pid, command line) of live processes whose environment has ``CR3RIG_SOAK_TAG=tag``."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
            if needle in env.split(b"\0"):
                cmd = (
                    Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
                found.append((int(entry), cmd.strip()[:160]))
        except OSError:
            continue
    return found


def parse_junit(path: Path) -> list[CaseResult]:
    """The testcases of a pytest JUnit XML report (:func:`rig.report.junit.read_junit`)."""
    cases = []
    for case in read_junit(path).values():
        props = case.properties
        steps = [int(s) for s in props.get("cr3rig.steps", "").split(",") if s]
        discarded = [d for d in props.get("cr3rig.discarded", "").split(" | ") if d]
        first = case.messages[0].splitlines()[0][:200] if case.messages and case.messages[0] else ""
        cases.append(
            CaseResult(
                f"{Path(case.id.partition('::')[0]).stem}::{case.id.partition('::')[2]}",
                case.outcome.value,
                case.seconds,
                int(props.get("cr3rig.breaks", "0") or 0),
                steps,
                first if case.outcome.value in ("failed", "error") else "",
                discarded,
            )
        )
    return cases


def run_once(index: int, pytest_args: Sequence[str], workdir: Path, out: TextIO) -> RunResult:
    """Run ``pytest testcases/`` once; collect its results and its leftover processes."""
    tag = uuid.uuid4().hex
    xml = workdir / f"run-{index}.xml"
    log = workdir / f"run-{index}.log"
    env = dict(os.environ, **{TAG_VARIABLE: tag})
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", "testcases/"]
    t0 = time.monotonic()
    with open(log, "w") as logf:
        rc = subprocess.run(
            [*argv, *pytest_args], cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT
        ).returncode
    seconds = time.monotonic() - t0
    cases = parse_junit(xml) if xml.exists() else []
    left = processes_tagged(tag)
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    reason = ""
    if rc != 0:  # the line that says why the session failed (e.g. a session-level check)
        lines = log.read_text(errors="replace").splitlines()
        reason = next((ln for ln in reversed(lines) if ln.startswith(("FAILED:", "ERROR:", "!"))), "")
    result = RunResult(index, rc, seconds, cases, [f"{pid} {cmd}" for pid, cmd in left], reason)
    if not cases:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        print(f"    (no report; pytest exit {rc}; log {log}: {' | '.join(tail)})", file=out)
    return result


def describe_run(r: RunResult, total: int) -> str:
    """One line per run, then one per failed testcase and per testcase that retried."""
    verdict = "PASS" if r.passed else "FAIL"
    lines = [
        f"run {r.index}/{total}: {verdict} in {r.seconds:.1f} s: {r.count('passed')} passed, "
        f"{r.count('failed')} failed, {r.count('error')} error, {r.count('skipped')} skipped; "
        f"leftover processes: {len(r.leftovers)}"
    ]
    if r.returncode != 0 and not any(c.outcome in ("failed", "error") for c in r.cases):
        lines.append(f"    pytest exit status {r.returncode} with no testcase failed: {r.reason}")
    for c in r.cases:
        if c.outcome in ("failed", "error"):
            lines.append(f"    {c.outcome.upper()} {c.name} ({c.seconds:.1f} s): {c.message}")
        if c.retries:
            lines.append(
                f"    retried {c.name}: {c.retries} tries discarded, {c.breaks} breakpoint hits, "
                f"steps per stepped trace {c.try_steps}"
            )
        lines += [f"    discarded by {c.name}: {d}" for d in c.discarded]
    lines += [f"    LEFT BEHIND {p}" for p in r.leftovers]
    return "\n".join(lines)


def summary(runs: Sequence[RunResult]) -> str:
    """Totals, and for each testcase its retries (discarded tries), stepped traces and
    steps over all runs."""
    ok = sum(r.passed for r in runs)
    lines = [
        f"soak: {ok}/{len(runs)} runs passed, {len(runs) - ok} failed; "
        f"leftover processes: {sum(len(r.leftovers) for r in runs)}; "
        f"run time {min(r.seconds for r in runs):.0f}-{max(r.seconds for r in runs):.0f} s"
    ]
    names = sorted({c.name for r in runs for c in r.cases})
    lines.append(
        f"{'testcase':<70} {'fail':>4} {'retries max':>11} {'retries':>7} {'traces max':>10} "
        f"{'max steps/trace':>15} {'max s':>6}"
    )
    for name in names:
        cs = [c for r in runs for c in r.cases if c.name == name]
        retries = [c.retries for c in cs]
        steps = [s for c in cs for s in c.try_steps]
        fails = sum(c.outcome in ("failed", "error") for c in cs)
        lines.append(
            f"{name[-70:]:<70} {fails:>4} {max(retries):>11} {sum(retries):>7} "
            f"{max(c.traces for c in cs):>10} {max(steps, default=0):>15} {max(c.seconds for c in cs):>6.1f}"
        )
    reasons = [f"  {c.name}: {d}" for r in runs for c in r.cases for d in c.discarded]
    if reasons:
        lines.append("retries: the discarded tries (each judged by every check first), with their reasons:")
        lines += reasons
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rig.tools.soak", description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=int, help="how many consecutive runs of pytest testcases/")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where run logs and reports go (default: a temp dir)"
    )
    parser.epilog = "Arguments after -- go to each pytest run."
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.pytest_args = argv[cut + 1 :]
    if args.runs < 1:
        parser.error(f"runs {args.runs}: must be at least 1")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cr3rig-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"soak: {args.runs} runs of pytest testcases/ {' '.join(args.pytest_args)}; logs in {workdir}",
        flush=True,
    )
    runs = []
    for i in range(1, args.runs + 1):
        r = run_once(i, args.pytest_args, workdir, sys.stdout)
        runs.append(r)
        print(describe_run(r, args.runs), flush=True)
    print(summary(runs), flush=True)
    return 0 if all(r.passed and not r.leftovers for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
