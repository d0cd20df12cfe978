"""rig.tools.tcgorder and the ``sb-litmus`` workload: the result line, its parser, the runs.

The parser and the thread wrapper are checked here without a guest; the workload runs on
the stock kernel booted once (conftest's ``booted``, TCG): it must print one well-formed
line, and with MFENCE on both sides (variant b) it must never show the relaxed outcome.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rig import protocol
from rig.errors import ConfigError, GuestError
from rig.guest import Guest
from rig.supply import initramfs
from rig.tools.tcgorder import (
    SB_MARKER,
    VARIANTS,
    WORKLOAD,
    OrderingRun,
    SbLineError,
    SbResult,
    main,
    measure,
    parse_sb_line,
    render_table,
    run_variant,
    thread_wrapper,
    vcpu_threading,
)

LINE = "CR3RIG-SB variant=a n=1000000 relaxed=12 old0=3012 old1=2950 seconds=4.213 cpus=1,0"

# --------------------------------------------------------------------------
# The parser


def test_parse_line() -> None:
    r = parse_sb_line(f"CR3RIG-WORKLOAD {WORKLOAD} cpu=1 pid=77\n{LINE}\n")
    assert r == SbResult("a", 1_000_000, 12, 3012, 2950, 4.213, (1, 0))
    assert r.both_new == 1_000_000 - 3012 - 2950 + 12


def test_parse_line_with_console_noise() -> None:
    assert parse_sb_line(f"\r\n  {LINE}  \r\nmore\n").relaxed == 12


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "no CR3RIG-SB line"),
        ("sb-litmus: bad variant 'x'\n", "no CR3RIG-SB line"),
        (f"{LINE}\n{LINE}\n", "2 CR3RIG-SB line"),
        (LINE.replace(" relaxed=12", ""), "lacks relaxed"),
        (LINE.replace("relaxed=12", "relaxed=x"), "malformed number"),
        (LINE.replace("cpus=1,0", "cpus=1"), "malformed number"),
        (LINE.replace("seconds=4.213", "seconds=soon"), "malformed number"),
        (LINE.replace("variant=a", "variant=z"), "unknown variant"),
        (LINE.replace("relaxed=12", "relaxed=3013"), "do not add up"),  # more than old1
        (LINE.replace("old0=3012", "old0=1000001"), "do not add up"),
        (LINE.replace("n=1000000", "n=0"), "do not add up"),
        (LINE.replace("n=1000000", "n=5000"), "do not add up"),  # old0 + old1 - relaxed > n
    ],
)
def test_parse_rejects(text: str, why: str) -> None:
    with pytest.raises(SbLineError, match=why) as info:
        parse_sb_line(text)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, GuestError)


def test_marker_matches_the_workload_source() -> None:
    source = (initramfs.SOURCE_DIR / "workloads" / f"{WORKLOAD}.c").read_text()
    fields = "variant=%s n=%ld relaxed=%ld old0=%ld old1=%ld seconds=%.3f cpus=%d,%d"
    assert f'"{SB_MARKER} {fields}\\n"' in source
    assert WORKLOAD in initramfs.WORKLOADS
    for v in VARIANTS:
        assert f'strcmp(variant, "{v}")' in source


def test_forbidden_variants_and_table() -> None:
    results = tuple(SbResult(v, 10, 1 if v == "a" else 0, 5, 5, 0.5, (1, 0)) for v in VARIANTS)
    run = OrderingRun("7.2.22", "tcg", "multi", "reference-7.2", True, results)
    assert [v for v in VARIANTS if run.forbidden(v)] == ["b", "c"]
    assert run.violations() == []
    nopti = OrderingRun("7.2.22", "tcg", "multi", "k", False, results)
    assert [v for v in VARIANTS if nopti.forbidden(v)] == ["b"]
    bad = OrderingRun("10.0.2", "tcg", "single", "k", True, (SbResult("b", 10, 2, 5, 5, 0.1, (1, 0)),))
    assert bad.violations() == list(bad.results)
    table = render_table([run, bad]).splitlines()
    assert len(table) == 2 + len(VARIANTS) + 1
    assert table[2] == "| a | none / none | allowed | 10 | 1 | 5 | 5 | 0.50 | 7.2.22 | tcg, thread=multi |"
    assert "| b | MFENCE / MFENCE | forbidden | 10 | 2 |" in table[-1] and "thread=single" in table[-1]


# --------------------------------------------------------------------------
# The --tcg-thread wrapper (a fake QEMU prints its arguments)


@pytest.mark.parametrize("thread", ["single", "multi"])
def test_thread_wrapper(tmp_path: Path, thread: str) -> None:
    fake = tmp_path / "fake qemu"
    fake.write_text('#!/bin/sh\nfor a do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(thread_wrapper(str(fake), thread))
    wrapper.chmod(0o755)
    argv = ["-accel", "tcg", "-append", "a tcg b", "-name", "tcg", "-cpu", "max"]
    out = subprocess.run([str(wrapper), *argv], capture_output=True, text=True, check=True).stdout
    expected = ["-accel", f"tcg,thread={thread}", *argv[2:]]
    assert out.splitlines() == expected
    assert subprocess.run([str(wrapper), "--version"], capture_output=True, text=True).stdout == "--version\n"


def test_thread_wrapper_refuses_other_modes() -> None:
    with pytest.raises(ConfigError):
        thread_wrapper("qemu-system-x86_64", "dual")


@pytest.mark.parametrize(
    "argv",
    [["--n", "0"], ["--variant", "e"], ["--variant", "a=x"], ["--cpus", "1,1"], ["--cpus", "1"]],
)
def test_bad_options(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tcg-thread", "single", "--accel", "kvm"], "--tcg-thread needs a local QEMU with --accel tcg"),
        (["--cpus", "2,0"], "--cpus 2,0: the guest has vCPUs 0 and 1"),
        (["--kernel", "/nonexistent"], "--kernel /nonexistent: no such file"),
    ],
)
def test_refused_before_boot(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tcgorder: {message}") and err.count("\n") == 1, err


# --------------------------------------------------------------------------
# On a booted guest (the stock kernel under TCG)


@pytest.mark.boots
def test_workload_prints_one_line(booted: Guest) -> None:
    r = run_variant(booted, "a", 2000, timeout=120)
    assert (r.variant, r.n, r.cpus) == ("a", 2000, (1, 0))
    assert 0 <= r.relaxed <= min(r.old0, r.old1) and r.both_new >= 0
    out, status = booted.shell(f"/bin/{WORKLOAD} c 50 0 1")
    assert status == 0, out
    lines = out.splitlines()
    assert lines[0].startswith(f"{protocol.WORKLOAD_MARKER} {WORKLOAD} cpu=0 pid=")
    assert lines[1].startswith(f"{SB_MARKER} variant=c n=50 relaxed=0 ") and lines[1].endswith(" cpus=0,1")
    assert len(lines) == 2


@pytest.mark.boots
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("", "usage: sb-litmus"),
        ("x 10", "bad variant 'x'"),
        ("a 0", "bad iteration count '0'"),
        ("a 10 1 1", "two different CPUs"),
        ("a 10 1 5", "sched_setaffinity(cpu 5) failed"),
    ],
)
def test_workload_bad_arguments(booted: Guest, args: str, message: str) -> None:
    out, status = booted.shell(f"/bin/{WORKLOAD} {args}")
    assert status == 2, out
    assert message in out


@pytest.mark.boots
def test_mfence_forbids_the_relaxed_outcome(booted: Guest) -> None:
    """Variant b, MFENCE on both sides, never ends with both loads reading the old value;
    the run is long enough that its two sides overlap (both loads read the new value)."""
    run = measure(booted, 200_000, ["b"], timeout=300)
    (r,) = run.results
    assert r.relaxed == 0, r
    assert r.both_new > 0, f"the two vCPUs never overlapped: {r}"
    assert run.threading == vcpu_threading(booted) == "multi", "QEMU's default TCG is multi-threaded here"
    assert run.accel == "tcg" and run.pti
    print(render_table([run]))
