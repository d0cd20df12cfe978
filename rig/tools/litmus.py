"""Run the herd7 litmus tests in ``litmus/`` and check each against its stated expectation.

Each test in ``litmus/`` is an x86 litmus test in herd7's syntax about the ordering of
the ``kernel_cr3_loaded`` signal (docs/ordering.md). Its header says, in comments, the
question it asks (``(* Question: … *)``) and the verdict expected for its ``exists``
clause, the bad outcome (``(* expect: allowed *)`` or ``(* expect: forbidden *)``). The
runner gives each test to herd7 under the x86-TSO model (``-model x86tso.cat``), reads
herd7's answer (``States``, ``Positive:``/``Negative:``, ``Observation NAME
Never|Sometimes|Always P N``), prints one Markdown table (test, expectation, herd7's
verdict and observation, number of final states) and exits 1 if any verdict differs from
its expectation or herd7 gave no answer for a test, 2 if herd7 cannot be had at all.

For an ``exists`` clause ``Never`` means no execution of the model reaches the outcome
(forbidden); ``Sometimes`` or ``Always`` means some does (allowed). herd7's first line,
``Test NAME Allowed``, only names the kind of the clause (``exists``) and says nothing
about the result. herd7 exits 0 even when it cannot parse a test (it warns on stderr
and prints no result): a test without a result block is reported as an error.

Where herd7 comes from
----------------------
1. ``--herd7 PATH``, else ``herd7`` on ``PATH`` (Debian sid's ``herdtools7`` package, or
   opam's ``herdtools7``).
2. Else Debian sid's ``herdtools7`` package, unpacked once into the cache
   (``$CR3RIG_CACHE/herdtools7/sid``, default ``~/.cache/cr3rig``). Only sid packages
   herdtools7, and its herd7 (7.58-2) does not run on bookworm: it needs glibc 2.42
   (``ldd``: "version `GLIBC_2.42' not found"; bookworm has 2.36). So sid's ``libc6``
   and ``libgmp10`` are unpacked beside it and herd7 is started through sid's own
   dynamic loader, ``LIB/ld-linux-x86-64.so.2 --library-path LIB herd7 -set-libdir
   HERDLIB`` (herd7 is a native OCaml program that loads no other library: no NSS, no
   plugin). The three packages come with ``apt-get download`` through a private
   sources list naming sid (``MIRROR``, else the host's Debian mirror), private lists
   and cache directories, so the system's apt configuration and installed packages are
   untouched; ``dpkg-deb -x`` unpacks them; about 41 MB is downloaded once, ~10 s.

This is preferred to a Debian sid container (a debootstrapped base image and podman,
as the container matrix does): it needs neither root, nor podman and runc, nor
debootstrap, nor minutes of image building, and it gives the same binary. It needs a
Debian-like host (``apt-get``, ``dpkg-deb``, ``debian-archive-keyring``) and Debian's
package registry; elsewhere, put herd7 on ``PATH``. The installation is guarded by a
flock and made in a temporary folder renamed into place, so concurrent runs share it.

Command line::

    python -m rig.tools.litmus                      # every test in litmus/
    python -m rig.tools.litmus litmus/b-v8+reader-mfence.litmus
    python -m rig.tools.litmus --herd7 /usr/bin/herd7 --no-install

The runner needs only the Python standard library, so it runs with a system
``python3`` (e.g. in a ``debian:sid`` container with ``herdtools7`` installed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rig.supply.cache import default_cache_dir, locked

__all__ = [
    "LITMUS_DIR",
    "MODEL",
    "Herd7",
    "HerdResult",
    "LitmusError",
    "LitmusTest",
    "Row",
    "debian_mirror",
    "find_herd7",
    "find_tests",
    "install_private_herd7",
    "judge",
    "main",
    "parse_herd_output",
    "private_herd7",
    "read_test",
    "render_table",
    "run_test",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The folder of litmus tests run by default.
LITMUS_DIR = REPO_ROOT / "litmus"
#: herd7's x86 total-store-order model (its default for X86 tests too; named so a change
#: of default cannot change the verdicts).
MODEL = "x86tso.cat"
#: The Debian suite whose herdtools7 is unpacked when none is installed.
SUITE = "sid"
#: The packages unpacked: herd7 itself, and the C library and GMP it is linked against.
PACKAGES = ("herdtools7", "libc6", "libgmp10")
#: Seconds herd7 may take on one test (each takes milliseconds).
HERD_TIMEOUT = 120.0
#: Seconds each apt-get step may take.
APT_TIMEOUT = 600.0
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
VERDICTS = ("allowed", "forbidden")

LogFn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class LitmusError(RuntimeError):
    """herd7 cannot be had, or a litmus file lacks what the runner needs; one line."""


# --------------------------------------------------------------------------
# Litmus files


@dataclass(frozen=True)
class LitmusTest:
    """One litmus file: its herd7 test name, the verdict expected for its ``exists``
    clause and the question its header comment asks."""

    path: Path
    name: str
    expect: str
    question: str


_HEADER_RE = re.compile(r"\A\s*X86\s+(\S+)")
_EXPECT_RE = re.compile(r"\(\*\s*expect:\s*(\w+)\s*\*\)", re.IGNORECASE)
_QUESTION_RE = re.compile(r"\(\*\s*Question:\s*(.*?)\s*\*\)", re.IGNORECASE | re.DOTALL)
_EXISTS_RE = re.compile(r"^\s*exists\b", re.MULTILINE)


def read_test(path: Path) -> LitmusTest:
    """Read a litmus file's name, expectation and question; :class:`LitmusError` if one is
    missing, the expectation is not ``allowed``/``forbidden``, or there is no ``exists``."""
    text = path.read_text()
    header = _HEADER_RE.match(text)
    if not header:
        raise LitmusError(f"{path}: the first line must be `X86 NAME`")
    expects = _EXPECT_RE.findall(text)
    if len(expects) != 1 or expects[0].lower() not in VERDICTS:
        raise LitmusError(f"{path}: needs exactly one `(* expect: allowed *)` or `(* expect: forbidden *)`")
    question = _QUESTION_RE.search(text)
    if not question:
        raise LitmusError(f"{path}: needs a `(* Question: ... *)` comment")
    if not _EXISTS_RE.search(text):
        raise LitmusError(f"{path}: needs an `exists` clause (the bad outcome)")
    return LitmusTest(path, header.group(1), expects[0].lower(), " ".join(question.group(1).split()))


def find_tests(paths: Iterable[Path]) -> list[LitmusTest]:
    """The tests in ``paths`` (files, or folders whose ``*.litmus`` are taken in name order)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(p.glob("*.litmus"))
        elif p.is_file():
            files.append(p)
        else:
            raise LitmusError(f"{p}: no such file or folder")
    if not files:
        raise LitmusError("no litmus test found in " + ", ".join(str(p) for p in paths))
    tests = [read_test(f) for f in files]
    names = [t.name for t in tests]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LitmusError(f"test names used twice: {', '.join(dup)}")
    return tests


