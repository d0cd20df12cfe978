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

Command line::

    python -m rig.supply.kernelbuild reference-7.2 [--cache-dir D] [--patch extra.patch ...]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rig.errors import ConfigError, RigError
from rig.supply.cache import default_cache_dir

__all__ = [
    "FLAVORS",
    "Flavor",
    "KernelBuild",
    "KernelBuildError",
    "UnknownFlavorError",
    "build_kernel",
    "cache_key",
    "check_config",
    "default_cache_dir",
    "get_flavor",
    "main",
    "parse_fragment",
    "series_patches",
]

#: Root of the repository (``rig/`` is one level below it).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Where the patch series, the config fragments and build-deps.txt live.
GUEST_DIR = REPO_ROOT / "guests" / "linux"

#: Bumped whenever the meaning of a cache entry changes.
_KEY_SCHEMA = "cr3rig-kernelbuild-3"
#: Lines of build output kept for the error message.
_TAIL_LINES = 40
#: Used when the system's APT sources name no Debian mirror.
_DEFAULT_MIRROR = "http://deb.debian.org/debian"
_DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
_ARCHIVE_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
#: Identity of the commits made in the work trees (never pushed anywhere).
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "cr3rig",
    "GIT_AUTHOR_EMAIL": "cr3rig@localhost",
    "GIT_COMMITTER_NAME": "cr3rig",
    "GIT_COMMITTER_EMAIL": "cr3rig@localhost",
    "GIT_AUTHOR_DATE": "1970-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "1970-01-01T00:00:00Z",
}


class KernelBuildError(RigError):
    """Fetching, patching, configuring or building a kernel failed.

    ``str(e)`` starts with a one-line summary (also in :attr:`summary`); for a
    failed command it goes on with the last lines of its output
    (:attr:`log_tail`).
    """

    def __init__(self, summary: str, log_tail: Sequence[str] = ()) -> None:
        self.summary = summary
        self.log_tail = list(log_tail)
        text = summary
        if self.log_tail:
            text += "\n--- last lines of output ---\n" + "\n".join(self.log_tail)
        super().__init__(text)


class UnknownFlavorError(KernelBuildError, ConfigError):
    """The flavor is not in :data:`FLAVORS`; the one-line message lists the valid ones."""


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


LogFn = Callable[[str], None]


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


_SET_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_fragment(text: str) -> dict[str, str | None]:
    """Parse a Kconfig fragment or ``.config``.

    Returns ``{symbol: value}``, with ``None`` for ``# CONFIG_X is not set``.
    Other comments and blank lines are ignored.
    """
    options: dict[str, str | None] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        m = _SET_RE.match(line)
        if m:
            options[m.group(1)] = m.group(2)
            continue
        m = _UNSET_RE.match(line)
        if m:
            options[m.group(1)] = None
            continue
        if line.startswith("#"):
            continue
        raise ValueError(f"line {lineno}: not a Kconfig assignment: {raw!r}")
    return options


def check_config(fragment: str, config: str) -> list[str]:
    """Compare a fragment with a resulting ``.config``.

    Returns one message per option of the fragment that did not take (empty
    if all did): ``CONFIG_X=y`` must be in the config with exactly that value,
    ``# CONFIG_X is not set`` must be unset (or absent) there.
    """
    wanted = parse_fragment(fragment)
    actual = parse_fragment(config)
    problems: list[str] = []
    for sym, value in wanted.items():
        got = actual.get(sym)
        if value is None:
            if got is not None and got != "n":
                problems.append(f"{sym} should be unset, is {sym}={got}")
        elif got != value:
            shown = "unset" if got is None else f"{sym}={got}"
            problems.append(f"{sym}={value} requested, is {shown}")
    return problems


def _stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Running commands


def _run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    log: LogFn,
    what: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stream: bool = False,
) -> str:
    """Run ``cmd``; return its stdout+stderr. Raise :class:`KernelBuildError` on failure.

    With ``stream=True`` each output line is passed to ``log`` as it comes.
    """
    full_env = dict(os.environ)
    full_env["LC_ALL"] = "C"
    if env:
        full_env.update(env)
    argv = [os.fspath(c) for c in cmd]
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    out: list[str] = []
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    except FileNotFoundError as e:
        raise KernelBuildError(f"{what}: {argv[0]} not found; install guests/linux/build-deps.txt") from e
    assert proc.stdout is not None
    with proc:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            tail.append(line)
            out.append(line)
            if stream:
                log(line)
    if proc.returncode != 0:
        raise KernelBuildError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}", list(tail))
    return "\n".join(out)


def _git(repo: Path, *args: str, log: LogFn, env: Mapping[str, str] | None = None) -> str:
    full_env = dict(_GIT_ENV)
    if env:
        full_env.update(env)
    return _run(["git", "-C", str(repo), *args], log=log, what=f"git {args[0]}", env=full_env)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------
