"""Build the guest userspace: a gzip-compressed newc cpio initramfs.

The archive holds a busybox ``/init`` script (``guests/initramfs/init``), a
static busybox with its applet symlinks under ``/bin``, and small static C
workloads (``guests/initramfs/workloads/*.c``) that pin themselves to a CPU and
exercise one kernel entry/exit path forever (``sb-litmus`` instead runs the
store-buffering shape a given number of times on two CPUs and exits:
rig.tools.tcgorder).

The archive is written in pure Python (no root, no ``mknod``, no ``cpio``
binary), with uid/gid 0 and mtime 0, so device nodes and modes are exact and
the output is reproducible.  Builds are cached by content hash under
``<cache>/initramfs/<key>.cpio.gz``.

The markers the guest prints (:mod:`rig.protocol`) are shared with the guest sources
and the console driver.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rig.errors import ConfigError, RigError
from rig.protocol import SELFTESTS_DIR
from rig.supply.cache import default_cache_dir
from rig.supply.selftests import (
    DEFAULT_FLAVOR,
    DEFAULT_SELFTESTS,
    NOT_RUN,
    SelftestSourceMissing,
    build_selftests,
)

__all__ = [
    "BUSYBOX_PATH",
    "CFLAGS",
    "COMPAT_CFLAGS",
    "COMPAT_WORKLOADS",
    "SELFTEST_CHOICES",
    "SOURCE_DIR",
    "WORKLOADS",
    "BusyboxMissingError",
    "CompilerMissingError",
    "InitramfsError",
    "WorkloadCompileError",
    "build_initramfs",
    "default_cache_dir",
    "initramfs_cache_key",
    "selftest_choice",
]

#: Workload binaries installed as ``/bin/<name>`` (from ``workloads/<name>.c``).
WORKLOADS: tuple[str, ...] = (
    "syscall-loop",
    "fault-loop",
    "read-fault-loop",
    "iret-loop",
    "user-spin",
    "timer-spin",
    "poke",
    "bad-iret-loop",
    "compat-sysenter-loop",
    "compat-sysenter-tf-loop",
    "compat-syscall-loop",
    "compat-int80-loop",
    "sb-litmus",
)
#: The workloads of :data:`WORKLOADS` that are 32-bit (i386) programs, built
#: freestanding with :data:`COMPAT_CFLAGS` (no 32-bit libc needed).
COMPAT_WORKLOADS: tuple[str, ...] = (
    "compat-sysenter-loop",
    "compat-sysenter-tf-loop",
    "compat-syscall-loop",
    "compat-int80-loop",
)

#: ``selftests=`` choices of :func:`build_initramfs`: the default subset
#: (:data:`rig.supply.selftests.DEFAULT_SELFTESTS`), every one that runs here, or none.
SELFTEST_CHOICES = ("default", "all", "none")


def selftest_choice(spec: str) -> str:
    """The initramfs (:data:`SELFTEST_CHOICES`) that holds the selftests ``--selftests``
    names: ``default`` for the default subset (or names all in it), else ``all``."""
    spec = spec.strip()
    if spec in ("", "default"):
        return "default"
    if spec == "all":
        return "all"
    names = [n.strip() for n in spec.split(",") if n.strip()]
    return "default" if all(n in DEFAULT_SELFTESTS for n in names) else "all"


#: Guest sources: ``init`` and ``workloads/*.c`` / ``*.h``.
SOURCE_DIR = Path(__file__).resolve().parents[2] / "guests" / "initramfs"
#: Debian's busybox-static installs its binary here.
BUSYBOX_PATH = Path("/bin/busybox")
#: Flags for every workload.
CFLAGS: tuple[str, ...] = ("-static", "-O2", "-Wall", "-Werror")
#: Flags for the 32-bit workloads: the host's x86-64 gcc emits i386 code and
#: links with ``ld -m elf_i386``; no libc, no libgcc, no PIE (gcc-multilib is
#: not needed).
COMPAT_CFLAGS: tuple[str, ...] = (
    "-m32",
    "-static",
    "-nostdlib",
    "-ffreestanding",
    "-fno-pie",
    "-no-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-O2",
    "-Wall",
    "-Werror",
)

# Bump when the archive layout produced by this module changes, so old cache
# entries are not reused.
_FORMAT_VERSION = "cr3rig-initramfs-1"
_STALE_TMP_SECONDS = 3600.0
_EHDR64_SIZE = 64
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_PT_INTERP = 3


class InitramfsError(RigError):
    """Building the initramfs failed (a RuntimeError, via RigError)."""


class BusyboxMissingError(InitramfsError, ConfigError):
    """No usable static busybox on the host."""


class CompilerMissingError(InitramfsError, ConfigError):
    """gcc or the static C library is missing on the host."""


class WorkloadCompileError(InitramfsError):
    """A workload failed to compile; ``stderr`` holds the compiler output."""

    def __init__(self, message: str, stderr: str = "") -> None:
        """Store the one-line ``message`` and the full compiler ``stderr``."""
        super().__init__(message)
        self.stderr = stderr


# --------------------------------------------------------------------------
# Host tool checks


def _is_static_elf(path: Path) -> bool:
    """Return True if ``path`` is an x86-64 ELF without a PT_INTERP header."""
    with path.open("rb") as f:
        ehdr = f.read(64)
        elf64_lsb = (b"\x7fELF", _ELFCLASS64, _ELFDATA2LSB)
        if len(ehdr) < _EHDR64_SIZE or (ehdr[:4], ehdr[4], ehdr[5]) != elf64_lsb:
            return False
        (e_phoff,) = struct.unpack_from("<Q", ehdr, 0x20)
        e_phentsize, e_phnum = struct.unpack_from("<HH", ehdr, 0x36)
        f.seek(e_phoff)
        phdrs = f.read(e_phentsize * e_phnum)
    for i in range(e_phnum):
        (p_type,) = struct.unpack_from("<I", phdrs, i * e_phentsize)
        if p_type == _PT_INTERP:
            return False
    return True


def _check_busybox(busybox: Path) -> None:
    """Raise BusyboxMissingError unless ``busybox`` is a static executable."""
    hint = "apt-get install busybox-static"
    if not busybox.is_file():
        raise BusyboxMissingError(f"static busybox not found at {busybox}; {hint}")
    if not _is_static_elf(busybox):
        raise BusyboxMissingError(
            f"{busybox} is not a statically linked x86-64 busybox (the dynamic 'busybox' package?); {hint}"
        )


def _find_cc(cc: str) -> str:
    """Return the full path of the compiler, or raise CompilerMissingError."""
    found = shutil.which(cc)
    if found is None:
        raise CompilerMissingError(f"C compiler {cc!r} not found; apt-get install gcc libc6-dev")
    return found


def _run(argv: Sequence[str], what: str) -> str:
    """Run a host tool and return its stdout, raising InitramfsError on failure."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=120)
    except OSError as exc:
        raise InitramfsError(f"cannot run {what} ({argv[0]}): {exc}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise InitramfsError(f"{what} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


def _gcc_identity(cc_path: str) -> tuple[str, Path]:
    """Return (``gcc --version`` text, path of the static libc.a)."""
    version = _run([cc_path, "--version"], "gcc --version")
    libc = _run([cc_path, "-print-file-name=libc.a"], "gcc -print-file-name").strip()
    libc_path = Path(libc)
    if not libc_path.is_absolute() or not libc_path.is_file():
        raise CompilerMissingError("static C library (libc.a) not found; apt-get install gcc libc6-dev")
    return version, libc_path


# --------------------------------------------------------------------------
# Cache key


def _source_files(source_dir: Path) -> list[Path]:
    """All regular files under ``source_dir`` (sorted, editor junk skipped)."""
    if not (source_dir / "init").is_file():
        raise InitramfsError(f"guest sources not found: {source_dir / 'init'} missing")
    files = []
    for p in sorted(source_dir.rglob("*")):
        rel = p.relative_to(source_dir)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if p.name.endswith("~") or "__pycache__" in rel.parts:
            continue
        files.append(p)
    return files


def _hash_file(h: hashlib._Hash, label: str, path: Path) -> None:
    """Feed ``label`` and the file's length-prefixed content into ``h``."""
    data = path.read_bytes()
    h.update(f"{label}\0{len(data)}\0".encode())
    h.update(data)


def _cache_key(source_dir: Path, busybox: Path, gcc_version: str, libc: Path, selftests: str = "") -> str:
    h = hashlib.sha256()
    if selftests:  # keeps the key of an archive without selftests as it was
        h.update(f"selftests\0{selftests}\0".encode())
    h.update(f"{_FORMAT_VERSION}\0{' '.join(CFLAGS)}\0{' '.join(COMPAT_CFLAGS)}\0".encode())
    h.update(f"workloads\0{' '.join(WORKLOADS)}\0".encode())
    for f in _source_files(source_dir):
        _hash_file(h, "src:" + f.relative_to(source_dir).as_posix(), f)
    _hash_file(h, "busybox", busybox)
    h.update(f"gcc\0{gcc_version}\0".encode())
    _hash_file(h, "libc.a", libc)
    return h.hexdigest()


def initramfs_cache_key(
    *,
    source_dir: Path | None = None,
    busybox: Path | None = None,
    cc: str = "gcc",
    cache_dir: Path | None = None,
    selftests: str = "default",
) -> str:
    """Return the sha256 cache key of the initramfs for the current inputs.

    The key covers the guest sources, the busybox binary, the gcc version, the
    static libc, the selftests chosen (their build's key) and this module's archive
    format version.
    """
    source_dir = SOURCE_DIR if source_dir is None else source_dir
    busybox = BUSYBOX_PATH if busybox is None else busybox
    _check_busybox(busybox)
    gcc_version, libc = _gcc_identity(_find_cc(cc))
    selftest_key, _ = _selftest_files(default_cache_dir() if cache_dir is None else cache_dir, selftests)
    return _cache_key(source_dir, busybox, gcc_version, libc, selftest_key)


# --------------------------------------------------------------------------
# newc cpio writer


@dataclass(frozen=True)
class _Entry:
    """One archive member; ``name`` has no leading slash."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _newc_member(ino: int, mode: int, nlink: int, name: str, data: bytes, rdev: tuple[int, int]) -> bytes:
    """Return one newc header + name + data, each padded to 4 bytes."""
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(encoded), 0)
    chunk = b"070701" + b"".join(b"%08X" % v for v in fields) + encoded
    return chunk + _pad4(len(chunk)) + data + _pad4(len(data))


def _write_newc(out: BinaryIO, entries: Iterable[_Entry]) -> None:
    """Write ``entries`` and the trailer as a newc ("070701") cpio archive.

    Every member is owned by uid/gid 0 with mtime 0; inode numbers count up
    from 1 in archive order.
    """
    size = 0
    for ino, e in enumerate(entries, start=1):
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        size += out.write(_newc_member(ino, e.mode, nlink, e.name, e.data, e.rdev))
    size += out.write(_newc_member(0, 0, 1, "TRAILER!!!", b"", (0, 0)))
    # Pad the archive to a 512-byte block like GNU cpio does.
    out.write(b"\0" * (-size % 512))


def _dir(name: str, perm: int = 0o755) -> _Entry:
    return _Entry(name, stat.S_IFDIR | perm)


def _file(name: str, data: bytes, perm: int = 0o755) -> _Entry:
    return _Entry(name, stat.S_IFREG | perm, data)


def _symlink(name: str, target: str) -> _Entry:
    return _Entry(name, stat.S_IFLNK | 0o777, target.encode())


def _chardev(name: str, major: int, minor: int, perm: int) -> _Entry:
    return _Entry(name, stat.S_IFCHR | perm, rdev=(major, minor))


# --------------------------------------------------------------------------
# Build steps


def _busybox_applets(busybox: Path) -> list[str]:
    """Return the applet names of ``busybox`` (from ``busybox --list``)."""
    out = _run([str(busybox), "--list"], f"{busybox} --list")
    names = sorted({n.strip() for n in out.splitlines() if n.strip()})
    bad = [n for n in names if "/" in n or n in (".", "..")]
    if bad or not names:
        raise BusyboxMissingError(f"{busybox} --list gave unexpected output; apt-get install busybox-static")
    return [n for n in names if n != "busybox"]


def _compile_workloads(cc_path: str, source_dir: Path, outdir: Path) -> dict[str, bytes]:
    """Compile each workload statically (the 32-bit ones freestanding); return name -> binary."""
    wl_dir = source_dir / "workloads"
    binaries: dict[str, bytes] = {}
    for name in WORKLOADS:
        src = wl_dir / f"{name}.c"
        if not src.is_file():
            raise InitramfsError(f"workload source missing: {src}")
        exe = outdir / name
        # Compile from the source directory with a relative file name so no
        # host path ends up in the binary (keeps the archive reproducible).
        flags = COMPAT_CFLAGS if name in COMPAT_WORKLOADS else CFLAGS
        argv = [cc_path, *flags, "-o", str(exe), src.name]
        proc = subprocess.run(argv, cwd=wl_dir, capture_output=True, text=True, check=False, timeout=300)
        if proc.returncode != 0:
            err = proc.stderr.strip()
            lines = err.splitlines()
            first = next((ln for ln in lines if "error" in ln), "".join(lines[:1]))
            if "libc.a" in err or "cannot find -lc" in err or "stdio.h" in err:
                raise CompilerMissingError(
                    f"static C library missing while compiling {src.name}: "
                    f"{first.strip()}; apt-get install gcc libc6-dev"
                )
            raise WorkloadCompileError(f"gcc failed on {src.name}: {first.strip()}", stderr=err)
        binaries[name] = exe.read_bytes()
    return binaries


def _entries(
    init: bytes,
    busybox: bytes,
    applets: Sequence[str],
    workloads: dict[str, bytes],
    selftests: dict[str, bytes] | None = None,
) -> list[_Entry]:
    """Lay out the archive members, parents before children."""
    entries = [
        _dir("bin"),
        _dir("dev"),
        _chardev("dev/console", 5, 1, 0o600),
        _dir("etc"),
        _dir("proc", 0o555),
        _dir("sbin"),
        _dir("sys", 0o555),
        _dir("tmp", 0o1777),
        _dir("usr"),
        _dir("usr/bin"),
        _file("init", init),
        _file("bin/busybox", busybox),
    ]
    entries += [_file(f"bin/{name}", workloads[name]) for name in WORKLOADS]
    taken = {"busybox", *WORKLOADS}
    entries += [_symlink(f"bin/{a}", "busybox") for a in applets if a not in taken]
    if selftests is not None:
        entries.append(_dir(SELFTESTS_DIR))
        entries += [_file(f"{SELFTESTS_DIR}/{n}", data) for n, data in sorted(selftests.items())]
    return entries


def _selftest_files(cache_dir: Path, choice: str) -> tuple[str, dict[str, bytes]]:
    """The selftest members (name -> content) for ``choice`` and their cache-key text.

    Without the kernel tree there are none: ``MISSING`` then holds the reason; it also
    names each chosen selftest that did not build, with the compiler's error.
    """
    if choice not in SELFTEST_CHOICES:
        raise InitramfsError(f"selftests={choice!r}: choose one of {', '.join(SELFTEST_CHOICES)}")
    if choice == "none":
        return "", {}
    try:
        build = build_selftests(cache_dir)
    except SelftestSourceMissing:
        # no path in it: the archive stays the same whatever the cache directory
        why = (
            f"the cache holds no kernel tree of {DEFAULT_FLAVOR} (the selftests' sources); "
            f"build the kernel once: python -m rig.supply.kernelbuild {DEFAULT_FLAVOR}"
        )
        return f"missing\0{why}", {"MISSING": f"{why}\n".encode()}
    if choice == "default":
        names = [n for n in DEFAULT_SELFTESTS if n in build.binaries]
        unbuilt = [n for n in DEFAULT_SELFTESTS if n in build.failed]
    else:
        names = [n for n in build.binaries if n not in NOT_RUN]
        unbuilt = [n for n in build.failed if n not in NOT_RUN]
    files = {n: build.binaries[n].read_bytes() for n in names}
    if unbuilt:  # the testcase skips these with the compiler's words
        files["MISSING"] = "".join(f"{n} did not build: {build.failed[n]}\n" for n in unbuilt).encode()
    return f"{choice}\0{build.key}\0{' '.join(names)}\0{' '.join(unbuilt)}", files


def _remove_stale_tmp(out_dir: Path) -> None:
    """Delete temp files left by builds killed more than an hour ago."""
    now = time.time()
    for p in out_dir.glob(".*.tmp*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                p.unlink()
        except OSError:
            pass


def build_initramfs(
    cache_dir: Path | None = None,
    *,
    source_dir: Path | None = None,
    busybox: Path | None = None,
    cc: str = "gcc",
    selftests: str = "default",
) -> Path:
    """Build (or reuse) the guest initramfs and return its path.

    The result is ``<cache_dir>/initramfs/<key>.cpio.gz`` where ``key`` is the
    sha256 of the guest sources, the busybox binary, the gcc version and the
    static libc; if that file exists it is returned without rebuilding.  The
    archive is written to a temporary file and renamed into place, so an
    interrupted build never leaves a partial archive under the final name.

    Args:
        cache_dir: cache root; default ``$CR3RIG_CACHE`` or ``~/.cache/cr3rig``.
        source_dir: guest sources; default ``guests/initramfs`` of this repo.
        busybox: static busybox binary; default ``/bin/busybox``.
        cc: C compiler to use.
        selftests: which x86 selftests go in (:data:`SELFTEST_CHOICES`).

    Raises:
        BusyboxMissingError: no static busybox (``apt-get install busybox-static``).
        CompilerMissingError: no gcc / libc.a (``apt-get install gcc libc6-dev``).
        WorkloadCompileError: a workload did not compile.
        InitramfsError: any other build failure.

    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    source_dir = SOURCE_DIR if source_dir is None else Path(source_dir)
    busybox = BUSYBOX_PATH if busybox is None else Path(busybox)

    _check_busybox(busybox)
    cc_path = _find_cc(cc)
    gcc_version, libc = _gcc_identity(cc_path)
    selftest_key, selftest_files = _selftest_files(cache_dir, selftests)
    key = _cache_key(source_dir, busybox, gcc_version, libc, selftest_key)

    out_dir = cache_dir / "initramfs"
    final = out_dir / f"{key}.cpio.gz"
    if final.is_file():
        return final

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InitramfsError(f"cannot create cache directory {out_dir}: {exc}") from exc
    _remove_stale_tmp(out_dir)

    applets = _busybox_applets(busybox)
    with tempfile.TemporaryDirectory(prefix="cr3rig-initramfs-") as tmp:
        workloads = _compile_workloads(cc_path, source_dir, Path(tmp))
    entries = _entries(
        (source_dir / "init").read_bytes(),
        busybox.read_bytes(),
        applets,
        workloads,
        selftest_files if selftests != "none" else None,
    )

    raw = io.BytesIO()
    _write_newc(raw, entries)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=out_dir)
    tmp_path = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            # filename="" and mtime=0 keep the gzip header reproducible.
            with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=f, mtime=0) as gz:
                gz.write(raw.getvalue())
            f.flush()
            os.fsync(f.fileno())
        tmp_path.chmod(0o644)
        tmp_path.replace(final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return final


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rig.supply.initramfs [--selftests all]``: build it, print its path."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m rig.supply.initramfs", description="Build the guest initramfs."
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="cache root (default $CR3RIG_CACHE or ~/.cache/cr3rig)"
    )
    parser.add_argument(
        "--selftests", choices=SELFTEST_CHOICES, default="default",
        help="which x86 selftests go in (all: every one that runs here; pass the result with --initrd)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        print(build_initramfs(args.cache_dir, selftests=args.selftests))
    except RigError as exc:
        print(f"initramfs: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
