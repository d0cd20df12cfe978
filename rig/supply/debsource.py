"""Debian kernel source packages, fetched with apt through a private configuration.

Under ``<kernels>/debian/<suite>/``: a ``sources.list`` naming the system's Debian
mirror (``/etc/apt`` is only read), ``lists/``, ``cache/`` and the downloaded ``.deb``
in ``debs/``. A downloaded package is reused, offline, until ``refresh`` asks for the
newest version again.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from rig.supply.buildrun import BuildRunner
from rig.supply.cache import locked

#: Used when the system's APT sources name no Debian mirror.
_DEFAULT_MIRROR = "http://deb.debian.org/debian"
_DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
_ARCHIVE_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


class SourcePackage(Protocol):
    """What is fetched: a binary package shipping ``usr/src/<package>.tar.*``, from a suite."""

    @property
    def suite(self) -> str: ...

    @property
    def package(self) -> str: ...


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


def apt_options(apt_dir: Path) -> list[str]:
    """apt-get options for a private configuration in ``apt_dir`` (sources.list, lists/, cache/)."""
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


def deb_version(deb: Path, runner: BuildRunner) -> str:
    return runner.run(["dpkg-deb", "-f", str(deb), "Version"], what="dpkg-deb").strip()


def fetch_package(flavor: SourcePackage, kernels: Path, *, refresh: bool, runner: BuildRunner) -> Path:
    """Return the flavor's ``.deb``, downloading it if missing or if ``refresh``."""
    apt_dir = kernels / "debian" / flavor.suite
    debs_dir = apt_dir / "debs"
    with locked(apt_dir / ".lock"):
        debs = sorted(debs_dir.glob(f"{flavor.package}_*.deb"))
        if debs and not refresh:
            return debs[-1]
        (apt_dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (apt_dir / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (apt_dir / "sources.list").write_text(_sources_list(flavor.suite))
        opts = apt_options(apt_dir)
        runner.say(f"kernelbuild: apt-get update ({flavor.suite})")
        runner.run(["apt-get", "-q", *opts, "update"], what="apt-get update")
        download = Path(tempfile.mkdtemp(prefix="download-", dir=apt_dir))
        try:
            runner.say(f"kernelbuild: apt-get download {flavor.package}")
            runner.run(
                ["apt-get", "-q", *opts, "download", flavor.package],
                what="apt-get download",
                cwd=download,
            )
            new = sorted(download.glob(f"{flavor.package}_*.deb"))
            if not new:
                raise runner.fail(f"apt-get download {flavor.package} produced no .deb")
            debs_dir.mkdir(parents=True, exist_ok=True)
            target = debs_dir / new[0].name
            os.replace(new[0], target)
        finally:
            shutil.rmtree(download, ignore_errors=True)
        for old in debs_dir.glob(f"{flavor.package}_*.deb"):
            if old != target:
                old.unlink()
        return target
