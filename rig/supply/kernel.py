"""Which kernel to boot: resolve ``--kernel`` to a kernel image (and maybe a vmlinux).

* ``reference-7.2`` (the default) / ``reference-6.1``: the reference kernel with the
  CR3-signal patch series, built from Debian's kernel source package by
  :mod:`rig.supply.kernelbuild` and cached; symbols from its vmlinux.
* ``debian``: Debian's stock
  ``linux-image-amd64`` of the running release, fetched with ``apt-get download`` into
  the cache. Its symbols come from the guest's /proc/kallsyms (the debug vmlinux is an
  858 MB download plus 2 GB of GDB indexing: not affordable per run).
  :func:`stock_kernel_of_version` finds the stock kernel of another release's version
  (sid's for reference-7.2) through a private APT configuration of that suite.
* a path to a bzImage or vmlinux; a vmlinux beside a bzImage in a build tree
  (``<tree>/arch/x86/boot/bzImage`` -> ``<tree>/vmlinux``) is used for symbols.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from rig.errors import ConfigError
from rig.supply.cache import locked

DEBIAN = "debian"
#: What ``--kernel`` means when it is not given.
DEFAULT_KERNEL = "reference-7.2"


@dataclass(frozen=True)
class Kernel:
    """A bootable kernel image, its vmlinux if known, and a label for reports."""

    image: Path
    vmlinux: Path | None
    label: str


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ConfigError(f"{argv[0]} not found: this needs a Debian system with apt") from None
    if res.returncode != 0:
        last = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
        raise ConfigError(f"`{' '.join(argv)}` failed: {last[0]}; run `apt-get update` first")
    return res.stdout


def _depends(apt_cache_depends: str) -> list[str]:
    """The package names on ``Depends:`` lines of ``apt-cache depends`` output."""
    return [
        ln.split(":", 1)[1].strip()
        for ln in apt_cache_depends.splitlines()
        if ln.strip().startswith("Depends:") and not ln.split(":", 1)[1].strip().startswith("<")
    ]


def stock_packages(image_pkg: str, image_depends: str) -> list[str]:
    """The packages that hold the stock kernel ``image_pkg`` (``linux-image-<release>``).

    Up to trixie the image package holds ``/boot/vmlinuz-<release>`` itself. From forky
    (sid) on the kernel is split: ``linux-image-<release>`` only depends on
    ``linux-binary-<release>``, which holds ``/usr/lib/modules/<release>/vmlinuz``.
    ``image_depends`` is ``apt-cache depends <image_pkg>``.
    """
    release = image_pkg.removeprefix("linux-image-")
    return [image_pkg, *(d for d in _depends(image_depends) if d == f"linux-binary-{release}")]


def stock_image_path(root: Path, release: str) -> Path | None:
    """The kernel image inside unpacked stock packages (either layout), or None."""
    for rel in (f"boot/vmlinuz-{release}", f"usr/lib/modules/{release}/vmlinuz"):
        if (root / rel).is_file():
            return root / rel
    return None


#: Suites searched, after the system's own, for a stock kernel of a given version.
STOCK_SUITES = ("sid", "trixie", "bookworm-backports")


def _apt(cache_dir: Path, suite: str | None) -> list[str]:
    """apt options for ``suite`` (None: the system's configuration, unchanged): a private
    configuration in ``<cache>/debian/apt/<suite>``, its lists fetched once."""
    if suite is None:
        return []
    from rig.supply.debsource import _sources_list, apt_options

    apt_dir = cache_dir / "debian" / "apt" / suite
    opts = apt_options(apt_dir)
    with locked(apt_dir.with_name(f"{suite}.lock")):
        if not any((apt_dir / "lists").glob("*_Packages*")):
            (apt_dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
            (apt_dir / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
            (apt_dir / "sources.list").write_text(_sources_list(suite))
            _run(["apt-get", "-q", *opts, "update"])
    return opts


#: Where the system's APT keeps its package lists (``Dir::State::Lists``).
SYSTEM_APT_LISTS = Path("/var/lib/apt/lists")


def apt_lists_signature(lists: Path) -> list[list[object]]:
    """What an answer of APT about ``lists`` depends on: each package list's name, size
    and modification time (an ``apt-get update`` that changed one changes this)."""
    try:
        entries = sorted(os.scandir(lists), key=lambda e: e.name)
    except OSError:
        return []
    return [
        [e.name, e.stat().st_size, e.stat().st_mtime_ns]
        for e in entries
        if e.is_file() and "_Packages" in e.name
    ]


def stock_release(cache_dir: Path, suite: str | None = None) -> str:
    """The release of ``suite``'s ``linux-image-amd64`` (None: the system's).

    ``apt-cache`` takes most of a second a suite; the answer is kept in
    ``<cache>/debian/stock-releases.json`` with the signature of the package lists it
    came from (:func:`apt_lists_signature`), and asked again when they changed.
    """
    opts = _apt(cache_dir, suite)
    lists = SYSTEM_APT_LISTS if suite is None else cache_dir / "debian" / "apt" / suite / "lists"
    signature = apt_lists_signature(lists)
    memo = cache_dir / "debian" / "stock-releases.json"
    key = suite or "system"
    known: dict[str, dict[str, object]] = {}
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if signature and isinstance(entry, dict) and entry.get("lists") == signature:
        return str(entry["release"])
    meta = _run(["apt-cache", *opts, "depends", "linux-image-amd64"])
    pkg = next((d for d in _depends(meta) if d.startswith("linux-image-")), None)
    if pkg is None:
        where = f" in {suite}" if suite else ""
        raise ConfigError(f"apt knows no linux-image-amd64 dependency{where}; run `apt-get update` first")
    release = pkg.removeprefix("linux-image-")
    if signature:
        with locked(memo.with_suffix(".lock")):
            try:
                known = json.loads(memo.read_text())
            except (OSError, ValueError):
                known = {}
            known[key] = {"lists": signature, "release": release}
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
            tmp.replace(memo)
    return release


def debian_stock_kernel(cache_dir: Path, suite: str | None = None) -> Kernel:
    """Debian's stock kernel of ``suite`` (None: this system's release), downloaded and
    unpacked once into the cache."""
    release = stock_release(cache_dir, suite)
    pkg = f"linux-image-{release}"
    root = cache_dir / "debian" / pkg
    image = stock_image_path(root, release)
    if image is None:
        with locked(cache_dir / "debian" / ".lock"):  # another session may be fetching it too
            if stock_image_path(root, release) is None:
                _fetch_stock(pkg, release, root, cache_dir / "debian" / "download", _apt(cache_dir, suite))
        image = stock_image_path(root, release)
        assert image is not None
    where = f"stock {suite}" if suite else "stock"
    return Kernel(image, None, f"debian {release} ({where}, unpatched)")


def major_minor(release: str) -> str:
    """``7.2`` of ``7.2.13``, ``7.2.13+deb14-amd64`` or ``6.1.0-57-amd64``."""
    return ".".join(release.split("-")[0].split("+")[0].split(".")[:2])


def stock_kernel_of_version(release: str, cache_dir: Path) -> Kernel | None:
    """Debian's stock kernel of the same version (major.minor) as ``release``: the
    system's, else that of the first of :data:`STOCK_SUITES` that ships one; None if none
    does."""
    want = major_minor(release)
    for suite in (None, *STOCK_SUITES):
        try:
            found = stock_release(cache_dir, suite)
        except ConfigError:
            continue
        if major_minor(found) == want:
            return debian_stock_kernel(cache_dir, suite)
    return None


def _fetch_stock(pkg: str, release: str, root: Path, dl: Path, opts: list[str] | None = None) -> None:
    """Download ``pkg`` (and the packages it needs) and unpack them to ``root`` (atomically:
    unpacked beside, then renamed). ``opts``: apt options of the suite it comes from."""
    opts = opts or []
    packages = stock_packages(pkg, _run(["apt-cache", *opts, "depends", pkg]))
    dl.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", *opts, "download", *packages], cwd=dl)
    tmp = root.with_name(root.name + ".tmp")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    for p in packages:
        debs = sorted(dl.glob(f"{p}_*.deb"))
        if not debs:
            raise ConfigError(f"apt-get download {p} left no .deb in {dl}")
        _run(["dpkg", "-x", str(debs[-1]), str(tmp)])
        for deb in debs:
            deb.unlink()
    if stock_image_path(tmp, release) is None:
        raise ConfigError(f"{' '.join(packages)} hold no vmlinuz for {release}; is this a Debian kernel?")
    # an entry without its image (an older rig unpacked only linux-image-*) is replaced
    subprocess.run(["rm", "-rf", str(root)], check=True)
    tmp.rename(root)


def is_named_kernel(spec: str | None) -> bool:
    """True for the ``--kernel`` names :func:`resolve_kernel` builds or fetches (none: the
    default, ``debian``, ``reference…``); False for a path."""
    return not spec or spec == DEBIAN or spec.startswith("reference")


def is_reference_kernel(spec: str | None) -> bool:
    """True for the kernels the rig builds with the CR3-signal series (the default and the
    ``reference…`` flavors): on them a missing signal or PTI is a broken build, not a skip."""
    return not spec or spec.startswith("reference")


def resolve_kernel(spec: str | None, vmlinux: Path | None, cache_dir: Path) -> Kernel:
    """Turn ``--kernel``/``--vmlinux`` into a :class:`Kernel` (downloading if needed)."""
    if not spec:
        spec = DEFAULT_KERNEL
    if spec == DEBIAN:
        stock = debian_stock_kernel(cache_dir)
        return Kernel(stock.image, vmlinux, stock.label)
    assert spec is not None
    if is_named_kernel(spec):
        from rig.supply.kernelbuild import build_kernel

        build = build_kernel(spec, cache_dir=cache_dir)
        return Kernel(build.bzimage, vmlinux or build.vmlinux, f"{spec} {build.source_version}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(
            f"--kernel {spec}: no such file; pass a bzImage/vmlinux path, 'debian' or a reference name"
        )
    if vmlinux is None:
        with open(path, "rb") as f:
            is_elf = f.read(4) == b"\x7fELF"
        if is_elf:
            vmlinux = path
        else:
            tree = path.parents[3] if len(path.parents) > 3 else path.parent
            for candidate in (path.parent / "vmlinux", tree / "vmlinux"):
                if candidate.is_file():
                    vmlinux = candidate
                    break
    return Kernel(path.resolve(), vmlinux, str(path))


def main() -> int:
    """``python -m rig.supply.kernel [SPEC]``: fetch/build the kernel and the initramfs into the cache."""
    import sys

    from rig.supply.cache import default_cache_dir
    from rig.supply.initramfs import build_initramfs

    spec = sys.argv[1] if len(sys.argv) > 1 else None
    cache = default_cache_dir()
    k = resolve_kernel(spec, None, cache)
    print(f"kernel: {k.image} ({k.label})")
    print(f"initramfs: {build_initramfs(cache)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
