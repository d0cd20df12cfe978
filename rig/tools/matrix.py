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

The cells and the engine commands are :mod:`rig.tools.matrixcells`; judging a cell and the
table, :mod:`rig.tools.matrixresults` (this module re-exports their names).

It prints one table (rows testcases, columns cells; ``pass``/``FAIL``/``error``/``skip``,
with ``--reasons`` each skip names its reason), writes it to ``OUT/matrix.md`` and
``OUT/matrix.json``, and exits 1 if any testcase failed or errored or any cell could not
build or boot (such a cell shows its one-line reason and the other cells still run).

A cell is only ``ok`` when pytest finished (exit 0 or 1: a ``pytest.exit`` at boot leaves
a JUnit file in which nothing failed) and every skip is one its kernel kind may give
(:func:`skip_expected`, from the testcases' typed skips, JUnit property ``cr3rig.skip``): a
reference kernel only the PCID skips (TCG has no PCID), a stock kernel also the skips for
lacking the CR3 signal. Any other skip shows as
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
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rig.supply.cache import default_cache_dir
from rig.tools.matrixcells import (
    KERNEL_ENV,
    PREPARE_FAILED,
    REPO_ROOT,
    Cell,
    Engine,
    MatrixError,
    build_argv,
    cell_script,
    container_name,
    find_engine,
    image_name,
    kernel_mounts,
    last_line,
    parse_cell,
    podman_engine,
    run_argv,
    site_ca_certs,
)
from rig.tools.matrixresults import (
    NOTE_CHARS,
    CellResult,
    Outcome,
    fmt_seconds,
    from_json,
    judge_cell,
    outcomes_of,
    qemu_version_of,
    render_markdown,
    skip_expected,
    stop_reason,
    to_json,
)
from rig.transport.host import sigterm_as_ctrl_c

__all__ = [
    "DEFAULT_CELLS",
    "KERNEL_ENV",
    "NOTE_CHARS",
    "PREPARE_FAILED",
    "REPO_ROOT",
    "Cell",
    "CellResult",
    "Engine",
    "MatrixError",
    "Outcome",
    "build_argv",
    "cell_script",
    "find_engine",
    "from_json",
    "judge_cell",
    "kernel_mounts",
    "main",
    "outcomes_of",
    "parse_cell",
    "podman_engine",
    "render_markdown",
    "run_argv",
    "run_matrix",
    "skip_expected",
    "stop_reason",
    "to_json",
]

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
#: Seconds a cell may run (prepare + pytest) before it is stopped.
CELL_TIMEOUT = 3600.0
#: Seconds an image build may take.
BUILD_TIMEOUT = 3600.0
LogFn = Callable[[str], None]


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
            r = CellResult(cell.name, "ok", qemu=qemu_version_of(cell_out), seconds=seconds)
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
    return tool_errors[-1] if tool_errors else last_line(build_log)


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
                   what=f"run in {fmt_seconds(time.monotonic() - t0)} with {engine.name}")  # fmt: skip


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
