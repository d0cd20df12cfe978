"""Build the patched reference kernels the rig boots.

A *flavor* names a Debian kernel source package, the patch series applied on
top of it (``guests/linux/patches-<version>/NNNN-*.patch``) and a Kconfig
fragment (``guests/linux/config/<flavor>.config``) merged on top of
``make tinyconfig``::

    build = build_kernel("reference-7.2")
    build.vmlinux, build.bzimage, build.config

Layout under ``<cache>/kernels/`` (``<cache>`` is ``$CR3RIG_CACHE`` or
``~/.cache/cr3rig``):

``debian/<suite>/``
    a private APT configuration (``sources.list``, ``lists/``, ``cache/``) and
    the downloaded ``.deb``. The system's ``/etc/apt`` is only read, to find
    the mirror. Once a package is downloaded it is reused, offline, until
    ``refresh=True`` downloads the newest version again.
``trees/<flavor>/src``
    a git repository whose ``pristine`` commit is the tarball of the package.
    The series is applied by building the patched tree in a scratch index and
    checking it out: git rewrites only the files whose content changed, so the
    mtimes of the others survive and ``make`` rebuilds incrementally.
``trees/<flavor>/kconfig``, ``trees/<flavor>/build``
    out-of-tree (``O=``) directories: the configuration is generated in the
    first and copied into the second only if it changed.
``builds/<key>/``
    the cached results (``vmlinux``, ``bzImage``, ``config``, ``build.json``
    and the kernel's GDB helpers: ``source <entry>/gdb/vmlinux-gdb.py``
    gives the ``lx-*`` commands). ``<key>`` is a
    SHA-256 over the source package version, the patches (names and contents)
    and the fragment; a second call with the same inputs returns at once.

The work is split by concept: :mod:`rig.supply.debsource` (fetching the source
package), :mod:`rig.supply.kerneltree` (pristine tree + series in git),
:mod:`rig.supply.kconfig` (configuration), :mod:`rig.supply.buildrun` (running the
commands: full output to ``<cache>/kernels/logs/<flavor>-<time>-<pid>.log``, one
progress line on the terminal). This module ties them together and keeps the cache.

Command line::

    python -m rig.supply.kernelbuild reference-7.2 [--cache-dir D] [--patch extra.patch ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rig.supply.buildrun import (
    BuildRunner,
    KernelBuildError,
    LogFn,
    Progress,
    UnknownFlavorError,
    log_path,
)
from rig.supply.cache import default_cache_dir, locked
from rig.supply.debsource import _sources_list, deb_version, fetch_package, system_mirrors
from rig.supply.kconfig import check_config, configure, parse_fragment
from rig.supply.kerneltree import TreeState, apply_series, pristine_commit

__all__ = [
    "FLAVORS",
    "GUEST_DIR",
    "REPO_ROOT",
    "Flavor",
    "KernelBuild",
    "KernelBuildError",
    "LogFn",
    "UnknownFlavorError",
    "_sources_list",
    "build_kernel",
    "cache_key",
    "check_config",
    "default_cache_dir",
    "get_flavor",
    "main",
    "parse_fragment",
    "series_patches",
    "system_mirrors",
]

#: Root of the repository (``rig/`` is two levels below it).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Where the patch series, the config fragments and build-deps.txt live.
GUEST_DIR = REPO_ROOT / "guests" / "linux"

#: Bumped whenever the meaning of a cache entry changes.
_KEY_SCHEMA = "cr3rig-kernelbuild-3"
#: Objects a cold build makes, until a build of the flavor has counted them
#: (kbuild lines CC/AS/AR/LD/HOSTCC…; reference-7.2 measured 1,627 on 7.2.13).
_DEFAULT_OBJECTS = 1627


@dataclass(frozen=True)
class Flavor:
    """One buildable kernel: Debian source package + patch series + config fragment."""

    name: str
    #: Debian suite the source package comes from.
    suite: str
    #: Binary package shipping the source tarball (``usr/src/<package>.tar.xz``).
    package: str
    #: Directory of ``NNNN-*.patch`` files, applied in name order.
    patch_dir: Path
    #: Kconfig fragment merged on top of ``make tinyconfig``.
    fragment: Path


FLAVORS: Mapping[str, Flavor] = {
    "reference-7.2": Flavor(
        name="reference-7.2",
        suite="sid",
        package="linux-source-7.2",
        patch_dir=GUEST_DIR / "patches-7.2",
        fragment=GUEST_DIR / "config" / "reference-7.2.config",
    ),
    "reference-6.1": Flavor(
        name="reference-6.1",
        suite="bookworm",
        package="linux-source-6.1",
        patch_dir=GUEST_DIR / "patches-6.1",
        fragment=GUEST_DIR / "config" / "reference-6.1.config",
    ),
}


@dataclass(frozen=True)
class KernelBuild:
    """A built kernel, as cached under ``<cache>/kernels/builds/<key>/``."""

    #: Uncompressed ELF with debug info (bootable with QEMU ``-kernel`` via PVH).
    vmlinux: Path
    #: ``arch/x86/boot/bzImage``.
    bzimage: Path
    #: The ``.config`` it was built with.
    config: Path
    #: Debian package and version, e.g. ``linux-source-7.2 7.2.13-1``.
    source_version: str
    #: Cache key (hex SHA-256).
    key: str


# --------------------------------------------------------------------------
# Pure helpers


def get_flavor(name: str) -> Flavor:
    """Return the flavor called ``name``; raise :class:`UnknownFlavorError` otherwise."""
    try:
        return FLAVORS[name]
    except KeyError:
        valid = ", ".join(sorted(FLAVORS))
        raise UnknownFlavorError(f"unknown kernel flavor {name!r}; valid flavors: {valid}") from None


def series_patches(flavor: Flavor) -> list[Path]:
    """Return the flavor's patch series (``NNNN-*.patch``), in application order."""
    if not flavor.patch_dir.is_dir():
        raise KernelBuildError(f"patch directory {flavor.patch_dir} is missing")
    return sorted(flavor.patch_dir.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def cache_key(
    flavor: str,
    source_version: str,
    patches: Sequence[tuple[str, bytes]],
    fragment: bytes,
) -> str:
    """Return the cache key of a build: a hex SHA-256 over all of its inputs.

    ``patches`` are ``(name, content)`` pairs in application order (the
    series, then the extra patches); ``fragment`` is the config fragment.
    """
    h = hashlib.sha256()

    def field(tag: str, data: bytes) -> None:
        h.update(f"{tag} {len(data)}\n".encode())
        h.update(data)
        h.update(b"\n")

    field("schema", _KEY_SCHEMA.encode())
    field("flavor", flavor.encode())
    field("source", source_version.encode())
    for name, content in patches:
        field("patch-name", name.encode())
        field("patch", content)
    field("fragment", fragment)
    return h.hexdigest()


def _make(src: Path, build: Path, jobs: int, runner: BuildRunner) -> None:
    targets = ["vmlinux", "bzImage"]
    config = parse_fragment((build / ".config").read_text())
    if config.get("CONFIG_GDB_SCRIPTS") == "y":
        targets.append("scripts_gdb")  # vmlinux-gdb.py, the lx-* helpers
    runner.say(f"kernelbuild: make -j{jobs} {' '.join(targets)} (O={build})")
    runner.run(
        ["make", "-C", str(src), f"O={build}", f"-j{jobs}", *targets],
        what="kernel build",
        capture=False,
        # Set (even empty), it keeps setlocalversion from appending "+" for
        # the git work tree: the release stays the Debian upstream version.
        env={"LOCALVERSION": ""},
    )


def _object_estimate(tree: Path, cold: bool) -> int | None:
    """Objects the build phase will make: what the last cold build of this tree counted
    (a built-in figure before the first); None for an incremental build (unknowable)."""
    if not cold:
        return None
    try:
        return int(json.loads((tree / "objects.json").read_text())["cold"])
    except (OSError, ValueError, KeyError, TypeError):
        return _DEFAULT_OBJECTS


def _remember_objects(tree: Path, count: int) -> None:
    (tree / "objects.json").write_text(json.dumps({"cold": count}) + "\n")


def _store(build: Path, out: Path, meta: dict[str, object]) -> None:
    """Copy the results of ``build`` into the cache entry ``out`` (atomically)."""
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _copy_results(build, tmp, meta)
    except OSError as exc:  # e.g. the disk filled up: no half-written entry stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise KernelBuildError(
            f"cannot store the build in {out.parent}: {exc.strerror}; free space there (or set $CR3RIG_CACHE)"
        ) from exc
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _copy_results(build: Path, tmp: Path, meta: dict[str, object]) -> None:
    """Copy vmlinux, bzImage, config, the gdb helpers and ``build.json`` into ``tmp``."""
    (tmp / "gdb").mkdir(parents=True)
    shutil.copy2(build / "vmlinux", tmp / "vmlinux")
    shutil.copy2(build / "arch" / "x86" / "boot" / "bzImage", tmp / "bzImage")
    shutil.copy2(build / ".config", tmp / "config")
    gdb_dir = build / "scripts" / "gdb"
    if (build / "vmlinux-gdb.py").exists() and gdb_dir.is_dir():
        # The lx-* helpers, resolved out of the work tree (which later builds
        # change). Kept in gdb/ rather than next to vmlinux, where GDB would
        # try to auto-load them (and warn about its safe-path) every time:
        # `source <entry>/gdb/vmlinux-gdb.py` loads them.
        shutil.copy2(build / "vmlinux-gdb.py", tmp / "gdb" / "vmlinux-gdb.py")
        shutil.copytree(
            gdb_dir,
            tmp / "gdb" / "scripts" / "gdb",
            ignore=shutil.ignore_patterns("*.o", ".*.cmd", "__pycache__"),
        )
    (tmp / "build.json").write_text(json.dumps(meta, indent=1) + "\n")


