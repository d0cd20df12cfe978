"""The container matrix: QEMU version (a Debian suite's) x kernel, one table of results.

A *cell* is ``SUITE:KERNEL``: the image ``cr3rig:SUITE`` (the Dockerfile with
``--build-arg SUITE=SUITE``, so bookworm = QEMU 7.2, trixie = 10.0, sid = 11.1) and a
``--kernel`` value (``reference-7.2``, ``reference-6.1``, ``debian`` = the stock kernel
of that suite, or a path to a bzImage/vmlinux on the host). For each cell the runner

1. builds the suite's image (or reuses it: the engine's layer cache makes an unchanged
   tree a few seconds),
2. runs the container with the host's kernel cache mounted at the same path, prepares
   the kernel (``python -m rig.supply.kernel KERNEL``; built once for the whole matrix,
   the cache is keyed by content and guarded by flock) and runs ``pytest testcases/``
   into ``OUT/cells/<cell>/junit.xml``,
3. reads the JUnit XML.

It prints one table (rows testcases, columns cells; ``pass``/``FAIL``/``error``/``skip``,
with ``--reasons`` each skip names its reason), writes it to ``OUT/matrix.md`` and
``OUT/matrix.json``, and exits 1 if any testcase failed or errored or any cell could not
build or boot (such a cell shows its one-line reason and the other cells still run).

A cell is only ``ok`` when pytest finished (exit 0 or 1: a ``pytest.exit`` at boot leaves
a JUnit file in which nothing failed) and every skip is one its kernel kind may give
(:func:`skip_expected`): a reference kernel only the PCID skips (TCG has no PCID), a
stock kernel also the skips for lacking the CR3 signal. Any other skip shows as
``skip!`` with its reason and fails the cell.

Command line::

    python -m rig.tools.matrix                                   # the default cells
    python -m rig.tools.matrix --cell trixie:debian --reasons    # one cell
    python -m rig.tools.matrix --prepare-only --cell bookworm:reference-6.1   # kernels only

The runner itself needs only the Python standard library (no venv), so a CI job can
call it with the system ``python3``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rig.supply.cache import default_cache_dir
from rig.supply.kernel import is_named_kernel
from rig.transport.host import sigterm_as_ctrl_c

__all__ = [
    "DEFAULT_CELLS",
    "Cell",
    "CellResult",
    "Engine",
    "build_argv",
    "cell_script",
    "find_engine",
    "main",
    "parse_cell",
    "parse_junit",
    "podman_engine",
    "render_markdown",
    "run_argv",
    "skip_expected",
    "stop_reason",
    "to_json",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
#: QEMU 7.2, 10.0 and 11.1 x (the reference kernel, the suite's stock kernel), and the 6.1 port once.
DEFAULT_CELLS = (
    "bookworm:reference-7.2",
    "bookworm:debian",
    "trixie:reference-7.2",
    "trixie:debian",
    "sid:reference-7.2",
    "sid:debian",
    "bookworm:reference-6.1",
)
#: Image name; the tag is the suite.
IMAGE = "cr3rig"
#: Exit status of the cell script when the kernel (or initramfs) could not be prepared.
PREPARE_FAILED = 90
#: Seconds a cell may run (prepare + pytest) before it is stopped.
CELL_TIMEOUT = 3600.0
#: Seconds an image build may take.
BUILD_TIMEOUT = 3600.0
#: Exported to the container: the kernel to test.
KERNEL_ENV = "CR3RIG_MATRIX_KERNEL"

LogFn = Callable[[str], None]


class MatrixError(RuntimeError):
    """Bad input to the runner (a malformed cell, no container engine); one line."""


# --------------------------------------------------------------------------
# Cells


@dataclass(frozen=True)
class Cell:
    """One column of the table: a Debian suite (hence a QEMU version) and a kernel."""

    suite: str
    kernel: str

    @property
    def name(self) -> str:
        return f"{self.suite}:{self.kernel}"

    @property
    def slug(self) -> str:
        """A file-name-safe form of :attr:`name`."""
        return "".join(c if c.isalnum() or c in "-._" else "_" for c in self.name.replace(":", "__"))


def parse_cell(text: str) -> Cell:
    """``SUITE:KERNEL`` -> :class:`Cell`; a path kernel must exist on the host."""
    suite, sep, kernel = text.partition(":")
    if not sep or not suite or not kernel or not suite.replace("-", "").isalnum():
        raise MatrixError(f"cell {text!r}: expected SUITE:KERNEL, e.g. trixie:reference-7.2 or sid:debian")
    named = is_named_kernel(kernel)
    if not named:
        path = Path(kernel).expanduser()
        if not path.is_file():
            raise MatrixError(
                f"cell {text!r}: {kernel} is no file; give reference-7.2, reference-6.1, debian or a path"
            )
        kernel = str(path.resolve())
    return Cell(suite, kernel)


def kernel_mounts(kernel: str) -> list[Path]:
    """Host directories a path kernel needs in the container (mounted read-only at the same path).

    The image's directory, or the build tree when the image is ``<tree>/arch/x86/boot/bzImage``
    with a ``<tree>/vmlinux`` (the rig finds the vmlinux there).
    """
    if kernel == "debian" or kernel.startswith("reference-"):
        return []
    path = Path(kernel)
    tree = path.parents[3] if len(path.parents) > 3 else path.parent
    return [tree if (tree / "vmlinux").is_file() else path.parent]


# --------------------------------------------------------------------------
# The container engine


@dataclass(frozen=True)
class Engine:
    """A container engine CLI: the argv prefix every command starts with, and its environment."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


