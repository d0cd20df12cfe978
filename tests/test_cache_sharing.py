"""Two pytest sessions sharing one cache at the same time both pass, and leave it whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rig.supply.kernel import Kernel
from tests.conftest import REPO


def test_two_sessions_fill_one_cold_cache_at_once(tag: str, tmp_path: Path, stock_kernel: Kernel) -> None:
    """Both build the initramfs and read /proc/kallsyms into the same empty cache at
    once. (The stock kernel's 400 MB unpacked package is linked in, not fetched again.)"""
    cache = tmp_path / "cache"
    package = next(p for p in stock_kernel.image.parents if p.parent.name == "debian")  # <cache>/debian/<pkg>
    (cache / "debian").mkdir(parents=True)
    (cache / "debian" / package.name).symlink_to(package)
    env = dict(os.environ, CR3RIG_TEST_TAG=tag, CR3RIG_CACHE=str(cache))
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "testcases/test_pti_tables.py",  # one boot each: enough to read /proc/kallsyms
        "--kernel",
        "debian",
    ]
    children = [
        subprocess.Popen(
            [*argv, f"--trace-dir={tmp_path / f'results-{n}'}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in (1, 2)
    ]
    outs = [c.communicate(timeout=600)[0] for c in children]
    for child, out in zip(children, outs, strict=True):
        assert child.returncode == 0, out[-3000:]
        assert " passed" in out.splitlines()[-1], out[-1000:]
    initramfs = list((cache / "initramfs").iterdir())
    assert len(initramfs) == 1 and initramfs[0].name.endswith(".cpio.gz"), initramfs
    kallsyms = list((cache / "kallsyms").iterdir())
    assert len(kallsyms) == 1 and kallsyms[0].suffix == ".json", kallsyms
    assert kallsyms[0].stat().st_size > 1_000_000
