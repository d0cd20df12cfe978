"""The container matrix's results: each cell judged from its JUnit XML, the table.

A cell is only ``ok`` when pytest finished (exit 0 or 1) and every skip is one its kernel
kind may give (:func:`skip_expected`, from the testcases' typed skips). The JUnit XML is
read by :func:`rig.report.junit.read_junit`, as every tool reads it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rig.observe.findings import SkipKind
from rig.report.junit import Case, read_junit
from rig.report.junit import Outcome as JunitOutcome
from rig.tools.matrixcells import PREPARE_FAILED, Cell, last_line

__all__ = [
    "NOTE_CHARS",
    "PYTEST_FINISHED",
    "CellResult",
    "Outcome",
    "fmt_seconds",
    "from_json",
    "judge_cell",
    "outcomes_of",
    "qemu_version_of",
    "render_markdown",
    "skip_expected",
    "stop_reason",
    "to_json",
]


@dataclass
class Outcome:
    """One testcase in one cell: ``pass``, ``FAIL``, ``error`` or ``skip``, and its message.

    ``unexpected`` marks a skip its cell's kernel should not give (:func:`skip_expected`).
    """

    status: str
    message: str = ""
    unexpected: bool = False


@dataclass
class CellResult:
    """What one cell gave: ``ok``/``failed`` when pytest ran, else why it could not.

    ``status`` is one of ``ok`` (nothing failed or errored, no unexpected skip, pytest
    finished), ``failed`` (a testcase failed or errored, or skipped unexpectedly),
    ``image failed``, ``kernel failed``, ``boot failed`` (every testcase errored, or pytest
    was ended because the guest did not boot) or ``no result`` (pytest left no JUnit XML,
    or ended early for another reason); ``reason`` is one line for the last four and for
    an unexpected skip.
    """

    cell: str
    status: str
    reason: str = ""
    qemu: str = ""
    seconds: float = 0.0
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def counts(self) -> dict[str, int]:
        c = {"pass": 0, "FAIL": 0, "error": 0, "skip": 0}
        for o in self.outcomes.values():
            c[o.status] += 1
        return c

    def unexpected_skips(self) -> dict[str, Outcome]:
        """The skips this cell's kernel should not give (testcase id -> outcome)."""
        return {t: o for t, o in self.outcomes.items() if o.status == "skip" and o.unexpected}


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else ""


def outcomes_of(cases: Mapping[str, Case]) -> dict[str, Outcome]:
    """Testcase id (``file.py::name``) -> :class:`Outcome` of the cases
    :func:`rig.report.junit.read_junit` read (the worst phase of each; a skip keeps its
    reason, a failure its one-line message)."""
    return {
        _short_id(c.id): Outcome(_STATUS[c.outcome], _first_line(c.outcome_message)) for c in cases.values()
    }


def _short_id(test_id: str) -> str:
    """``testcases/test_x.py::test_y[p]`` -> ``test_x.py::test_y[p]`` (the table's rows)."""
    path, sep, rest = test_id.partition("::")
    return f"{Path(path).name}{sep}{rest}" if sep else test_id


#: :class:`rig.report.junit.Outcome` -> the matrix's word for it.
_STATUS = {JunitOutcome.PASSED: "pass", JunitOutcome.FAILED: "FAIL", JunitOutcome.ERROR: "error",
           JunitOutcome.SKIPPED: "skip"}  # fmt: skip


def qemu_version_of(cell_out: Path) -> str:
    """The version the cell's QEMU printed (``7.2.22 (Debian ...)``), or ''."""
    qemu_file = cell_out / "qemu-version"
    qemu = _first_line(qemu_file.read_text()) if qemu_file.exists() else ""
    return qemu.removeprefix("QEMU emulator version ")