def podman_engine(out: Path, *, runc: bool, containers_conf: str | None) -> Engine:
    """podman with cgroupfs (hosts without a systemd user session), runc if present, and a
    containers.conf without default ulimits (runc here refuses them: "error setting rlimit
    type 7") unless ``CONTAINERS_CONF`` already names one."""
    argv = ["podman", "--cgroup-manager=cgroupfs"]
    if runc:
        argv += ["--runtime", "runc"]
    if containers_conf is None:
        conf = out / "containers.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text("[containers]\ndefault_ulimits = []\n")
        containers_conf = str(conf)
    return Engine("podman", tuple(argv), {"CONTAINERS_CONF": containers_conf})


def find_engine(out: Path, preferred: str | None = None) -> Engine:
    """The first of podman, docker (or only ``preferred``) that is installed and answers ``info``."""
    tried = []
    for name in [preferred] if preferred else ["podman", "docker"]:
        if shutil.which(name) is None:
            tried.append(f"{name}: not installed")
            continue
        if name == "podman":
            eng = podman_engine(
                out, runc=shutil.which("runc") is not None, containers_conf=os.environ.get("CONTAINERS_CONF")
            )
        else:
            eng = Engine(name, (name,))
        res = subprocess.run(
            [*eng.argv, "info"], capture_output=True, text=True, env={**os.environ, **eng.env}, check=False
        )
        if res.returncode == 0:
            return eng
        tried.append(f"{name}: `{name} info` failed: {_last_line(res.stderr or res.stdout)}")
    raise MatrixError("no usable container engine (" + "; ".join(tried) + "); install podman and runc")


def image_name(suite: str) -> str:
    return f"{IMAGE}:{suite}"


#: A host's own CA certificates (update-ca-certificates reads them); passed to the image.
SITE_CA_DIR = Path("/usr/local/share/ca-certificates")


def site_ca_certs(ca_dir: Path = SITE_CA_DIR) -> str:
    """The PEM text of the host's own CA certificates (``*.crt`` under ``ca_dir``), or ''.

    Behind a TLS-intercepting proxy pip in the image needs them to reach PyPI.
    """
    if not ca_dir.is_dir():
        return ""
    return "\n".join(p.read_text().strip() for p in sorted(ca_dir.rglob("*.crt")) if p.is_file())


def build_argv(engine: Engine, suite: str, repo: Path, ca_pem: str = "") -> list[str]:
    """The command that builds (or, from the layer cache, reuses) the suite's image."""
    argv = [*engine.argv, "build", "--network", "host", "--build-arg", f"SUITE={suite}"]
    if ca_pem:
        argv += ["--build-arg", f"EXTRA_CA_CERTS={ca_pem}"]
    return [*argv, "-t", image_name(suite), "-f", str(repo / "Dockerfile"), str(repo)]


