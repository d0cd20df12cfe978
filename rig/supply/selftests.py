"""Linux's own x86 selftests (``tools/testing/selftests/x86``), built from the kernel tree.

The sources come from the reference kernel's work tree in the cache
(``<cache>/kernels/trees/<flavor>/src``, see :mod:`rig.supply.kerneltree`): they are read
from its *pristine* commit with ``git archive`` (the package's own tarball, whatever
patch series or mutant is checked out at the moment), never copied into this repository.

What to build is read from the selftests' own ``Makefile``: its target lists
(``TARGETS_C_BOTHBITS``, ``…_32BIT_ONLY``, ``…_64BIT_ONLY``, ``…_32BIT_NEEDED``), its
``extra-files`` rules and its per-target ``CFLAGS``. Each binary is compiled with the
Makefile's flags plus ``-static -s`` (the guest has no libc); the kernel's exported
headers (``KHDR_INCLUDES``, made by ``make headers``) are replaced by the host's
``linux-libc-dev``. A target that does not compile is recorded with the compiler's
error, not dropped.

Builds are cached by content under ``<cache>/selftests/<key>/`` (``manifest.json`` and
the binaries); the key covers the sources' git blob ids, the flags, the gcc version and
both static C libraries.

Command line::

    python -m rig.supply.selftests [--cache-dir D]    # build, print the table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rig.errors import ConfigError, RigError
from rig.supply.cache import default_cache_dir

__all__ = [
    "DEFAULT_FLAVOR",
    "DEFAULT_SELFTESTS",
    "NOT_RUN",
    "SELFTEST_DIR",
    "WATCH_SECONDS",
    "SelftestBuild",
    "SelftestError",
    "SelftestSourceMissing",
    "Target",
    "build_selftests",
    "makefile_targets",
    "pristine_source",
]

#: Where the selftests live in a kernel tree.
SELFTEST_DIR = "tools/testing/selftests/x86"
#: The flavor whose tree supplies the sources (the default kernel's).
DEFAULT_FLAVOR = "reference-7.2"
#: The selftests put into the default initramfs and run by the default
#: ``pytest testcases/``: one (each takes 6-60 s under watch mode here, and adds ~0.3 MB
#: gzipped to the initramfs, i.e. to the boot of every guest). syscall_arg_fault_32 is
#: among the cheapest (12 s at load 6) and reaches 8 of the 26 sites, the paranoid
#: entry/exit of a #DB on the SYSENTER entry among them. The others go into the full
#: initramfs (``python -m rig.supply.initramfs --selftests all``).
DEFAULT_SELFTESTS: tuple[str, ...] = ("syscall_arg_fault_32",)
#: Binaries that are built but not run, and why (the README's table quotes these).
NOT_RUN: dict[str, str] = {
    "amx_64": "AMX state and XFD permissions (xstate code, not entry)",
    "apx_64": "APX extended registers (xstate code, not entry)",
    "avx_64": "AVX-512 state in signal frames (xstate code, not entry)",
    "lam_64": "Linear Address Masking (mm code, not entry)",
    "test_shadow_stack_64": "CET user shadow stacks: CONFIG_X86_USER_SHADOW_STACK is off in the reference",
    "corrupt_xstate_header_64": "XSAVE header of a signal frame (FPU code, not entry)",
    "test_FCMOV_32": "x87 FCMOV emulation, not entry code",
    "test_FCOMI_32": "x87 FCOMI emulation, not entry code",
    "test_FISTTP_32": "x87 FISTTP emulation, not entry code",
    "syscall_numbering_64": "every syscall number, also under ptrace: 32 s unwatched on the stock kernel; "
    "on the reference killed after 60 s unwatched (269 [OK] lines of 701)",
    "nx_stack_32": "a fault on every page of its stack: 15,412 CR3 transitions checked in the 120 s "
    "a selftest may run under watch mode, unfinished (0.3 s unwatched)",
    "nx_stack_64": "a fault on every page of its stack: 10,320 CR3 transitions checked in the 120 s "
    "a selftest may run under watch mode, unfinished (0.3 s unwatched)",
    "test_syscall_vdso_32": "QEMU 7.2 TCG: the LRETQ of its 64-bit thunk (CS 0x33) reads the user stack as a "
    "supervisor access; with SMAP that is a #PF without the user bit, the kernel oopses and "
    "kills it (exit 137), on the stock kernel too",
    "sysret_ss_attrs_64": "1000 short sleeps against a busy thread on its CPU: killed after 60 s "
    "unwatched on both kernels under TCG (its 32-bit build takes 0.2 s)",
}

#: Seconds a selftest may run under watch mode when it needs more than the default 120
#: (``testcases/test_x86_selftests.py``), and why. Measured on reference-7.2 with
#: MODIFY_LDT_SYSCALL, QEMU 7.2, an idle machine: the budget is ~2.3x the slower one.
WATCH_SECONDS: dict[str, float] = {
    "ldt_gdt_32": 600.0,  # 36,700 CR3 transitions checked in 257 s under watch (2.4 s unwatched)
    "ldt_gdt_64": 600.0,  # 30,376 CR3 transitions checked in 176 s under watch (2.3 s unwatched)
}

#: Bumped when the meaning of a cache entry changes.
_FORMAT_VERSION = "cr3rig-selftests-1"
#: Compile and link flags of the Makefile (CFLAGS; -g dropped, the binary is stripped).
_MAKE_CFLAGS: tuple[str, ...] = ("-O2", "-std=gnu99", "-pthread", "-Wall", "-no-pie")
_DEFINES: tuple[str, ...] = ("-DCAN_BUILD_32", "-DCAN_BUILD_64")
#: What the guest needs: no dynamic loader, no symbols.
_STATIC: tuple[str, ...] = ("-static", "-s")
_TARGET_LISTS = (
    "TARGETS_C_BOTHBITS",
    "TARGETS_C_32BIT_ONLY",
    "TARGETS_C_64BIT_ONLY",
    "TARGETS_C_32BIT_NEEDED",
)
_COMPILE_TIMEOUT = 300.0


class SelftestError(RigError):
    """Building the selftests failed as a whole (one target failing is recorded instead)."""


class SelftestSourceMissing(SelftestError, ConfigError):
    """No kernel tree holds the selftest sources."""


@dataclass(frozen=True)
class Target:
    """One selftest binary of the Makefile: ``<test>_<bits>`` from ``<test>.c``."""

    test: str
    bits: int
    #: Further sources on its command line (``extra-files``, ``EXTRA_FILES +=``).
    extra_files: tuple[str, ...] = ()
    #: Further flags (``$(OUTPUT)/<name>: CFLAGS += …``).
    extra_flags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.test}_{self.bits}"


def _make_words(makefile: str, variable: str) -> list[str]:
    """The words assigned to ``variable`` by ``:=`` and ``+=`` lines (with ``\\`` joins)."""
    text = makefile.replace("\\\n", " ")
    words: list[str] = []
    for m in re.finditer(rf"^{variable}\s*(:=|\+=)(.*)$", text, re.MULTILINE):
        if m.group(1) == ":=":
            words = []
        words += m.group(2).split()
    return words


def makefile_targets(makefile: str) -> list[Target]:
    """Every binary the selftests' Makefile builds on x86-64 with a working ``-m32``.

    Binaries are ``<test>_32`` for the both-bits, 32-bit-only and 32-bit-needed lists and
    ``<test>_64`` for the both-bits, 64-bit-only and 32-bit-needed lists, in that order.
    """
    lists = {v: _make_words(makefile, v) for v in _TARGET_LISTS}
    if not lists["TARGETS_C_BOTHBITS"]:
        raise SelftestError("the selftests' Makefile has no TARGETS_C_BOTHBITS (not the x86 selftests?)")
    extra: dict[str, list[str]] = {}
    for m in re.finditer(r"\$\(call extra-files,([\w]+),([^)]*)\)", makefile):
        extra.setdefault(m.group(1), []).extend(m.group(2).split())
    for m in re.finditer(r"^\$\(OUTPUT\)/(\w+): EXTRA_FILES \+=(.*)$", makefile, re.MULTILINE):
        extra.setdefault(m.group(1), []).extend(m.group(2).split())
    flags: dict[str, list[str]] = {}
    for m in re.finditer(r"^\$\(OUTPUT\)/(\w+): CFLAGS \+=(.*)$", makefile, re.MULTILINE):
        flags.setdefault(m.group(1), []).extend(m.group(2).split())
    names32 = lists["TARGETS_C_BOTHBITS"] + lists["TARGETS_C_32BIT_ONLY"] + lists["TARGETS_C_32BIT_NEEDED"]
    names64 = lists["TARGETS_C_BOTHBITS"] + lists["TARGETS_C_64BIT_ONLY"] + lists["TARGETS_C_32BIT_NEEDED"]
    out: list[Target] = []
    for bits, names in ((32, names32), (64, names64)):
        for test in dict.fromkeys(names):
            n = f"{test}_{bits}"
            # -static is ours for every binary already
            out.append(
                Target(
                    test, bits, tuple(extra.get(n, ())), tuple(f for f in flags.get(n, ()) if f != "-static")
                )
            )
    return out


# --------------------------------------------------------------------------
# Sources


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False, timeout=120
    )
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SelftestError(f"git {args[0]} in {repo} failed: {detail}")
    return proc.stdout


def _version_key(version: str) -> list[tuple[int, str]]:
    """A sort key for Debian versions good enough to pick the newest of a few."""
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.+~-]", version)]


@dataclass(frozen=True)
class SelftestSource:
    """The pristine commit of a kernel tree and the blobs the selftests need."""

    repo: Path
    commit: str
    #: Debian version of the source package (``7.2.13-1``).
    version: str
    #: path in the tree -> git blob id (the content hash of each source file)
    blobs: dict[str, str]


def pristine_source(cache_dir: Path | None = None, flavor: str = DEFAULT_FLAVOR) -> SelftestSource:
    """Find the selftest sources in the pristine commit of ``flavor``'s kernel tree.

    Raises :class:`SelftestSourceMissing` (with the command that makes the tree) when
    the tree is not there.
    """
    cache = default_cache_dir() if cache_dir is None else Path(cache_dir)
    tree = cache / "kernels" / "trees" / flavor
    repo = tree / "src"
    fix = f"build the kernel once: python -m rig.supply.kernelbuild {flavor}"
    try:
        state = json.loads((tree / "state.json").read_text())
        pristine: dict[str, str] = dict(state["pristine"])
    except (OSError, ValueError, KeyError, TypeError):
        raise SelftestSourceMissing(f"no kernel tree of {flavor} in {tree} (no state.json); {fix}") from None
    if not pristine or not (repo / ".git").is_dir():
        raise SelftestSourceMissing(f"no kernel tree of {flavor} in {tree}; {fix}")
    version = max(pristine, key=_version_key)
    commit = pristine[version]
    listing = _git(
        repo, "ls-tree", "-r", commit, "--", SELFTEST_DIR + "/", "tools/testing/selftests/kselftest.h"
    )
    blobs: dict[str, str] = {}
    for line in listing.splitlines():
        meta, path = line.split("\t", 1)
        blobs[path] = meta.split()[2]
    if f"{SELFTEST_DIR}/Makefile" not in blobs:
        raise SelftestSourceMissing(f"{repo} ({version}) has no {SELFTEST_DIR}/Makefile")
    # files outside the directory that the sources include by relative path
    # (sigreturn.c: "../../../../arch/x86/include/asm/desc_defs.h")
    for path in [p for p in blobs if p.endswith((".c", ".h", ".S"))]:
        text = _git(repo, "cat-file", "blob", blobs[path])
        for inc in re.findall(r'^#include "((?:\.\./)+[^"]+)"', text, re.MULTILINE):
            target = os.path.normpath(os.path.join(os.path.dirname(path), inc))
            if target not in blobs:
                found = _git(repo, "ls-tree", commit, "--", target).split()
                if len(found) >= 3:
                    blobs[target] = found[2]
    return SelftestSource(repo, commit, version, blobs)


# --------------------------------------------------------------------------
# Build


@dataclass(frozen=True)
class SelftestBuild:
    """A cached build: ``binaries`` (name -> path) and ``failed`` (name -> compiler error)."""

    directory: Path
    key: str
    source_version: str
    targets: tuple[Target, ...]
    binaries: dict[str, Path]
    failed: dict[str, str]

    def table(self) -> str:
        """One line per Makefile target: built (and whether the testcase runs it) or why not."""
        lines = [f"x86 selftests of linux-source {self.source_version} ({len(self.binaries)} built):"]
        for t in self.targets:
            if t.name in self.failed:
                status = f"not built: {self.failed[t.name]}"
            elif t.name in NOT_RUN:
                status = f"built, not run: {NOT_RUN[t.name]}"
            else:
                status = "built" + (" (default run)" if t.name in DEFAULT_SELFTESTS else "")
            lines.append(f"  {t.name:<28} {status}")
        return "\n".join(lines)


def _tool_identity(cc: str) -> str:
    """gcc's version and the content hash of both static libcs (a cache key part)."""
    h = hashlib.sha256()
    for argv in ([cc, "--version"], [cc, "-print-file-name=libc.a"], [cc, "-m32", "-print-file-name=libc.a"]):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60).stdout.strip()
        except OSError as exc:
            raise SelftestError(f"cannot run {cc}: {exc}; apt-get install gcc libc6-dev") from None
        h.update(out.encode() + b"\0")
        lib = Path(out)
        if lib.is_absolute() and lib.is_file():
            h.update(hashlib.sha256(lib.read_bytes()).digest())
    return h.hexdigest()


