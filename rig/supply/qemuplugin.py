"""The watch-mode TCG plugin (``rig/observe/cr3watch.c``), built once and cached by content.

No Debian binary package ships ``qemu-plugin.h``; it comes from QEMU's source package.
With a private APT configuration (a ``deb-src`` line for :data:`HEADER_SUITE`, the
system's ``/etc/apt`` only read for the mirror), ``apt-get source --download-only qemu``
fetches the upstream tarball (apt checks its hash; the Debian ``.dsc`` and patch tarball
of a backport may be missing on the mirror, which is fine: only the tarball is used), and
the header alone is extracted from it. The plugin is then compiled with gcc against it and
glib (``libglib2.0-dev``, installed by ``scripts/setup.sh``)::

    <cache>/qemu-plugin/header/<suite>/qemu-plugin.h
    <cache>/qemu-plugin/<sha256(source, header, glibc and glib versions)[:16]>/cr3watch.so

The header is API version 4 (QEMU 10.0.2): the plugin loads into QEMU releases whose
plugin API is 4 or later (register and guest-memory reads), not into Debian bookworm's
QEMU 7.2 (:func:`plugin_support` says why before anything starts).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rig.errors import ConfigError
from rig.supply.debsource import apt_options, system_mirrors
from rig.supply.kerneltree import locked

__all__ = [
    "HEADER_SUITE",
    "MIN_QEMU",
    "SOURCE",
    "api_refusal",
    "build_plugin",
    "main",
    "plugin_header",
    "plugin_qemu",
    "plugin_support",
]

#: The plugin's C source.
SOURCE = Path(__file__).resolve().parent.parent / "observe" / "cr3watch.c"
#: The Debian suite whose QEMU source package provides ``qemu-plugin.h`` (QEMU 10.0.2).
HEADER_SUITE = "bookworm-backports"
#: The oldest QEMU release with plugin API 4 (``qemu_plugin_read_register`` and
#: ``qemu_plugin_read_memory_vaddr``), which the plugin needs.
MIN_QEMU = (9, 2)
_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
_VERSION = re.compile(r"version (\d+)\.(\d+)(?:\.(\d+))?")


def _run(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)


def _last_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit {res.returncode}"


def plugin_header(cache_dir: Path, suite: str = HEADER_SUITE) -> Path:
    """``qemu-plugin.h`` from ``suite``'s QEMU source package, fetched once."""
    base = cache_dir / "qemu-plugin" / "header" / suite
    header = base / "qemu-plugin.h"
    if header.exists():
        return header
    for tool in ("apt-get", "tar", "xz"):
        if shutil.which(tool) is None:
            raise ConfigError(f"fetching qemu-plugin.h needs {tool}: run scripts/setup.sh")
    apt = base / "apt"
    with locked(base / ".lock"):
        if header.exists():
            return header
        (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (apt / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        mirror, _ = system_mirrors()
        signed = f"[signed-by={_KEYRING}] " if _KEYRING.exists() else ""
        (apt / "sources.list").write_text(f"deb-src {signed}{mirror} {suite} main\n")
        opts = apt_options(apt)
        res = _run(["apt-get", "-q", *opts, "update"])
        if res.returncode != 0:
            raise ConfigError(f"apt-get update ({suite} sources) failed: {_last_line(res)}")
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            res = _run(["apt-get", "-q", *opts, "source", "--download-only", "qemu"], Path(tmp))
            origs = sorted(Path(tmp).glob("qemu_*.orig.tar.*"))
            if not origs:  # the .dsc/.debian.tar may 404 on a backport; the tarball must be there
                why = _last_line(res)
                raise ConfigError(f"apt-get source qemu ({suite}) fetched no upstream tarball: {why}")
            res = _run(
                ["tar", "-xaf", str(origs[0]), "--wildcards", "*/include/qemu/qemu-plugin.h"], Path(tmp)
            )
            found = sorted(Path(tmp).glob("*/include/qemu/qemu-plugin.h"))
            if res.returncode != 0 or not found:
                raise ConfigError(f"{origs[0].name} has no include/qemu/qemu-plugin.h: {_last_line(res)}")
            part = base / "qemu-plugin.h.part"
            shutil.copyfile(found[0], part)
            part.replace(header)
    return header


def build_plugin(cache_dir: Path) -> Path:
    """The compiled plugin (a shared object), built once per (source, header) content."""
    header = plugin_header(cache_dir)
    for tool, pkg in (("gcc", "gcc"), ("pkg-config", "pkg-config")):
        if shutil.which(tool) is None:
            raise ConfigError(
                f"building the watch plugin needs {tool}: apt-get install {pkg} (scripts/setup.sh)"
            )
    glib = _run(["pkg-config", "--cflags", "--libs", "glib-2.0"])
    glib_version = _run(["pkg-config", "--modversion", "glib-2.0"]).stdout.strip()
    if glib.returncode != 0 or not glib_version:
        raise ConfigError("building the watch plugin needs glib's headers: apt-get install libglib2.0-dev")
    # the host's C library and glib are part of the key: a container of another suite
    # sharing this cache builds its own (a newer glibc's build does not load on an older one)
    libc = os.confstr("CS_GNU_LIBC_VERSION") or "?"
    h = hashlib.sha256()
    for piece in (SOURCE.read_bytes(), header.read_bytes(), libc.encode(), glib_version.encode()):
        h.update(len(piece).to_bytes(8, "little") + piece)
    out_dir = cache_dir / "qemu-plugin" / h.hexdigest()[:16]
    lib = out_dir / "cr3watch.so"
    if lib.exists():
        return lib
    with locked(out_dir / ".lock"):
        if lib.exists():
            return lib
        part = out_dir / "cr3watch.so.part"
        argv = [
            "gcc", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror", "-shared", "-fPIC",
            f"-I{header.parent}", *glib.stdout.split(), "-o", str(part), str(SOURCE), "-lpthread",
        ]  # fmt: skip
        res = _run(argv)
        if res.returncode != 0:
            raise ConfigError(f"compiling {SOURCE.name} failed: {_last_line(res)}")
        part.replace(lib)
    return lib


def qemu_version(qemu: str) -> tuple[int, int, int] | None:
    """``qemu``'s release from ``--version`` (None: it printed none)."""
    try:
        res = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False, timeout=30)
    except OSError:
        return None
    m = _VERSION.search(res.stdout)
    return None if m is None else (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


def plugin_support(qemu: str) -> str | None:
    """None if ``qemu`` can load the watch plugin, else why not (one line, naming the fix)."""
    version = qemu_version(qemu)
    if version is None:
        return f"{qemu} printed no version (is it qemu-system-x86_64?)"
    if version[:2] < MIN_QEMU:
        have = ".".join(map(str, version))
        return (
            f"plugin watch needs QEMU >= {MIN_QEMU[0]}.{MIN_QEMU[1]} (TCG plugin API 4: register and "
            f"guest-memory reads); {qemu} is QEMU {have}: pass "
            "--qemu $(python -m rig.supply.qemu bookworm-backports)"
        )
    return None


#: QEMU's own words when a plugin's API version is outside what it loads
#: (``plugins/loader.c``: "plugin requires API version 4, but this QEMU supports only a
#: minimum version of 7").
_API_REFUSED = re.compile(r"plugin requires API version \d+, but this QEMU supports only [^\n]*")


def api_refusal(qemu: str, lib: Path) -> str | None:
    """QEMU's line refusing ``lib``'s plugin API version, or None if ``qemu`` accepts it.

    Loads ``lib`` into ``qemu`` with no machine (``-machine none``, nothing boots): QEMU
    checks the version a plugin declares before it installs it, so the plugin's own
    refusal of its missing arguments that follows says the version was accepted.
    """
    argv = [qemu, "-machine", "none", "-display", "none", "-nodefaults", "-S", "-monitor", "stdio"]
    try:
        res = subprocess.run(
            [*argv, "-plugin", str(lib)], input="quit\n", capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{qemu} could not be asked to load the plugin: {exc}"
    m = _API_REFUSED.search(res.stderr + res.stdout)
    return None if m is None else m.group(0).strip()


class PluginRefused(ConfigError):
    """Plugin watch cannot run because a QEMU here refuses the plugin's API version (and no
    QEMU that loads it could be had): what the QEMU said, whatever the kernel."""


def _usable(qemu: str, cache_dir: Path) -> tuple[str | None, bool]:
    """(None, False) if ``qemu`` can run plugin watch with the plugin built here, else why
    not and whether it was ``qemu`` refusing the plugin's API version."""
    why = plugin_support(qemu)
    if why is not None:
        return why, False
    refused = api_refusal(qemu, build_plugin(cache_dir))
    if refused is None:
        return None, False
    header = plugin_header(cache_dir)
    return (
        f"{qemu} refuses the plugin built against {HEADER_SUITE}' qemu-plugin.h ({header}): {refused}",
        True,
    )


def plugin_qemu(qemu: str, cache_dir: Path) -> tuple[str, str]:
    """The QEMU to run plugin watch with, and a note saying why when it is not ``qemu``.

    ``qemu`` itself when it can load the plugin; otherwise :data:`HEADER_SUITE`'s QEMU
    (:func:`rig.supply.qemu.fetch_qemu`: fetched once into the cache, run beside the
    system's), so that the default run on Debian bookworm (QEMU 7.2) watches with the
    plugin too. Raises :class:`ConfigError` (one line, both reasons) when neither can: a
    :class:`PluginRefused` when either QEMU refused the plugin's API version.
    """
    why, refused = _usable(qemu, cache_dir)
    if why is None:
        return qemu, ""
    from rig.supply.qemu import fetch_qemu  # the fallback only; keeps this module light

    error = PluginRefused if refused else ConfigError
    try:
        other = str(fetch_qemu(HEADER_SUITE, cache_dir))
    except ConfigError as exc:
        raise error(f"{why}; fetching {HEADER_SUITE}' QEMU failed: {exc}") from None
    why_not, refused_too = _usable(other, cache_dir)
    if why_not is not None:
        error = PluginRefused if refused or refused_too else ConfigError
        raise error(f"{why}; and {HEADER_SUITE}' QEMU cannot either: {why_not}")
    have, used = (".".join(map(str, qemu_version(q) or ())) for q in (qemu, other))
    return (
        other,
        f"{qemu} is QEMU {have}, which cannot load the plugin built here ({why}): "
        f"plugin watch runs on {HEADER_SUITE}' QEMU {used}",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rig.supply.qemuplugin [QEMU]``: fetch what plugin watch needs (the QEMU to
    run it with, the header, the built plugin) into the cache and print the QEMU and plugin
    paths; 1 with the reason if it cannot."""
    import sys

    from rig.supply.cache import default_cache_dir

    args = list(sys.argv[1:] if argv is None else argv)
    cache = default_cache_dir()
    try:
        qemu, note = plugin_qemu(args[0] if args else "qemu-system-x86_64", cache)
        lib = build_plugin(cache)
    except ConfigError as exc:
        print(f"cr3rig: plugin watch: {exc}", file=sys.stderr)
        return 1
    print(f"{qemu}\n{lib}" + (f"\n({note})" if note else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
