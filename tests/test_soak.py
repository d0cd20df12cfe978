"""The soak command: one real run of two testcases on the stock kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_soak_prints_verdict_steps_and_leftovers(tag: str, tmp_path: Path) -> None:
    args = ["--kernel", "debian", "-k", "test_syscall_entry_flips or test_user_tables_map_cpu_entry_area"]
    res = subprocess.run(
        [sys.executable, "-m", "rig.tools.soak", "1", "--workdir", str(tmp_path), "--", *args],
        cwd=REPO,
        env=dict(os.environ, CR3RIG_TEST_TAG=tag),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "run 1/1: PASS" in out and "2 passed, 0 failed, 0 error" in out, out
    assert "leftover processes: 0" in out, out
    row = next(ln for ln in out.splitlines() if "test_syscall_entry_flips_cr3_at_mov_to_cr3" in ln)
    fail, tries_max, _, max_steps, _ = row.split()[1:]
    assert (fail, tries_max) == ("0", "1") and int(max_steps) > 10, row
    assert (tmp_path / "run-1.xml").exists() and (tmp_path / "run-1.log").exists()
