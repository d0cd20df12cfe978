"""A QEMU from another Debian suite on this host, for ``--qemu`` (no container needed).

``bookworm-backports`` carries QEMU 10.0 built for bookworm's libraries: its packages
``qemu-system-x86``, ``qemu-system-common`` and ``qemu-system-data`` are fetched with a
private APT configuration (the system's ``/etc/apt`` is only read, for the mirror),
unpacked with ``dpkg -x`` (nothing is installed), and given a wrapper script that adds
``-L <unpacked>/usr/share/qemu -L /usr/share/qemu`` so QEMU finds its own firmware and
option ROMs::

    wrapper = fetch_qemu("bookworm-backports")       # <cache>/qemu/<suite>/<version>/qemu-system-x86_64
    pytest testcases/ --qemu "$(python -m rig.supply.qemu bookworm-backports)"

Suites whose QEMU links against newer libraries (trixie, sid) fail the wrapper's
``--version`` check with a one-line error: run those in the container matrix
(:mod:`rig.tools.matrix`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rig.errors import ConfigError
from rig.supply.cache import default_cache_dir
from rig.supply.debsource import apt_options
from rig.supply.kernelbuild import system_mirrors

__all__ = ["PACKAGES", "fetch_qemu", "main", "wrapper_script"]

#: The packages that make a working qemu-system-x86_64 (binary, common files, firmware).
PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data")
_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


def wrapper_script(root: Path) -> str:
    """A shell wrapper running ``root``'s qemu-system-x86_64 with its own data directory first."""
    return (
        "#!/bin/sh\n"
        f"# qemu-system-x86_64 unpacked under {root} (rig.supply.qemu)\n"
        f'exec "{root}/usr/bin/qemu-system-x86_64" -L "{root}/usr/share/qemu" -L /usr/share/qemu "$@"\n'
    )


def _run(argv: Sequence[str], what: str, cwd: Path | None = None) -> str:
    res = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
        raise ConfigError(f"{what} failed: {lines[-1] if lines else f'exit {res.returncode}'}")
    return res.stdout


def fetch_qemu(suite: str = "bookworm-backports", cache_dir: Path | None = None) -> Path:
    """Return the path of a wrapper for ``suite``'s qemu-system-x86_64, fetching it once.

    Raises :class:`ConfigError` (one line) if apt cannot fetch it or it does not run here.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise ConfigError("fetching a QEMU needs apt-get and dpkg (a Debian host)")
    base = (cache_dir or default_cache_dir()) / "qemu" / suite
    apt = base / "apt"
    (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = sorted(base.glob("*/qemu-system-x86_64"))
        if done:
            return _checked(done[-1])
        mirror, _ = system_mirrors()
        signed = f"[signed-by={_KEYRING}] " if _KEYRING.exists() else ""
        (apt / "sources.list").write_text(f"deb {signed}{mirror} {suite} main\n")
        opts = apt_options(apt)
        _run(["apt-get", "-q", *opts, "update"], f"apt-get update ({suite})")
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            what = f"apt-get download {' '.join(PACKAGES)}"
            _run(["apt-get", "-q", *opts, "download", *PACKAGES], what, Path(tmp))
            debs = sorted(Path(tmp).glob("*.deb"))
            version = _run(["dpkg-deb", "-f", str(debs[0]), "Version"], "dpkg-deb").strip()
            dest = base / version.replace(":", "_")
            root = dest / "root"
            for deb in debs:
                _run(["dpkg", "-x", str(deb), str(Path(tmp) / "root")], f"dpkg -x {deb.name}")
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            os.replace(Path(tmp) / "root", root)
        wrapper = dest / "qemu-system-x86_64"
        wrapper.write_text(wrapper_script(root))
        wrapper.chmod(0o755)
        return _checked(wrapper)


def _checked(wrapper: Path) -> Path:
    """``wrapper`` if its QEMU starts (``--version``); a one-line error naming the fix otherwise."""
    res = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        raise ConfigError(
            f"{wrapper} does not run on this host ({lines[-1] if lines else res.returncode}); "
            "its libraries need that suite: run it in the container matrix (python -m rig.tools.matrix)"
        )
    return wrapper


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rig.supply.qemu [SUITE]``: print the wrapper's path (fetching once)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        print(fetch_qemu(args[0] if args else "bookworm-backports"))
    except ConfigError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