def cell_script(pytest_args: Sequence[str] = ()) -> str:
    """The shell script a cell runs in its container (the kernel comes in ``$CR3RIG_MATRIX_KERNEL``).

    Exit :data:`PREPARE_FAILED` if the kernel or initramfs cannot be prepared, else pytest's status.
    """
    extra = " ".join(_sh_quote(a) for a in pytest_args)
    return (
        "qemu-system-x86_64 --version | head -n 1 > /out/qemu-version\n"
        f'.venv/bin/python -m rig.supply.kernel "${KERNEL_ENV}" > /out/prepare.log 2>&1 '
        f"|| exit {PREPARE_FAILED}\n"
        f'exec .venv/bin/pytest testcases/ --kernel "${KERNEL_ENV}" --junitxml=/out/junit.xml '
        f"-p no:cacheprovider --trace-dir /out/traces {extra} > /out/pytest.log 2>&1\n"
    )


def run_argv(
    engine: Engine, cell: Cell, cache: Path, cell_out: Path, *, prepare_only: bool = False,
    pytest_args: Sequence[str] = (),
) -> list[str]:  # fmt: skip
    """The command that runs one cell: the host's cache at the same path, ``cell_out`` at /out."""
    argv = [
        *engine.argv, "run", "--rm", "--name", container_name(cell), "--network", "host",
        "-v", f"{cache}:{cache}", "-e", f"CR3RIG_CACHE={cache}",
        "-v", f"{cell_out}:/out", "-e", f"{KERNEL_ENV}={cell.kernel}",
    ]  # fmt: skip
    for d in kernel_mounts(cell.kernel):
        argv += ["-v", f"{d}:{d}:ro"]
    if engine.name == "docker" and os.getuid() != 0:
        # files written into the shared cache keep the caller's ownership
        argv += ["--user", f"{os.getuid()}:{os.getgid()}", "-e", "HOME=/tmp"]
    script = cell_script(pytest_args)
    if prepare_only:
        script = script.split("\nexec ", 1)[0] + "\n"
    return [*argv, image_name(cell.suite), "sh", "-c", script]


def container_name(cell: Cell) -> str:
    """The cell's container name: unique per runner process, so a stop can remove it."""
    return f"cr3rig-{cell.slug.replace('__', '-')}-{os.getpid()}"


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------
# Results


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


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else ""


def parse_junit(source: str | Path) -> dict[str, Outcome]:
    """Testcase id (``file.py::name``) -> :class:`Outcome` from a pytest JUnit XML file or text.

    A failure or error wins over a pass; a skip keeps its reason (``message``, without
    pytest's ``file:line:`` prefix). Raises ValueError on unreadable XML.
    """
    try:
        root = ET.parse(source).getroot() if isinstance(source, Path) else ET.fromstring(source)
    except (ET.ParseError, OSError) as e:
        raise ValueError(f"unreadable JUnit XML: {e}") from None
    rank = {"pass": 0, "skip": 1, "error": 2, "FAIL": 3}
    out: dict[str, Outcome] = {}
    for case in root.iter("testcase"):
        if case.get("name") is None:
            continue  # the test pytest.exit() ended: pytest writes a nameless, empty entry for it
        module = case.get("classname", "").rsplit(".", 1)[-1]
        tid = f"{module}.py::{case.get('name', '?')}" if module else case.get("name", "?")
        outcome = Outcome("pass")
        for child in case:
            status = {"failure": "FAIL", "error": "error", "skipped": "skip"}.get(child.tag)
            if status is None or rank[status] < rank[outcome.status]:
                continue
            msg = child.get("message") or _first_line(child.text or "")
            if status == "skip" and msg.startswith("Skipped: "):
                msg = msg.removeprefix("Skipped: ")
            outcome = Outcome(status, _first_line(msg))
        old = out.get(tid)
        if old is None or rank[outcome.status] > rank[old.status]:
            out[tid] = outcome
    return out


def _qemu_version(cell_out: Path) -> str:
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

#: Skip reason (its start) of the PCID testcases where the guest has no PCID (TCG): testcases/test_pcid.py.
PCID_OFF = "NOT COVERED: PCID is off"
#: Skip reason (a part) of every signal testcase on a kernel without the CR3-signal patch:
#: ``signal_guest`` in testcases/conftest.py (the watch, plugin-watch, exploration and
#: selftest testcases all take it first, so a stock kernel skips them with this reason).
NO_SIGNAL = "lacks kernel_cr3_loaded (CONFIG_TRACK_CR3"
#: Skip reason (a part) of plugin watch where the cell's QEMU refuses the plugin's API
#: version and no QEMU that loads it runs there (``rig.supply.qemuplugin``; sid's QEMU
#: 11.1 loads only API >= 7, the newest ``qemu-plugin.h`` the mirror serves is API 4, and
#: bookworm-backports' QEMU 10 does not run on sid's libraries). It says what the QEMU
#: said; whatever the kernel, the cell cannot do better.
PLUGIN_API_REFUSED = "refuses the plugin built against"