# --------------------------------------------------------------------------
# herd7's output


@dataclass(frozen=True)
class HerdResult:
    """herd7's answer for one test.

    ``states`` are the final states the model reaches (as herd7 prints them, e.g.
    ``0:EAX=0; 1:EAX=1;``); ``positive``/``negative`` count the executions that satisfy
    the condition or not; ``observation`` is ``Never``, ``Sometimes`` or ``Always``.
    """

    name: str
    states: tuple[str, ...]
    ok: bool
    positive: int
    negative: int
    condition: str
    observation: str

    @property
    def verdict(self) -> str:
        """``forbidden`` if no execution reaches the ``exists`` outcome, else ``allowed``."""
        if not self.condition.startswith("exists"):
            raise LitmusError(f"{self.name}: only `exists` conditions are judged, not {self.condition!r}")
        return "forbidden" if self.observation == "Never" else "allowed"


_TEST_RE = re.compile(r"^Test (\S+) (\w+)$")
_STATES_RE = re.compile(r"^States (\d+)$")
_WITNESS_RE = re.compile(r"^Positive: (\d+) Negative: (\d+)$")
_OBSERVATION_RE = re.compile(r"^Observation (\S+) (Never|Sometimes|Always) (\d+) (\d+)$")


def parse_herd_output(text: str) -> list[HerdResult]:
    """Every result block in herd7's standard output, in order.

    A block runs from ``Test NAME KIND`` to ``Observation NAME …``; lines herd7 may add
    inside it (flags, ``Witnesses``, ``Time``, ``Hash=``) are skipped. A block that
    breaks off or contradicts itself raises :class:`LitmusError`.
    """
    results: list[HerdResult] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _TEST_RE.match(lines[i].strip())
        i += 1
        if not m:
            continue
        name = m.group(1)
        states: tuple[str, ...] | None = None
        ok: bool | None = None
        witnesses: tuple[int, int] | None = None
        condition = ""
        while True:
            if i >= len(lines):
                raise LitmusError(f"herd7 output for {name} ends before its Observation line")
            line = lines[i].strip()
            i += 1
            if (sm := _STATES_RE.match(line)) is not None:
                n = int(sm.group(1))
                states = tuple(s.strip() for s in lines[i : i + n])
                if len(states) != n:
                    raise LitmusError(f"herd7 output for {name}: {n} states announced, {len(states)} given")
                i += n
            elif line in ("Ok", "No"):
                ok = line == "Ok"
            elif (wm := _WITNESS_RE.match(line)) is not None:
                witnesses = (int(wm.group(1)), int(wm.group(2)))
            elif line.startswith("Condition "):
                condition = line.removeprefix("Condition ").strip()
            elif (om := _OBSERVATION_RE.match(line)) is not None:
                if om.group(1) != name:
                    raise LitmusError(
                        f"herd7 output: Observation for {om.group(1)} inside the block of {name}"
                    )
                counts = (int(om.group(3)), int(om.group(4)))
                if states is None or ok is None or not condition:
                    raise LitmusError(f"herd7 output for {name} lacks its States, Ok/No or Condition line")
                if witnesses is not None and witnesses != counts:
                    raise LitmusError(
                        f"herd7 output for {name}: witnesses {witnesses} but observation {counts}"
                    )
                results.append(HerdResult(name, states, ok, *counts, condition, om.group(2)))
                break
            elif _TEST_RE.match(line):
                raise LitmusError(f"herd7 output for {name} ends before its Observation line")
    return results


