"""``cr3rig``: one command for the rig's tools, ``cr3rig <subcommand> [arguments]``.

Each subcommand hands its arguments to the ``main(argv)`` of the module that does the
work, so ``cr3rig matrix --cell trixie:reference-7.2`` and ``python -m rig.tools.matrix
--cell trixie:reference-7.2`` are the same run, and ``cr3rig <subcommand> --help`` is
that module's own help. ``cr3rig --help`` lists the subcommands, one line each
(:data:`SUBCOMMANDS`). The testcases themselves are not a subcommand: they run under
pytest (``pytest testcases/``), whose plugin the package installs.

``bench`` runs ``bench/bench_rig.py`` of the source tree the package is installed from
(an editable install, as ``scripts/setup.sh`` makes): the benchmark is a script of the
repository, not a module of the package, and is loaded from there by path.

Exit status: the subcommand's; 2 for an unknown subcommand (one line on stderr) or for
none.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["BENCH_SCRIPT", "SUBCOMMANDS", "Subcommand", "main", "usage"]

#: The benchmark script ``cr3rig bench`` runs (in the source tree beside the package).
BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_rig.py"


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: its ``name``, the ``module`` whose ``main(argv)`` does the work
    (a path for ``bench``), and the one-line ``summary`` ``cr3rig --help`` shows."""

    name: str
    module: str
    summary: str


#: Every subcommand, in the order ``cr3rig --help`` lists them.
SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("kernel", "rig.supply.kernelbuild", "build a patched reference kernel into the cache"),
    Subcommand("initramfs", "rig.supply.initramfs", "build the guest initramfs (workloads, x86 selftests)"),
    Subcommand("mutants", "rig.tools.mutants", "build each mutant kernel and check the testcases catch it"),
    Subcommand("matrix", "rig.tools.matrix", "run the testcases in containers: QEMU version x kernel"),
    Subcommand("soak", "rig.tools.soak", "run pytest testcases/ N times; retries and leftover processes"),
    Subcommand("sshd", "rig.tools.private_sshd", "serve a private OpenSSH server on 127.0.0.1 for --host"),
    Subcommand("bench", "bench/bench_rig.py", "measure the rig against baselines of the same run"),
    Subcommand("report", "rig.tools.report", "draw timelines and the mutant page again from their data"),
    Subcommand("litmus", "rig.tools.litmus", "run the herd7 litmus tests of the signal's ordering"),
    Subcommand("tcgorder", "rig.tools.tcgorder", "count store-buffering outcomes on a booted guest"),
)

_BY_NAME = {s.name: s for s in SUBCOMMANDS}

#: What ``cr3rig sshd --help`` prints: the module takes only ``--no-sftp``.
_SSHD_USAGE = "usage: cr3rig sshd [--no-sftp]"


def _version() -> str:
    try:
        return version("cr3rig")
    except PackageNotFoundError:
        return "unknown"


def usage() -> str:
    """The text of ``cr3rig --help``: the synopsis and one line per subcommand."""
    width = max(len(s.name) for s in SUBCOMMANDS)
    lines = [
        "usage: cr3rig <subcommand> [arguments]",
        "       cr3rig <subcommand> --help",
        "",
        "The tools of cr3rig, a QEMU/GDB test rig for Linux x86 entry code.",
        "The testcases run under pytest: .venv/bin/pytest testcases/ (options: pytest --help).",
        "",
        "subcommands:",
        *(f"  {s.name:<{width}}  {s.summary}" for s in SUBCOMMANDS),
        "",
        "options:",
        "  -h, --help     show this list and exit",
        "  --version      show cr3rig's version and exit",
    ]
    return "\n".join(lines) + "\n"


def _module_main(module: str) -> Callable[[list[str]], int]:
    """The ``main(argv)`` of ``module``, imported only when its subcommand runs."""

    def run(argv: list[str]) -> int:
        entry: Callable[[list[str]], int] = importlib.import_module(module).main
        return entry(argv)

    return run


def _matrix(argv: list[str]) -> int:
    # as ``python -m rig.tools.matrix`` does: SIGTERM (kill, a cancelled CI job) ends the
    # runner as Ctrl-C does, so the running cell's container is removed
    from rig.transport.host import sigterm_as_ctrl_c

    sigterm_as_ctrl_c()
    return _module_main("rig.tools.matrix")(argv)


def _sshd(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        from rig.tools import private_sshd

        print(_SSHD_USAGE)
        print()
        print((private_sshd.__doc__ or "").strip())
        return 0
    return _module_main("rig.tools.private_sshd")(argv)


def _bench(argv: list[str]) -> int:
    if not BENCH_SCRIPT.is_file():
        print(
            f"cr3rig bench: {BENCH_SCRIPT} not found: the benchmark lives in the source tree; "
            "install cr3rig from a checkout (pip install -e .) or run bench/bench_rig.py there",
            file=sys.stderr,
        )
        return 2
    spec = importlib.util.spec_from_file_location("cr3rig_bench", BENCH_SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses and pickling look their module up by name
    spec.loader.exec_module(bench)
    # the script reads sys.argv itself (its main() takes no arguments)
    saved = sys.argv
    sys.argv = ["cr3rig bench", *argv]
    try:
        status: int = bench.main()
    finally:
        sys.argv = saved
    return status


_RUNNERS: dict[str, Callable[[list[str]], int]] = {
    "matrix": _matrix,
    "sshd": _sshd,
    "bench": _bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cr3rig [argv]``; return the exit status (the subcommand's, or 2)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stderr.write(usage())
        return 2
    name, rest = args[0], args[1:]
    if name in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0
    if name == "--version":
        print(f"cr3rig {_version()}")
        return 0
    sub = _BY_NAME.get(name)
    if sub is None:
        print(
            f"cr3rig: unknown subcommand {name!r} (choose from {', '.join(_BY_NAME)}; cr3rig --help)",
            file=sys.stderr,
        )
        return 2
    run = _RUNNERS.get(sub.name) or _module_main(sub.module)
    return run(rest)


if __name__ == "__main__":
    raise SystemExit(main())
