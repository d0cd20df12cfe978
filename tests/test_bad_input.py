"""Bad input: a one-line error naming the problem and the fix, fast, nothing left behind.

Each case runs ``pytest testcases/`` in a child process the way a user would.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from rig.errors import ConfigError
from rig.transport.qemu import COMMAND_LINE_SIZE, check_cmdline_length
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


#: A real ELF for another architecture, shipped with QEMU (qemu-system-data).
RISCV_ELF = Path("/usr/share/qemu/opensbi-riscv64-generic-fw_dynamic.elf")


@pytest.fixture(scope="module")
def small_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unstripped x86-64 ELF (with .symtab) built here: not a kernel, but a valid ELF."""
    d = tmp_path_factory.mktemp("elf")
    (d / "x.c").write_text("int answer(void) { return 42; }\nint main(void) { return answer(); }\n")
    subprocess.run(["gcc", "-g", "-o", str(d / "x"), str(d / "x.c")], check=True)
    return d / "x"


def _static_case(tag: str, args: list[str]) -> tuple[str, float, str]:
    """Run the child; return (its output, seconds, the one ERROR line)."""
    t0 = time.monotonic()
    res = run_pytest(args, tag)
    elapsed = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode == 4, out[-2000:]  # a usage error: before collection, no boot
    errors = [ln for ln in out.splitlines() if ln.startswith("ERROR: ")]
    assert len(errors) == 1 and "Traceback" not in out, out[-2000:]
    return out, elapsed, errors[0]


def test_static_checks_do_not_boot(tag: str, tmp_path: Path, small_elf: Path) -> None:
    """Each bad input is one line, naming the problem and the fix, before anything boots."""
    truncated = tmp_path / "vmlinux-truncated"
    truncated.write_bytes(small_elf.read_bytes()[:4000])
    junk = tmp_path / "vmlinux-junk"
    junk.write_bytes(b"not an ELF at all\n" * 100)
    stripped = tmp_path / "vmlinux-stripped"
    subprocess.run(["strip", "-o", str(stripped), str(small_elf)], check=True)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        (["--vmlinux", str(truncated)], ["truncated", "pass the unstripped vmlinux"]),
        (["--vmlinux", str(junk)], ["not an ELF file", "pass the unstripped vmlinux"]),
        (["--vmlinux", str(stripped)], ["no symbol table", "pass the unstripped vmlinux"]),
        (["--vmlinux", str(RISCV_ELF)], ["ELF64 for RISCV, not x86-64", "pass the unstripped vmlinux"]),
        (["--kernel", str(RISCV_ELF)], ["ELF64 for RISCV, not x86-64", "pass a bzImage or vmlinux"]),
        (["--append", "x" * 3000], ["command line is 3", "2047", "shorten --append"]),
        (["--boot-timeout", "0"], ["--boot-timeout 0", "more than 0 seconds"]),
        (["--boot-timeout", "-5"], ["--boot-timeout -5", "more than 0 seconds"]),
        (["--trace-dir", str(a_file / "traces")], ["trace directory", "Not a directory", "--trace-dir"]),
        (["--cr3rig-cache", str(a_file / "cache")], ["cache directory", "Not a directory", "--cr3rig-cache"]),
    ]
    for args, needles in cases:
        _, elapsed, line = _static_case(tag, args)
        for needle in needles:
            assert needle in line, (args[0], needle, line)
        assert elapsed < 10, f"{args[0]}: {elapsed:.1f} s"


def test_cmdline_at_the_limit_is_accepted() -> None:
    check_cmdline_length("x" * (COMMAND_LINE_SIZE - 1))
    with pytest.raises(ConfigError, match="2048 bytes"):
        check_cmdline_length("x" * COMMAND_LINE_SIZE)


#: Bound for the cases that start QEMU/GDB once: 1-3 s on an idle machine (the target is
#: under 10 s); resolving ``--kernel debian`` (apt-cache) alone took 7 s at load 15 here.
BOOT_CASE_SECONDS = 20


def _boot_case(tag: str, args: list[str], kernel: list[str] | None = None) -> tuple[str, float]:
    """Run the child (on the stock kernel unless ``kernel`` gives other options); return
    (the one line that ends it, seconds)."""
    t0 = time.monotonic()
    res = run_pytest([*(["--kernel", "debian"] if kernel is None else kernel), *args], tag)
    elapsed = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in out, out[-2000:]
    lines = [ln for ln in out.splitlines() if "Exit: cr3rig: " in ln]  # the line that ends the session
    assert len(lines) == 1, out[-2000:]
    return lines[0], elapsed


def test_qemu_that_exits_silently(tag: str) -> None:
    line, elapsed = _boot_case(tag, ["--qemu", "/bin/false"])
    assert "QEMU (/bin/false) exited at start with status 1 and printed nothing; check --qemu" in line
    assert elapsed < BOOT_CASE_SECONDS, f"{elapsed:.1f} s"


def test_qemu_error_line_is_quoted(tag: str, small_elf: Path) -> None:
    # an x86-64 ELF that is no kernel passes the static check; QEMU itself refuses it
    line, elapsed = _boot_case(tag, ["--kernel", str(small_elf)])
    assert "QEMU exited at start with status 1: qemu-system-x86_64: Error loading uncompressed kernel" in line
    assert elapsed < BOOT_CASE_SECONDS, f"{elapsed:.1f} s"


def test_gdb_that_exits_silently(tag: str) -> None:
    line, elapsed = _boot_case(tag, ["--gdb", "/bin/true"])
    assert (
        "gdb (/bin/true) exited with status 0 while running '-gdb-set mi-async on'; it printed nothing"
        in line
    )
    assert "check --gdb" in line
    assert elapsed < BOOT_CASE_SECONDS, f"{elapsed:.1f} s"


def test_gdb_death_quotes_its_last_output(tag: str, tmp_path: Path) -> None:
    fake = tmp_path / "gdb"
    fake.write_text("#!/bin/sh\necho 'fake-gdb: cannot load libpython' >&2\nexit 3\n")
    fake.chmod(0o755)
    line, elapsed = _boot_case(tag, ["--gdb", str(fake)])
    assert "exited with status 3" in line and "its last output: fake-gdb: cannot load libpython" in line
    assert elapsed < BOOT_CASE_SECONDS, f"{elapsed:.1f} s"


def test_vmlinux_that_does_not_match(tag: str, small_elf: Path) -> None:
    """An unstripped x86-64 ELF that is not the kernel's vmlinux passes the static check
    (it has a .symtab; a stripped one, e.g. /bin/true, stops there: "no symbol table",
    test_static_checks_do_not_boot). It is found out after one boot of the default kernel,
    when the rig looks for the kernel's symbols in it, and the session ends on one line."""
    line, elapsed = _boot_case(tag, ["--vmlinux", str(small_elf)], kernel=[])
    assert f"cr3rig: --vmlinux {small_elf} does not match the running kernel: " in line, line
    missing = "linux_banner, __start_notes, __stop_notes, __per_cpu_offset, entry_SYSCALL_64, init_task"
    assert f"it has no {missing}; pass the unstripped vmlinux of this build" in line, line
    assert elapsed < BOOT_CASE_SECONDS, f"{elapsed:.1f} s"