def _result(out: Path, source_version: str, key: str) -> KernelBuild:
    return KernelBuild(
        vmlinux=out / "vmlinux",
        bzimage=out / "bzImage",
        config=out / "config",
        source_version=source_version,
        key=key,
    )


def _complete(out: Path) -> bool:
    return all((out / name).is_file() for name in ("vmlinux", "bzImage", "config", "build.json"))


def build_kernel(
    flavor: str,
    *,
    cache_dir: Path | None = None,
    patches_extra: Sequence[Path] = (),
    jobs: int | None = None,
    log: LogFn | None = None,
    progress: Progress | None = None,
    refresh: bool = False,
) -> KernelBuild:
    """Build (or fetch from the cache) the kernel ``flavor``.

    ``cache_dir`` is the rig's cache root (default :func:`default_cache_dir`);
    the kernels live under ``<cache_dir>/kernels``. ``patches_extra`` are
    applied after the flavor's series (for mutants); they are part of the
    cache key. ``jobs`` defaults to the number of CPUs. Every line of output
    goes to a log file under ``<cache_dir>/kernels/logs/`` (named in any
    error) and, if given, to ``log``. ``progress`` is the progress line; by
    default one is drawn on stderr unless ``log`` is given.
    ``refresh`` downloads the newest version of the source package even if
    one is already cached.

    Raises :class:`UnknownFlavorError` for an unknown flavor and
    :class:`KernelBuildError` if any step fails.
    """
    fl = get_flavor(flavor)
    kernels = (cache_dir or default_cache_dir()) / "kernels"
    njobs = jobs or os.cpu_count() or 1

    patches = [*series_patches(fl), *(Path(p) for p in patches_extra)]
    for p in patches:
        if not p.is_file():
            raise KernelBuildError(f"patch {p} does not exist")
    if not fl.fragment.is_file():
        raise KernelBuildError(f"config fragment {fl.fragment} is missing")
    fragment = fl.fragment.read_text()

    if progress is None and log is None:
        progress = Progress(f"kernelbuild {fl.name}")
    runner = BuildRunner(log_path(kernels / "logs", fl.name), progress=progress, echo=log)
    built = False
    try:
        result, built = _build(fl, kernels, patches, fragment, njobs, refresh, runner)
        return result
    except BaseException:
        built = True  # keep the log of a failure
        raise
    finally:
        runner.close(keep=built)


