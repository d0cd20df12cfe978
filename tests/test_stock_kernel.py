"""Debian's stock kernel packages across suites (rig.supply.kernel): both package layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from rig.supply.kernel import stock_image_path, stock_packages

# `apt-cache depends` as printed in the suites' containers (2026-11)
TRIXIE = """linux-image-6.12.118+deb13-amd64
  PreDepends: linux-base
 |Depends: initramfs-tools
  Depends: <linux-initramfs-tool>
    initramfs-tools
  Recommends: firmware-linux-free
"""
SID = """linux-image-7.2.13+deb14-amd64
  PreDepends: linux-base
 |Depends: dracut
 |Depends: initramfs-tools
  Depends: <linux-initramfs-tool>
    dracut
    initramfs-tools
    tiny-initramfs
  Depends: linux-base-7.2.13+deb14-amd64
  Depends: linux-binary-7.2.13+deb14-amd64
  Depends: linux-modules-7.2.13+deb14-amd64
  Breaks: initramfs-tools
  Suggests: linux-doc-7.2
"""


def test_split_packaging_adds_the_binary_package() -> None:
    assert stock_packages("linux-image-6.12.118+deb13-amd64", TRIXIE) == ["linux-image-6.12.118+deb13-amd64"]
    assert stock_packages("linux-image-7.2.13+deb14-amd64", SID) == [
        "linux-image-7.2.13+deb14-amd64",
        "linux-binary-7.2.13+deb14-amd64",
    ]


def test_image_found_in_either_layout(tmp_path: Path) -> None:
    assert stock_image_path(tmp_path, "7.2.13+deb14-amd64") is None
    old = tmp_path / "boot" / "vmlinuz-6.12.118+deb13-amd64"
    old.parent.mkdir()
    old.write_bytes(b"MZ")
    assert stock_image_path(tmp_path, "6.12.118+deb13-amd64") == old
    new = tmp_path / "usr" / "lib" / "modules" / "7.2.13+deb14-amd64" / "vmlinuz"
    new.parent.mkdir(parents=True)
    new.write_bytes(b"MZ")
    assert stock_image_path(tmp_path, "7.2.13+deb14-amd64") == new


def test_major_minor_of_every_release_form() -> None:
    from rig.supply.kernel import major_minor

    assert major_minor("7.2.13") == "7.2"
    assert major_minor("7.2.13+deb14-amd64") == "7.2"
    assert major_minor("6.1.0-57-amd64") == "6.1"
    assert major_minor("6.12.118+deb13-amd64") == "6.12"


def test_a_stock_kernel_of_the_same_version_comes_from_another_suite() -> None:
    """sid's stock 7.2 for a 7.2 kernel, the system's own for 6.1, none for 5.10 (real apt,
    private configurations in the cache; the downloads happen once)."""
    from rig.supply.cache import default_cache_dir
    from rig.supply.kernel import major_minor, stock_kernel_of_version, stock_release

    cache = default_cache_dir()
    system = stock_release(cache)
    same = stock_kernel_of_version(system, cache)
    assert same is not None and system in same.label and "stock, unpatched" in same.label
    other = stock_kernel_of_version("7.2.13", cache)
    assert other is not None and other.image.is_file(), other
    assert major_minor(other.label.split()[1]) == "7.2" and "stock sid" in other.label, other.label
    assert stock_kernel_of_version("5.10.0", cache) is None


def test_the_stock_release_is_asked_again_only_when_the_package_lists_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first answer comes from the real apt-cache; the next one from the memo while the
    lists are unchanged, and from apt-cache again once an `apt-get update` changed one."""
    import rig.supply.kernel as kernel

    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages").write_text("a")
    monkeypatch.setattr(kernel, "SYSTEM_APT_LISTS", lists)
    cache = tmp_path / "cache"
    first = kernel.stock_release(cache)
    assert first.startswith(("6.", "7.")), first
    asked: list[list[str]] = []

    def counting_run(argv: list[str], cwd: Path | None = None) -> str:
        asked.append(argv)
        return "linux-image-amd64\n  Depends: linux-image-9.9.9-1-amd64\n"

    monkeypatch.setattr(kernel, "_run", counting_run)
    assert kernel.stock_release(cache) == first and asked == []
    (lists / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages").write_text("ab")
    assert kernel.stock_release(cache) == "9.9.9-1-amd64" and len(asked) == 1
    assert kernel.stock_release(cache) == "9.9.9-1-amd64" and len(asked) == 1