def _cache_key(source: SelftestSource, cc: str) -> str:
    h = hashlib.sha256()
    h.update(f"{_FORMAT_VERSION}\0{_MAKE_CFLAGS}\0{_DEFINES}\0{_STATIC}\0".encode())
    for path, blob in sorted(source.blobs.items()):
        h.update(f"{path}\0{blob}\0".encode())
    h.update(_tool_identity(cc).encode())
    return h.hexdigest()


def _first_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    first = next((ln for ln in lines if "error" in ln), lines[0] if lines else "no output")
    # keep it short and free of our temporary paths
    return re.sub(r"^\S*/(?=[^/\s]+:)", "", first)[:200]


def _compile(cc: str, workdir: Path, target: Target, out: Path) -> str | None:
    """Compile one target into ``out``; None, or the first line of the compiler error."""
    argv = [
        cc, f"-m{target.bits}", "-o", str(out), *_MAKE_CFLAGS, "-I", "..", *_DEFINES, *target.extra_flags,
        *_STATIC, f"{target.test}.c", *target.extra_files,
        "-lrt", "-ldl", *(["-lm"] if target.bits == 32 else []),
    ]  # fmt: skip
    proc = subprocess.run(
        argv, cwd=workdir, capture_output=True, text=True, check=False, timeout=_COMPILE_TIMEOUT
    )
    if proc.returncode != 0:
        return _first_error(proc.stderr)
    return None