def _build(
    fl: Flavor,
    kernels: Path,
    patches: Sequence[Path],
    fragment: str,
    njobs: int,
    refresh: bool,
    runner: BuildRunner,
) -> tuple[KernelBuild, bool]:
    """The build, and whether anything was done (False: a cache hit)."""
    progress = runner.progress
    apt_dir = kernels / "debian" / fl.suite
    if refresh or not any((apt_dir / "debs").glob(f"{fl.package}_*.deb")):
        runner.phase("download")
    deb = fetch_package(fl, kernels, refresh=refresh, runner=runner)
    version = deb_version(deb, runner)
    source_version = f"{fl.package} {version}"
    key = cache_key(fl.name, source_version, [(p.name, p.read_bytes()) for p in patches], fragment.encode())
    out = kernels / "builds" / key
    if _complete(out):
        runner.say(f"kernelbuild: cache hit {out}")
        return _result(out, source_version, key), False

    tree = kernels / "trees" / fl.name
    with locked(tree.with_name(f"{fl.name}.lock")):
        if _complete(out):  # built by someone else while we waited
            return _result(out, source_version, key), False
        start = time.monotonic()
        tree.mkdir(parents=True, exist_ok=True)
        src = tree / "src"
        state = TreeState.load(tree / "state.json")
        if not (src / ".git").is_dir():
            state.pristine.clear()
            shutil.rmtree(tree / "build", ignore_errors=True)
            shutil.rmtree(tree / "kconfig", ignore_errors=True)
        if version not in state.pristine:
            runner.phase("unpack")
        pristine = pristine_commit(src, state, deb, version, runner)
        runner.phase("patch")
        runner.say(f"kernelbuild: applying {len(patches)} patch(es) to {source_version}")
        apply_series(src, pristine, patches, runner)
        runner.phase("configure")
        configure(fl.name, fl.fragment, src, tree, fragment, njobs, runner)
        cold = not (tree / "build" / "vmlinux").exists()
        runner.phase("build", _object_estimate(tree, cold))
        _make(src, tree / "build", njobs, runner)
        if cold:
            _remember_objects(tree, runner.objects)
        runner.phase("store")
        meta: dict[str, object] = {
            "flavor": fl.name,
            "source_version": source_version,
            "key": key,
            "patches": [str(p) for p in patches],
            "fragment": str(fl.fragment),
            "build_seconds": round(time.monotonic() - start, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _store(tree / "build", out, meta)
        runner.say(f"kernelbuild: built {fl.name} in {meta['build_seconds']} s -> {out}")
        if progress is not None:
            progress.finish(
                f"kernelbuild {fl.name}: built in {meta['build_seconds']} s (log: {runner.log_file})"
            )
        return _result(out, source_version, key), True


# --------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: build a flavor, print the paths of the results."""
    parser = argparse.ArgumentParser(
        prog="python -m rig.supply.kernelbuild",
        description="Build a patched reference kernel (cached).",
    )
    parser.add_argument("flavor", help="one of: " + ", ".join(sorted(FLAVORS)))
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (default: $CR3RIG_CACHE or ~/.cache/cr3rig); kernels go in <root>/kernels",
    )
    parser.add_argument(
        "--patch",
        dest="patches",
        action="append",
        type=Path,
        default=[],
        help="extra patch applied after the series (repeatable)",
    )
    parser.add_argument("-j", "--jobs", type=int, default=None, help="make -j (default: all CPUs)")
    parser.add_argument("--refresh", action="store_true", help="download the newest source package again")
    args = parser.parse_args(argv)
    try:
        build = build_kernel(
            args.flavor,
            cache_dir=args.cache_dir,
            patches_extra=[p.resolve() for p in args.patches],
            jobs=args.jobs,
            refresh=args.refresh,
        )
    except KernelBuildError as e:
        print(f"\nkernelbuild: error: {e}", file=sys.stderr)
        return 1
    print(f"source:  {build.source_version}")
    print(f"key:     {build.key}")
    print(f"vmlinux: {build.vmlinux}")
    print(f"bzImage: {build.bzimage}")
    print(f"config:  {build.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