def skip_expected(kernel: str, reason: str) -> bool:
    """Whether a cell with ``kernel`` may skip a testcase for ``reason``.

    ``reference-*``: only :data:`PCID_OFF` (the cells run TCG, which has no PCID); the
    reference kernels carry the signal patch, so every other skip is a misjudgement (e.g.
    PTI or the signal not found) that would hide the testcases. ``debian`` (a stock
    kernel): also :data:`NO_SIGNAL`. A path kernel: anything (the runner knows nothing of it).
    Any kernel: :data:`PLUGIN_API_REFUSED` (the QEMU's, not the kernel's).
    """
    if PLUGIN_API_REFUSED in reason:
        return True
    if kernel.startswith("reference-"):
        return reason.startswith(PCID_OFF)
    if kernel == "debian":
        return reason.startswith(PCID_OFF) or NO_SIGNAL in reason
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
            return stop_reason(text) if name == "pytest.log" else _last_line(text)
    return "(no output)"


def judge_cell(cell: Cell, cell_out: Path, returncode: int, seconds: float) -> CellResult:
    """Turn a finished cell (its exit status and files in ``cell_out``) into a :class:`CellResult`."""
    res = CellResult(cell.name, "ok", qemu=_qemu_version(cell_out), seconds=seconds)
    if returncode == PREPARE_FAILED:
        log = cell_out / "prepare.log"
        res.status, res.reason = "kernel failed", _last_line(log.read_text() if log.exists() else "")
        return res
    junit = cell_out / "junit.xml"
    try:
        res.outcomes = parse_junit(junit)
    except ValueError:
        res.status, res.reason = "no result", f"exit {returncode}: {_cell_log_reason(cell_out)}"
        return res
    unexpected = []
    for tid, o in res.outcomes.items():
        if o.status == "skip" and not skip_expected(cell.kernel, o.message):
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


def _fmt_seconds(s: float) -> str:
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
        "| time | " + " | ".join(_fmt_seconds(r.seconds) for r in results) + " |",
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


# --------------------------------------------------------------------------
# Running


def _run_logged(
    argv: Sequence[str], env: dict[str, str], log: Path, timeout: float,
    cleanup: Sequence[str] = (),
) -> int:  # fmt: skip
    """Run ``argv`` with its output in ``log``; return its status.

    On timeout or Ctrl-C its process group is stopped and ``cleanup`` (a command, e.g.
    ``podman rm -f NAME``: the container outlives its client) is run before re-raising.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True
        )
        try:
            return proc.wait(timeout=timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if cleanup:
                subprocess.run(list(cleanup), env={**os.environ, **env}, capture_output=True, check=False)
            raise


def run_matrix(
    cells: Sequence[Cell],
    out: Path,
    engine: Engine,
    *,
    cache: Path,
    build: bool = True,
    prepare_only: bool = False,
    pytest_args: Sequence[str] = (),
    log: LogFn = lambda s: print(s, file=sys.stderr, flush=True),
) -> list[CellResult]:
    """Build each suite's image once and run every cell; never raises for a broken cell."""
    images: dict[str, str] = {}  # suite -> "" if ready, else the one-line reason
    results = []
    cache.mkdir(parents=True, exist_ok=True)
    for cell in cells:
        if cell.suite not in images:
            images[cell.suite] = ""
            if build:
                t0 = time.monotonic()
                blog = out / "images" / f"{cell.suite}.log"
                log(f"matrix: building {image_name(cell.suite)} (log {blog})")
                try:
                    argv = build_argv(engine, cell.suite, REPO_ROOT, site_ca_certs())
                    rc = _run_logged(argv, engine.env, blog, BUILD_TIMEOUT)
                except subprocess.TimeoutExpired:
                    rc = -1
                if rc != 0:
                    images[cell.suite] = _image_reason(cell.suite, blog.read_text())
                verdict = "ok" if rc == 0 else "FAILED"
                log(f"matrix: image {cell.suite}: {verdict} in {time.monotonic() - t0:.0f} s")
        if images[cell.suite]:
            results.append(CellResult(cell.name, "image failed", images[cell.suite]))
            continue
        cell_out = out / "cells" / cell.slug
        shutil.rmtree(cell_out, ignore_errors=True)
        cell_out.mkdir(parents=True)
        log(f"matrix: running {cell.name}")
        t0 = time.monotonic()
        argv = run_argv(engine, cell, cache, cell_out, prepare_only=prepare_only, pytest_args=pytest_args)
        try:
            remove = [*engine.argv, "rm", "-f", container_name(cell)]
            rc = _run_logged(argv, engine.env, cell_out / "engine.log", CELL_TIMEOUT, remove)
        except subprocess.TimeoutExpired:
            rc = -1
        seconds = time.monotonic() - t0
        if rc == -1:
            r = CellResult(cell.name, "no result", f"timed out after {CELL_TIMEOUT:.0f} s", seconds=seconds)
        elif prepare_only and rc == 0:
            r = CellResult(cell.name, "ok", qemu=_qemu_version(cell_out), seconds=seconds)
        else:
            r = judge_cell(cell, cell_out, rc, seconds)
        log(f"matrix: {cell.name}: {r.status} in {seconds:.0f} s {r.reason}")
        results.append(r)
    return results