# --------------------------------------------------------------------------
# Judging and the table


@dataclass(frozen=True)
class Row:
    """One line of the table: a test, herd7's result for it (or why there is none)."""

    test: LitmusTest
    result: HerdResult | None
    error: str = ""

    @property
    def verdict(self) -> str:
        """herd7's verdict, or ``error``."""
        return self.result.verdict if self.result is not None else "error"

    @property
    def matches(self) -> bool:
        """herd7 answered and its verdict is the expected one."""
        return self.result is not None and self.verdict == self.test.expect


def judge(test: LitmusTest, results: Sequence[HerdResult], stderr: str = "") -> Row:
    """The row for ``test`` from herd7's results (the one block named like the test);
    without one, an error row that carries herd7's complaint (the last line of ``stderr``)."""
    mine = [r for r in results if r.name == test.name]
    if len(mine) == 1:
        if not mine[0].condition.startswith("exists"):
            return Row(test, None, f"only `exists` conditions are judged, not {mine[0].condition!r}")
        return Row(test, mine[0])
    if mine:
        return Row(test, None, f"herd7 gave {len(mine)} results for {test.name}")
    said = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return Row(test, None, "herd7 gave no result" + (f": {said[-1]}" if said else ""))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_table(rows: Sequence[Row]) -> str:
    """A Markdown table: test, expectation, herd7's verdict, its observation line (the
    executions with and without the outcome), the number of final states, and ``ok`` or
    ``MISMATCH``/``ERROR``."""
    out = [
        "| test | expect | herd7 | observation (with / without the outcome) | states | result |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.result is None:
            out.append(f"| {_cell(r.test.name)} | {r.test.expect} | error | {_cell(r.error)} | - | ERROR |")
            continue
        res = r.result
        obs = f"{res.observation} {res.positive} / {res.negative}"
        result = "ok" if r.matches else "MISMATCH"
        out.append(
            f"| {_cell(r.test.name)} | {r.test.expect} | {r.verdict} | {obs} | {len(res.states)} | {result} |"
        )
    return "\n".join(out)


# --------------------------------------------------------------------------
# herd7


@dataclass(frozen=True)
class Herd7:
    """A way to start herd7: the command that precedes herd7's own options, and where it
    comes from (for the report)."""

    argv: tuple[str, ...]
    origin: str

    def command(self, *args: str) -> list[str]:
        """The full command line for herd7 with ``args``."""
        return [*self.argv, *args]

    def version(self) -> str:
        """``herd7 -version``'s first line; :class:`LitmusError` if herd7 does not start."""
        try:
            res = subprocess.run(
                self.command("-version"), capture_output=True, text=True, timeout=60, check=False
            )
        except OSError as e:
            raise LitmusError(f"{self.origin}: {e}") from e
        if res.returncode != 0 or not res.stdout.strip():
            said = (res.stderr or res.stdout).strip().splitlines()
            raise LitmusError(
                f"{self.origin}: `herd7 -version` exited {res.returncode}" + (f": {said[-1]}" if said else "")
            )
        return res.stdout.strip().splitlines()[0]


def run_test(herd: Herd7, test: LitmusTest, timeout: float = HERD_TIMEOUT) -> Row:
    """Run herd7 under :data:`MODEL` on one test and judge its answer."""
    try:
        res = subprocess.run(
            herd.command("-model", MODEL, str(test.path)),
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return Row(test, None, f"herd7 took more than {timeout:.0f} s")
    if res.returncode != 0:
        said = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if ln.strip()]
        return Row(test, None, f"herd7 exited {res.returncode}" + (f": {said[-1].strip()}" if said else ""))
    try:
        results = parse_herd_output(res.stdout)
    except LitmusError as e:
        return Row(test, None, str(e))
    return judge(test, results, res.stderr)


def private_herd7(cache: Path, suite: str = SUITE) -> Herd7 | None:
    """The herd7 unpacked into ``cache`` by :func:`install_private_herd7`, if it is there."""
    home = cache / "herdtools7" / suite
    binary, lib, herdlib = home / "herd7", home / "lib", home / "herd"
    loaders = sorted(lib.glob("ld-linux*.so*")) if lib.is_dir() else []
    if not (binary.is_file() and herdlib.is_dir() and loaders):
        return None
    versions = (home / "versions").read_text().split() if (home / "versions").is_file() else []
    argv = (str(loaders[0]), "--library-path", str(lib), str(binary), "-set-libdir", str(herdlib))
    return Herd7(argv, f"Debian {suite}'s {' '.join(versions) or 'herdtools7'}, unpacked in {home}")


_MIRROR_RE = re.compile(r"(https?://\S+/debian)/?(?:\s|$)")


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """``$MIRROR``, else the first ``…/debian`` URI in the host's apt sources, else
    deb.debian.org (as scripts/debian-base-image.sh chooses)."""
    env = os.environ.get("MIRROR")
    if env:
        return env.rstrip("/")
    sources = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]
    for f in sources:
        if f.is_file() and f.suffix in ("", ".list", ".sources"):
            for line in f.read_text(errors="replace").splitlines():
                m = _MIRROR_RE.search(line)
                if m and not line.lstrip().startswith("#"):
                    return m.group(1)
    return "http://deb.debian.org/debian"