def build_selftests(
    cache_dir: Path | None = None, *, flavor: str = DEFAULT_FLAVOR, cc: str = "gcc"
) -> SelftestBuild:
    """Build (or reuse) every selftest binary of the Makefile; see the module doc.

    A second call with the same sources and toolchain returns the cached build at once.
    """
    cache = default_cache_dir() if cache_dir is None else Path(cache_dir)
    cc_path = shutil.which(cc)
    if cc_path is None:
        raise SelftestError(f"C compiler {cc!r} not found; apt-get install gcc libc6-dev")
    source = pristine_source(cache, flavor)
    key = _cache_key(source, cc_path)
    final = cache / "selftests" / key
    if (final / "manifest.json").is_file():
        return _load(final, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=final.parent) as tmp:
        src = Path(tmp, "src")
        src.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(source.repo), "archive", source.commit, *sorted(source.blobs)],
            capture_output=True, check=False, timeout=120,
        )  # fmt: skip
        if archive.returncode != 0:
            raise SelftestError(f"git archive of {source.repo} failed: {archive.stderr.decode()[-200:]}")
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True, timeout=120)
        workdir = src / SELFTEST_DIR
        targets = makefile_targets((workdir / "Makefile").read_text())
        out = Path(tmp, "out")
        out.mkdir()
        failed: dict[str, str] = {}
        for t in targets:
            err = _compile(cc_path, workdir, t, out / t.name)
            if err is not None:
                failed[t.name] = err
        manifest = {
            "source_version": source.version,
            "commit": source.commit,
            "targets": [[t.test, t.bits, list(t.extra_files), list(t.extra_flags)] for t in targets],
            "failed": failed,
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            out.rename(final)
        except OSError:
            if not (final / "manifest.json").is_file():  # not someone else's finished build
                raise
    return _load(final, key)


def _load(directory: Path, key: str) -> SelftestBuild:
    m = json.loads((directory / "manifest.json").read_text())
    targets = tuple(Target(t, int(b), tuple(e), tuple(f)) for t, b, e, f in m["targets"])
    failed = {str(k): str(v) for k, v in m["failed"].items()}
    binaries = {t.name: directory / t.name for t in targets if t.name not in failed}
    return SelftestBuild(directory, key, str(m["source_version"]), targets, binaries, failed)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the selftests into the cache and print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m rig.supply.selftests", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="cache root (default $CR3RIG_CACHE or ~/.cache/cr3rig)"
    )
    args = parser.parse_args(argv)
    try:
        build = build_selftests(args.cache_dir)
    except RigError as exc:
        print(f"selftests: {exc}", file=sys.stderr)
        return 1
    print(build.table())
    print(f"cached in {build.directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
