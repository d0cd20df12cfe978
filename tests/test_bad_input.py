"""Bad input: a one-line error naming the problem and the fix, fast, nothing left behind.

Each case runs ``pytest testcases/`` in a child process the way a user would.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import run_pytest


def _one_line_error(out: str, needle: str) -> str:
    lines = [ln for ln in out.splitlines() if needle in ln]
    assert lines, f"no line mentions {needle!r}:\n{out[-2000:]}"
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needle", "fix"),
    [
        (["--kernel", "/nonexistent/bzImage"], "no such file", "bzImage"),
        (["--isolated-cpu", "2", "--smp", "2"], "outside --smp 2", "valid: 0..1"),
        (["--accel", "kvm"], "--accel kvm cannot run here", "--accel tcg"),
        (["--smp", "1"], "--smp 1", "at least 2"),
    ],
)
def test_bad_option_one_line_error(tag: str, args: list[str], needle: str, fix: str) -> None:
    t0 = time.monotonic()
    res = run_pytest(args, tag)
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    line = _one_line_error(res.stdout + res.stderr, needle)
    assert fix in line, line
    assert elapsed < 15, f"took {elapsed:.1f} s"


def test_garbage_kernel(tag: str, tmp_path: Path) -> None:
    junk = tmp_path / "bzImage"
    junk.write_bytes(os.urandom(4096))
    res = run_pytest(["--kernel", str(junk)], tag)
    assert res.returncode != 0
    line = _one_line_error(res.stdout + res.stderr, "neither a bzImage")
    assert "pass a bzImage or vmlinux" in line


@pytest.mark.parametrize(("opt", "package"), [("--qemu", "qemu-system-x86"), ("--gdb", "gdb")])
def test_missing_program(tag: str, opt: str, package: str) -> None:
    res = run_pytest([opt, "/nonexistent/prog", "-x"], tag)
    assert res.returncode != 0
    line = _one_line_error(res.stdout + res.stderr, "not found")
    assert f"apt-get install {package}" in line


def test_vmlinux_that_does_not_match(tag: str) -> None:
    # /bin/true is an ELF with a build-id and a symbol table of its own: not this kernel
    res = run_pytest(["--vmlinux", "/bin/true", "-x"], tag)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    line = next((ln for ln in out.splitlines() if "does not match" in ln or "no symbol table" in ln), "")
    assert line, out[-2000:]
    assert "vmlinux" in line