def _run_step(argv: Sequence[str], what: str, cwd: Path, timeout: float = APT_TIMEOUT) -> str:
    """Run one step of the unpacking; its stdout, or :class:`LitmusError` with its complaint."""
    try:
        res = subprocess.run(
            list(argv), capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise LitmusError(f"{what}: no answer in {timeout:.0f} s") from e
    if res.returncode != 0:
        lines = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("E: ")] or lines
        raise LitmusError(f"{what} failed (exit {res.returncode})" + (f": {errors[-1]}" if errors else ""))
    return res.stdout


def install_private_herd7(cache: Path, suite: str = SUITE, log: LogFn = _stderr) -> Herd7:
    """Download ``suite``'s herdtools7, libc6 and libgmp10 with a private apt
    configuration, unpack herd7, its model library and the C libraries into
    ``cache/herdtools7/SUITE`` and check that it starts (once; later calls return it)."""
    base = cache / "herdtools7"
    home = base / suite
    with locked(base / f"{suite}.lock"):
        found = private_herd7(cache, suite)
        if found is not None:
            try:
                found.version()
                return found
            except LitmusError as e:
                log(f"litmus: unpacking again: {e}")
        shutil.rmtree(home, ignore_errors=True)
        missing = [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
        if missing:
            raise LitmusError(
                f"cannot unpack Debian {suite}'s herdtools7: no {' or '.join(missing)} on this host"
            )
        if not KEYRING.is_file():
            raise LitmusError(
                f"cannot fetch Debian {suite}'s herdtools7: no {KEYRING} (debian-archive-keyring)"
            )
        mirror = debian_mirror()
        log(f"litmus: fetching Debian {suite}'s {', '.join(PACKAGES)} from {mirror} into {home}")
        work = Path(tempfile.mkdtemp(prefix=f".{suite}-", dir=base))
        try:
            _unpack(work, home, suite, mirror)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        herd = private_herd7(cache, suite)
        if herd is None:
            shutil.rmtree(home, ignore_errors=True)
            raise LitmusError(f"{home}: no dynamic loader (ld-linux*.so*) among Debian {suite}'s libc6 files")
        try:
            herd.version()
        except LitmusError:
            shutil.rmtree(home, ignore_errors=True)
            raise
        log(f"litmus: {herd.origin}")
        return herd


def _unpack(work: Path, home: Path, suite: str, mirror: str) -> None:
    """Fetch and unpack the packages in ``work``; the result is renamed to ``home``."""
    for d in ("lists/partial", "cache/archives/partial", "parts", "debs", "root", "out"):
        (work / d).mkdir(parents=True)
    (work / "sources.list").write_text(f"deb [signed-by={KEYRING}] {mirror} {suite} main\n")
    apt = [
        "apt-get", "-q",
        f"-oDir::Etc::SourceList={work / 'sources.list'}", f"-oDir::Etc::SourceParts={work / 'parts'}",
        f"-oDir::Etc::Preferences={work / 'preferences'}", f"-oDir::Etc::PreferencesParts={work / 'parts'}",
        f"-oDir::State::Lists={work / 'lists'}", f"-oDir::Cache={work / 'cache'}",
    ]  # fmt: skip
    _run_step([*apt, "update"], f"apt-get update ({suite})", work)
    _run_step(
        [*apt, "download", *PACKAGES], f"apt-get download {' '.join(PACKAGES)} ({suite})", work / "debs"
    )
    versions = []
    for deb in sorted((work / "debs").glob("*.deb")):
        _run_step(["dpkg-deb", "-x", str(deb), str(work / "root")], f"dpkg-deb -x {deb.name}", work)
        fields = _run_step(
            ["dpkg-deb", "-f", str(deb), "Package", "Version"], f"dpkg-deb -f {deb.name}", work
        )
        versions.append("=".join(v.split(": ", 1)[1] for v in fields.strip().splitlines()))
    root, out = work / "root", work / "out"
    binary = root / "usr" / "bin" / "herd7"
    herdlib = root / "usr" / "share" / "herdtools7" / "herd"
    libcs = sorted(p for p in root.rglob("libc.so.6") if not p.is_symlink())
    if not binary.is_file() or not herdlib.is_dir() or not libcs:
        raise LitmusError(f"Debian {suite}'s packages lack usr/bin/herd7, its model library or libc.so.6")
    shutil.move(str(binary), out / "herd7")
    shutil.move(str(herdlib), out / "herd")
    shutil.move(str(libcs[0].parent), out / "lib")
    for gmp in root.rglob("libgmp.so.10*"):  # beside libc.so.6 on sid; elsewhere, copied there
        if not (out / "lib" / gmp.name).exists():
            shutil.copy2(gmp, out / "lib" / gmp.name, follow_symlinks=False)
    (out / "versions").write_text(" ".join(versions) + "\n")
    shutil.rmtree(root)
    os.rename(out, home)


def find_herd7(
    cache: Path, explicit: str | None = None, *, install: bool = True, log: LogFn = _stderr
) -> Herd7:
    """The herd7 to use: ``explicit``, else ``herd7`` on PATH, else the private copy in
    ``cache`` (unpacked now unless ``install`` is false). :class:`LitmusError` says why
    each way failed when none works."""
    if explicit:
        herd = Herd7((explicit,), explicit)
        herd.version()
        return herd
    tried = []
    on_path = shutil.which("herd7")
    if on_path:
        herd = Herd7((on_path,), on_path)
        try:
            herd.version()
            return herd
        except LitmusError as e:
            tried.append(str(e))
    else:
        tried.append("no herd7 on PATH")
    private = private_herd7(cache)
    if private is not None:
        try:
            private.version()
            return private
        except LitmusError as e:
            tried.append(str(e))
    if not install:
        tried.append(f"none unpacked in {cache / 'herdtools7' / SUITE} (and --no-install)")
        raise LitmusError("; ".join(tried))
    try:
        return install_private_herd7(cache, log=log)
    except LitmusError as e:
        tried.append(str(e))
        raise LitmusError("; ".join(tried)) from e


# --------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rig.tools.litmus``: 0 if every verdict is the expected one, 1 if one
    is not or herd7 gave no result for a test, 2 if herd7 or a test cannot be read."""
    p = argparse.ArgumentParser(
        prog="python -m rig.tools.litmus", description=(__doc__ or "").splitlines()[0]
    )
    p.add_argument("paths", nargs="*", type=Path, help=f"litmus files or folders (default: {LITMUS_DIR})")
    p.add_argument("--herd7", help="the herd7 executable to run (default: herd7 on PATH, else Debian sid's)")
    p.add_argument(
        "--cache", type=Path, help="where sid's herd7 is unpacked (default: $CR3RIG_CACHE, ~/.cache/cr3rig)"
    )
    p.add_argument("--no-install", action="store_true", help="do not download sid's herdtools7")
    args = p.parse_args(argv)
    cache = (args.cache or default_cache_dir()).expanduser().resolve()
    try:
        tests = find_tests(args.paths or [LITMUS_DIR])
        herd = find_herd7(cache, args.herd7, install=not args.no_install)
        version = herd.version()
    except LitmusError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    print(f"herd7 {version} ({herd.origin}), model {MODEL}\n")
    rows = [run_test(herd, t) for t in tests]
    print(render_table(rows))
    bad = [r for r in rows if not r.matches]
    print(f"\nlitmus: {len(rows)} test(s), {len(rows) - len(bad)} as expected, {len(bad)} not")
    for r in bad:
        why = r.error or f"herd7 says {r.verdict}, the test expects {r.test.expect}"
        print(f"  {r.test.path}: {why}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