# Fetching the Debian source package


def _system_source_entries() -> list[tuple[list[str], list[str]]]:
    """Return ``(uris, suites)`` of the system's enabled ``deb`` APT sources."""
    entries: list[tuple[list[str], list[str]]] = []
    apt = Path("/etc/apt")
    one_line = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in one_line:
        with contextlib.suppress(OSError):
            for raw in path.read_text().splitlines():
                words = re.sub(r"\[[^\]]*\]", " ", raw.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    entries.append(([words[1]], [words[2]]))
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                entries.append((fields.get("uris", "").split(), fields.get("suites", "").split()))
    return entries


def system_mirrors() -> tuple[str, str]:
    """Return the Debian archive and security mirrors the system's APT uses.

    Falls back to ``deb.debian.org`` for whichever is not found.
    """
    mirror = security = None
    for uris, suites in _system_source_entries():
        if not uris:
            continue
        if any(s.endswith("-security") for s in suites) or "debian-security" in uris[0]:
            security = security or uris[0]
        elif uris[0].rstrip("/").endswith("/debian"):
            mirror = mirror or uris[0]
    mirror = (mirror or _DEFAULT_MIRROR).rstrip("/")
    security = (security or _DEFAULT_SECURITY_MIRROR).rstrip("/")
    return mirror, security


def _sources_list(suite: str) -> str:
    mirror, security = system_mirrors()
    opts = f"[signed-by={_ARCHIVE_KEYRING}] " if _ARCHIVE_KEYRING.exists() else ""
    lines = [f"deb {opts}{mirror} {suite} main"]
    if suite not in ("sid", "unstable", "experimental"):
        lines.append(f"deb {opts}{mirror} {suite}-updates main")
        lines.append(f"deb {opts}{security} {suite}-security main")
    return "\n".join(lines) + "\n"


def _apt_options(apt_dir: Path) -> list[str]:
    opts = [
        f"-oDir::Etc::SourceList={apt_dir / 'sources.list'}",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={apt_dir / 'lists'}",
        f"-oDir::Cache={apt_dir / 'cache'}",
    ]
    if os.geteuid() == 0:
        # The _apt sandbox user cannot write into the cache directory.
        opts.append("-oAPT::Sandbox::User=root")
    return opts


def _deb_version(deb: Path, log: LogFn) -> str:
    return _run(["dpkg-deb", "-f", str(deb), "Version"], log=log, what="dpkg-deb").strip()


def _fetch_package(flavor: Flavor, kernels: Path, *, refresh: bool, log: LogFn) -> Path:
    """Return the flavor's ``.deb``, downloading it if missing or if ``refresh``."""
    apt_dir = kernels / "debian" / flavor.suite
    debs_dir = apt_dir / "debs"
    with _locked(apt_dir / ".lock"):
        debs = sorted(debs_dir.glob(f"{flavor.package}_*.deb"))
        if debs and not refresh:
            return debs[-1]
        (apt_dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (apt_dir / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (apt_dir / "sources.list").write_text(_sources_list(flavor.suite))
        opts = _apt_options(apt_dir)
        log(f"kernelbuild: apt-get update ({flavor.suite})")
        _run(["apt-get", "-q", *opts, "update"], log=log, what="apt-get update", stream=True)
        download = Path(tempfile.mkdtemp(prefix="download-", dir=apt_dir))
        try:
            log(f"kernelbuild: apt-get download {flavor.package}")
            _run(
                ["apt-get", "-q", *opts, "download", flavor.package],
                log=log,
                what="apt-get download",
                cwd=download,
                stream=True,
            )
            new = sorted(download.glob(f"{flavor.package}_*.deb"))
            if not new:
                raise KernelBuildError(f"apt-get download {flavor.package} produced no .deb")
            debs_dir.mkdir(parents=True, exist_ok=True)
            target = debs_dir / new[0].name
            os.replace(new[0], target)
        finally:
            shutil.rmtree(download, ignore_errors=True)
        for old in debs_dir.glob(f"{flavor.package}_*.deb"):
            if old != target:
                old.unlink()
        return target


# --------------------------------------------------------------------------
# The work tree: pristine sources in git, patches applied by checkout


@dataclass
class _TreeState:
    path: Path
    pristine: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> _TreeState:
        data: dict[str, dict[str, str]] = {}
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text())
        return cls(path, dict(data.get("pristine", {})))

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pristine": self.pristine}, indent=1) + "\n")
        os.replace(tmp, self.path)


def _unpack_tarball(deb: Path, package: str, dest: Path, log: LogFn) -> None:
    """Extract ``usr/src/<package>.tar.xz`` of ``deb`` into ``dest`` (top dir stripped)."""
    with tempfile.TemporaryDirectory(prefix="deb-", dir=dest.parent) as tmp:
        _run(["dpkg", "-x", str(deb), tmp], log=log, what="dpkg -x")
        tarballs = sorted(Path(tmp, "usr", "src").glob(f"{package}.tar.*"))
        if not tarballs:
            raise KernelBuildError(f"{deb.name} holds no usr/src/{package}.tar.*")
        dest.mkdir(parents=True, exist_ok=True)
        _run(
            ["tar", "-xf", str(tarballs[0]), "-C", str(dest), "--strip-components=1"],
            log=log,
            what="tar -x",
        )


def _pristine_commit(src: Path, state: _TreeState, deb: Path, version: str, log: LogFn) -> str:
    """Return the commit holding the pristine sources of ``version``, creating it if needed."""
    if version in state.pristine:
        return state.pristine[version]
    package = deb.name.split("_", 1)[0]
    ref = "refs/cr3rig/pristine/" + re.sub(r"[^A-Za-z0-9.+-]", "_", version)
    if not (src / ".git").is_dir():
        log(f"kernelbuild: unpacking {deb.name} into {src}")
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        _unpack_tarball(deb, package, src, log)
        _git(src, "init", "-q", log=log)
        _git(src, "config", "core.autocrlf", "false", log=log)
        _git(src, "config", "gc.auto", "0", log=log)
        log("kernelbuild: recording the pristine tree in git (about 30 s)")
        _git(src, "add", "-A", "-f", ".", log=log)
        tree = _git(src, "write-tree", log=log).strip()
        commit = _git(src, "commit-tree", tree, "-m", f"pristine {version}", log=log).strip()
        _git(src, "update-ref", ref, commit, log=log)
        _git(src, "checkout", "-q", "-f", "--detach", commit, log=log)
    else:
        # A new version of the package: record it without touching the work
        # tree, so that the next checkout rewrites only the files that differ.
        log(f"kernelbuild: recording {deb.name} in {src}")
        with tempfile.TemporaryDirectory(prefix="unpack-", dir=src.parent) as tmp:
            unpacked = Path(tmp, "tree")
            _unpack_tarball(deb, package, unpacked, log)
            index = Path(tmp, "index")
            env = {"GIT_INDEX_FILE": str(index), "GIT_WORK_TREE": str(unpacked)}
            _git(src, "add", "-A", "-f", ".", log=log, env=env)
            tree = _git(src, "write-tree", log=log, env=env).strip()
        commit = _git(src, "commit-tree", tree, "-m", f"pristine {version}", log=log).strip()
        _git(src, "update-ref", ref, commit, log=log)
    state.pristine[version] = commit
    state.save()
    return commit


def _apply_series(src: Path, pristine: str, patches: Sequence[Path], log: LogFn) -> None:
    """Make the work tree ``src`` = ``pristine`` + ``patches``, rewriting only changed files."""
    with tempfile.TemporaryDirectory(prefix="apply-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp, "index"))}
        _git(src, "read-tree", pristine, log=log, env=env)
        for patch in patches:
            try:
                _git(src, "apply", "--cached", "--whitespace=nowarn", str(patch), log=log, env=env)
            except KernelBuildError as e:
                raise KernelBuildError(
                    f"patch {patch} does not apply to the pristine sources", e.log_tail
                ) from None
        tree = _git(src, "write-tree", log=log, env=env).strip()
    commit = _git(src, "commit-tree", tree, "-p", pristine, "-m", "cr3rig series", log=log).strip()
    _git(src, "update-ref", "refs/cr3rig/applied", commit, log=log)
    # Only paths that differ between HEAD and `commit` (or that were modified
    # in the work tree) are written; the others keep their mtimes.
    _git(src, "checkout", "-q", "-f", "--detach", commit, log=log)
    _git(src, "clean", "-q", "-f", "-d", "-x", log=log)


# --------------------------------------------------------------------------
# Configuring and building


def _configure(flavor: Flavor, src: Path, tree: Path, fragment: str, jobs: int, log: LogFn) -> None:
    """Generate the configuration in ``tree/kconfig``; copy it to ``tree/build`` if changed."""
    kconfig = tree / "kconfig"
    build = tree / "build"
    kconfig.mkdir(parents=True, exist_ok=True)
    build.mkdir(parents=True, exist_ok=True)
    frag_file = kconfig / "fragment.config"
    frag_file.write_text(fragment)
    make = ["make", "-C", str(src), f"O={kconfig}", f"-j{jobs}"]
    log(f"kernelbuild: configuring {flavor.name} (tinyconfig + {flavor.fragment.name})")
    _run([*make, "tinyconfig"], log=log, what="make tinyconfig")
    _run(
        [
            str(src / "scripts" / "kconfig" / "merge_config.sh"),
            "-m",
            "-O",
            str(kconfig),
            str(kconfig / ".config"),
            str(frag_file),
        ],
        log=log,
        what="merge_config.sh",
        cwd=src,
    )
    _run([*make, "olddefconfig"], log=log, what="make olddefconfig")
    new_config = (kconfig / ".config").read_text()
    problems = check_config(fragment, new_config)
    if problems:
        for p in problems:
            log(f"kernelbuild: config: {p}")
        raise KernelBuildError(
            f"{len(problems)} option(s) of {flavor.fragment} did not take after "
            f"olddefconfig (missing dependencies?): " + "; ".join(problems)
        )
    old = build / ".config"
    if not old.exists() or old.read_text() != new_config:
        shutil.copyfile(kconfig / ".config", old)


def _make(src: Path, build: Path, jobs: int, log: LogFn) -> None:
    targets = ["vmlinux", "bzImage"]
    config = parse_fragment((build / ".config").read_text())
    if config.get("CONFIG_GDB_SCRIPTS") == "y":
        targets.append("scripts_gdb")  # vmlinux-gdb.py, the lx-* helpers
    log(f"kernelbuild: make -j{jobs} {' '.join(targets)} (O={build})")
    _run(
        ["make", "-C", str(src), f"O={build}", f"-j{jobs}", *targets],
        log=log,
        what="kernel build",
        stream=True,
        # Set (even empty), it keeps setlocalversion from appending "+" for
        # the git work tree: the release stays the Debian upstream version.
        env={"LOCALVERSION": ""},
    )


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
    refresh: bool = False,
) -> KernelBuild:
    """Build (or fetch from the cache) the kernel ``flavor``.

    ``cache_dir`` is the rig's cache root (default :func:`default_cache_dir`);
    the kernels live under ``<cache_dir>/kernels``. ``patches_extra`` are
    applied after the flavor's series (for mutants); they are part of the
    cache key. ``jobs`` defaults to the number of CPUs. Progress, including
    every line ``make`` prints, goes to ``log`` (default: stderr).
    ``refresh`` downloads the newest version of the source package even if
    one is already cached.

    Raises :class:`UnknownFlavorError` for an unknown flavor and
    :class:`KernelBuildError` if any step fails.
    """
    fl = get_flavor(flavor)
    logf: LogFn = log or _stderr_log
    kernels = (cache_dir or default_cache_dir()) / "kernels"
    njobs = jobs or os.cpu_count() or 1

    patches = [*series_patches(fl), *(Path(p) for p in patches_extra)]
    for p in patches:
        if not p.is_file():
            raise KernelBuildError(f"patch {p} does not exist")
    if not fl.fragment.is_file():
        raise KernelBuildError(f"config fragment {fl.fragment} is missing")
    fragment = fl.fragment.read_text()

    deb = _fetch_package(fl, kernels, refresh=refresh, log=logf)
    version = _deb_version(deb, logf)
    source_version = f"{fl.package} {version}"
    key = cache_key(fl.name, source_version, [(p.name, p.read_bytes()) for p in patches], fragment.encode())
    out = kernels / "builds" / key
    if _complete(out):
        logf(f"kernelbuild: cache hit {out}")
        return _result(out, source_version, key)

    tree = kernels / "trees" / fl.name
    with _locked(tree.with_name(f"{fl.name}.lock")):
        if _complete(out):  # built by someone else while we waited
            return _result(out, source_version, key)
        start = time.monotonic()
        tree.mkdir(parents=True, exist_ok=True)
        src = tree / "src"
        state = _TreeState.load(tree / "state.json")
        if not (src / ".git").is_dir():
            state.pristine.clear()
            shutil.rmtree(tree / "build", ignore_errors=True)
            shutil.rmtree(tree / "kconfig", ignore_errors=True)
        pristine = _pristine_commit(src, state, deb, version, logf)
        logf(f"kernelbuild: applying {len(patches)} patch(es) to {source_version}")
        _apply_series(src, pristine, patches, logf)
        _configure(fl, src, tree, fragment, njobs, logf)
        _make(src, tree / "build", njobs, logf)
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
        logf(f"kernelbuild: built {fl.name} in {meta['build_seconds']} s -> {out}")
        return _result(out, source_version, key)


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
        print(f"kernelbuild: error: {e}", file=sys.stderr)
        return 1
    print(f"source:  {build.source_version}")
    print(f"key:     {build.key}")
    print(f"vmlinux: {build.vmlinux}")
    print(f"bzImage: {build.bzimage}")
    print(f"config:  {build.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
