"""The disk filling up while a kernel build is stored: no half-written cache entry.

A real tmpfs of 2 MiB is mounted for the test (and unmounted after); the build results
stored into it are larger than that.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rig.supply.kernelbuild import KernelBuildError, _complete, _store


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "cr3rig-test", str(mnt)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here ({res.stderr.strip()}): needs root or CAP_SYS_ADMIN")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _fake_build(root: Path, vmlinux_bytes: int) -> Path:
    """A build directory with the files a kernel build leaves (random contents)."""
    (root / "arch" / "x86" / "boot").mkdir(parents=True)
    (root / "vmlinux").write_bytes(os.urandom(vmlinux_bytes))
    (root / "arch" / "x86" / "boot" / "bzImage").write_bytes(os.urandom(64 * 1024))
    (root / ".config").write_text("CONFIG_64BIT=y\n")
    return root


def test_disk_full_while_storing_a_build_leaves_no_entry(tmp_path: Path, small_fs: Path) -> None:
    builds = small_fs / "builds"
    builds.mkdir()
    out = builds / "0123abcd"
    big = _fake_build(tmp_path / "big", 4 * 1024 * 1024)  # 4 MiB: cannot fit in 2 MiB
    with pytest.raises(KernelBuildError) as err:
        _store(big, out, {"key": "0123abcd"})
    assert "No space left on device" in str(err.value) and "free space there" in str(err.value)
    assert "\n" not in str(err.value)
    assert list(builds.iterdir()) == [], "a half-written entry (or its temp dir) was left behind"
    # once there is room the same store gives a whole entry
    small = _fake_build(tmp_path / "small", 256 * 1024)
    _store(small, out, {"key": "0123abcd"})
    assert _complete(out) and [p.name for p in builds.iterdir()] == ["0123abcd"]