#: pytest's exit statuses for a run that went to its end: 0 all passed, 1 some failed.
#: Anything else (2 interrupted, 3 ``pytest.exit`` for a guest that cannot boot, 4 bad
#: input, 5 nothing collected) means the JUnit file holds only what ran before the stop.
PYTEST_FINISHED = (0, 1)
#: pytest's closing banner, ``!!! _pytest.outcomes.Exit: MESSAGE !!!`` or ``!!! Interrupted: ... !!!``.
_BANNER = re.compile(r"^!+ (?:_pytest\.outcomes\.)?(?:Exit: )?(.+?) !+$")
#: A stop reason that says the guest did not come up.
_NOT_BOOTED = re.compile(r"did not boot|cannot boot")


def skip_expected(kernel: str, kind: SkipKind | None) -> bool:
    """Whether a cell with ``kernel`` may skip a testcase for a reason of ``kind`` (the
    testcase's typed skip, JUnit property ``cr3rig.skip``; None: it gave no kind).

    ``reference-*``: only :attr:`SkipKind.PCID_OFF` (the cells run TCG, which has no PCID);
    the reference kernels carry the signal patch, so every other skip is a misjudgement
    (e.g. PTI or the signal not found) that would hide the testcases. ``debian`` (a stock
    kernel): also :attr:`SkipKind.NO_SIGNAL`. A path kernel: anything (the runner knows
    nothing of it). Any kernel: :attr:`SkipKind.PLUGIN_REFUSED` (the QEMU's doing, not the
    kernel's: the cell's QEMU refuses the plugin's API version and no QEMU that loads it
    runs there).
    """
    if kind is SkipKind.PLUGIN_REFUSED:
        return True
    if kernel.startswith("reference-"):
        return kind is SkipKind.PCID_OFF
    if kernel == "debian":
        return kind in (SkipKind.PCID_OFF, SkipKind.NO_SIGNAL)
    return True


def stop_reason(log_text: str) -> str:
    """The one line of a pytest log that says why the run ended.

    The message of pytest's last ``!!! ... !!!`` banner (``pytest.exit``'s, without
    ``_pytest.outcomes.Exit:``), else the last ``cr3rig: ...`` line the rig printed,
    else the last non-blank line.
    """
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = _BANNER.match(ln)
        if m:
            return m.group(1)
    for ln in reversed(lines):
        if "cr3rig: " in ln:
            return ln[ln.index("cr3rig: ") :]
    return lines[-1] if lines else "(no output)"


def _cell_log_reason(cell_out: Path) -> str:
    """:func:`stop_reason` of the cell's pytest.log, else the engine's last line (pytest never ran)."""
    for name in ("pytest.log", "engine.log"):
        log = cell_out / name
        text = log.read_text(errors="replace") if log.exists() else ""
        if text.strip():
            return stop_reason(text) if name == "pytest.log" else last_line(text)
    return "(no output)"


def judge_cell(cell: Cell, cell_out: Path, returncode: int, seconds: float) -> CellResult:
    """Turn a finished cell (its exit status and files in ``cell_out``) into a :class:`CellResult`."""
    res = CellResult(cell.name, "ok", qemu=qemu_version_of(cell_out), seconds=seconds)
    if returncode == PREPARE_FAILED:
        log = cell_out / "prepare.log"
        res.status, res.reason = "kernel failed", last_line(log.read_text() if log.exists() else "")
        return res
    junit = cell_out / "junit.xml"
    try:
        cases = read_junit(junit)
    except ValueError:
        res.status, res.reason = "no result", f"exit {returncode}: {_cell_log_reason(cell_out)}"
        return res
    res.outcomes = outcomes_of(cases)
    unexpected = []
    for case in cases.values():
        tid = _short_id(case.id)
        o = res.outcomes[tid]
        if o.status == "skip" and not skip_expected(cell.kernel, case.skip_kind) and not o.unexpected:
            o.unexpected = True
            unexpected.append(tid)
    statuses = [o.status for o in res.outcomes.values()]
    if returncode not in PYTEST_FINISHED:
        why = _cell_log_reason(cell_out)
        res.status = "boot failed" if _NOT_BOOTED.search(why) else "no result"
        res.reason = f"pytest exit {returncode}: {why}"
    elif statuses and all(s == "error" for s in statuses):
        res.status = "boot failed"
        res.reason = next(iter(res.outcomes.values())).message
    elif "FAIL" in statuses or "error" in statuses or not statuses or unexpected:
        res.status = "failed"
        if not statuses:
            res.reason = f"no testcases ran (pytest exit {returncode})"
        elif unexpected:
            first = res.outcomes[unexpected[0]].message
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            res.reason = f"unexpected skip of {unexpected[0]}{more}: {_note(first)}"
    return res