def _image_reason(suite: str, build_log: str) -> str:
    """One line saying why the suite's image did not build (a missing base image gets the fix)."""
    low = build_log.lower()
    pull_errors = ("not found", "manifest unknown", "pull access denied", "failed to resolve", "initializing")
    if f"debian:{suite}" in low and any(s in low for s in pull_errors):
        return f"no base image debian:{suite}: make it with scripts/debian-base-image.sh {suite}"
    # apt's or pip's own error says more than the engine's "error building at STEP ..."
    tool_errors = [ln.strip() for ln in build_log.splitlines() if ln.startswith(("E: ", "ERROR: "))]
    return tool_errors[-1] if tool_errors else _last_line(build_log)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rig.tools.matrix``: run the cells, print and write the table; 1 on any failure."""
    p = argparse.ArgumentParser(prog="python -m rig.tools.matrix", description=__doc__.splitlines()[0])
    p.add_argument("--cell", action="append", default=[], metavar="SUITE:KERNEL",
                   help=f"a cell (repeatable); default: {' '.join(DEFAULT_CELLS)}")  # fmt: skip
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "matrix", help="output directory")
    p.add_argument("--engine", choices=("podman", "docker"), help="default: podman, else docker")
    p.add_argument("--reasons", action="store_true", help="give each skip's reason")
    p.add_argument("--no-build", action="store_true", help="use the images as they are")
    p.add_argument("--prepare-only", action="store_true", help="only put the cells' kernels into the cache")
    p.add_argument("--cache", type=Path, help="kernel cache (default: $CR3RIG_CACHE, ~/.cache/cr3rig)")
    p.add_argument("--pytest-arg", action="append", default=[], help="extra argument for pytest (repeatable)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="MATRIX_JSON",
                   help="run nothing: one table from earlier runs' matrix.json")  # fmt: skip
    args = p.parse_args(argv)
    out = args.out.resolve()
    if args.merge:
        results = [r for f in args.merge for r in from_json(f.read_text())]
        return _report(results, out, reasons=args.reasons, what="merged")
    try:
        cells = [parse_cell(c) for c in (args.cell or DEFAULT_CELLS)]
        engine = find_engine(out, args.engine)
    except MatrixError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    cache = (args.cache or default_cache_dir()).expanduser().resolve()
    t0 = time.monotonic()
    results = run_matrix(
        cells, out, engine, cache=cache, build=not args.no_build,
        prepare_only=args.prepare_only, pytest_args=args.pytest_arg,
    )  # fmt: skip
    return _report(results, out, reasons=args.reasons,
                   what=f"run in {_fmt_seconds(time.monotonic() - t0)} with {engine.name}")  # fmt: skip


def _report(results: Sequence[CellResult], out: Path, *, reasons: bool, what: str) -> int:
    """Print the table, write matrix.md (with skip reasons) and matrix.json; 1 unless all cells ok."""
    print(render_markdown(results, reasons=reasons))
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.md").write_text(render_markdown(results, reasons=True))
    (out / "matrix.json").write_text(to_json(results))
    print(f"matrix: {len(results)} cell(s) {what}; written to {out}/matrix.md, matrix.json", file=sys.stderr)
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    # SIGTERM (kill, a cancelled CI job) ends the runner as Ctrl-C does, so the running
    # cell's container is removed (_run_logged's cleanup); without it the container and
    # its QEMU ran on
    sigterm_as_ctrl_c()
    raise SystemExit(main())