def fmt_seconds(s: float) -> str:
    return f"{int(s) // 60} min {int(s) % 60:02d} s" if s >= 60 else f"{s:.0f} s"


def render_markdown(results: Sequence[CellResult], *, reasons: bool = False) -> str:
    """The table: a column per cell, a row per testcase; header rows give QEMU, result and time.

    Each ``FAIL``, ``error`` and unexpected skip (``skip!``) carries a footnote number (its
    message), with ``reasons`` each ``skip`` too; the notes follow the table.
    Cells that could not build or boot are listed below it with their reason.
    """
    tests = sorted({t for r in results for t in r.outcomes})
    notes: dict[str, int] = {}
    lines = [
        "| testcase | " + " | ".join(r.cell for r in results) + " |",
        "| --- |" + " --- |" * len(results),
        "| QEMU | " + " | ".join(r.qemu.split(" ", 1)[0] if r.qemu else "?" for r in results) + " |",
        "| result | " + " | ".join(r.status if not r.outcomes else _summary(r) for r in results) + " |",
        "| time | " + " | ".join(fmt_seconds(r.seconds) for r in results) + " |",
    ]
    for t in tests:
        row = []
        for r in results:
            o = r.outcomes.get(t)
            entry = "" if o is None else o.status + ("!" if o.unexpected else "")
            if o is None:
                row.append("")
            elif (o.status == "skip" and (reasons or o.unexpected)) or (
                o.status in ("FAIL", "error") and o.message
            ):
                n = notes.setdefault(_note(o.message), len(notes) + 1)
                row.append(f"{entry} [{n}]")
            else:
                row.append(entry)
        lines.append(f"| `{t}` | " + " | ".join(row) + " |")
    for msg, n in notes.items():
        lines.append(f"\n[{n}] {msg}")
    for r in results:
        if r.reason:
            lines.append(f"\n{r.cell}: {r.status}: {r.reason}")
    return "\n".join(lines) + "\n"


#: A footnote longer than this is cut (a failure message can run to many kilobytes).
NOTE_CHARS = 400


def _note(message: str) -> str:
    """One line of at most :data:`NOTE_CHARS` characters for a footnote."""
    line = " ".join(message.split())
    return line if len(line) <= NOTE_CHARS else line[: NOTE_CHARS - 1] + "…"


def _summary(r: CellResult) -> str:
    c = r.counts()
    text = f"{c['pass']} pass"
    for k in ("FAIL", "error", "skip"):
        if c[k]:
            text += f", {c[k]} {k}"
    if r.unexpected_skips():
        text += f" ({len(r.unexpected_skips())} unexpected)"
    return text if r.ok else f"**{text}**"


def to_json(results: Sequence[CellResult]) -> str:
    """The same results as JSON: a list of cells with their outcomes per testcase."""
    return json.dumps([asdict(r) for r in results], indent=2, sort_keys=True) + "\n"


def from_json(text: str) -> list[CellResult]:
    """Inverse of :func:`to_json` (to merge the cells of several runs into one table)."""
    cells = []
    for d in json.loads(text):
        outcomes = {t: Outcome(**o) for t, o in d.pop("outcomes").items()}
        cells.append(CellResult(**d, outcomes=outcomes))
    return cells
