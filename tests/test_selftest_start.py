"""A selftest starts only once watch mode is armed, and nothing of the rig runs on the
housekeeping vCPU while it is watched. Real guests: the stock kernel (unwatched) and the
reference kernel (watched), the default initramfs with its selftest."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from rig.guest import Guest
from rig.machine.sites import SIGNAL, find_sites
from rig.observe import selftestwatch
from rig.supply.selftests import DEFAULT_SELFTESTS
from tests.conftest import reference_config

NAME = DEFAULT_SELFTESTS[0]
#: seconds the wrapper sleeps between printing its pid and reading its starting line
WINDOW = 2
TIMEOUT = 20.0


def test_a_starting_line_typed_before_the_wrapper_reads_it_is_kept(
    booted: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rig types the starting line as soon as the wrapper printed its pid; the
    wrapper made slow to read it (2 s) still gets it from the console's line discipline."""
    installed, why = selftestwatch.installed_selftests(booted)
    assert NAME in installed, why
    plain = selftestwatch._wrapper

    def slow_to_read(name: str) -> str:
        text = plain(name)
        assert text.count("read -r _") == 2
        return text.replace("read -r _", f"sleep {WINDOW}; read -r _", 1)

    monkeypatch.setattr(selftestwatch, "_wrapper", slow_to_read)
    t0 = time.monotonic()
    run = selftestwatch.run_unwatched(booted, NAME, timeout=TIMEOUT)
    assert run.verdict.passed, run.verdict.describe()
    assert run.verdict.counts.get("OK", 0) > 0, run.verdict
    assert time.monotonic() - t0 < TIMEOUT, "it waited out the timeout"
    out, status = booted.shell("echo back at the prompt")
    assert status == 0 and "back at the prompt" in out, out


def test_a_selftest_runs_on_the_isolated_vcpu(booted: Guest) -> None:
    """The wrapper, and the selftest it starts, are pinned to the isolated vCPU (whose tick
    stops with it alone there): the job line names it, and the guest runs it there."""
    cpu = booted.config.isolated
    assert selftestwatch._job(NAME, cpu).startswith(f"taskset -c {cpu} sh -c ")
    out, status = booted.shell(f"taskset -c {cpu} sh -c 'grep Cpus_allowed_list /proc/self/status'")
    assert status == 0 and out.split()[-1] == str(cpu), out


@pytest.fixture(scope="module")
def reference() -> Iterator[Guest]:
    with Guest.boot(reference_config()) as g:
        yield g


def test_nothing_runs_in_user_mode_on_the_housekeeping_vcpu_under_watch(reference: Guest) -> None:
    """While a selftest is watched, the housekeeping vCPU makes no CR3 switch at all: the
    console shell waits in the kernel for its foreground job, the wrapper runs on the
    isolated vCPU. (Typing into the shell meanwhile left it in user mode under a tick on
    every return: 27-289 interrupts from user mode there a run, 550-5,000 transitions.)
    Three runs: none has twice the transitions of another (the storm made them vary
    ninefold; a loaded host adds a few interrupts: 352-488 in one CI run)."""
    assert reference.config.vmlinux is not None
    sites = tuple(find_sites(reference.config.vmlinux, reference.symbols, SIGNAL))
    housekeeping = 1 - reference.config.isolated
    counts = []
    for _ in range(3):
        run = selftestwatch.run_watched(reference, sites, NAME, signal=SIGNAL, max_seconds=120)
        assert run.watch is not None and run.verdict.passed, run.verdict.describe()
        there = {
            t.site.where: t.by_cpu[housekeeping]
            for t in run.watch.tallies.values()
            if t.by_cpu.get(housekeeping)
        }
        assert not there, f"site hits on the housekeeping vCPU {housekeeping}: {there}\n{run.watch.table()}"
        counts.append(run.watch.transitions)
    assert max(counts) < 2 * min(counts), f"transitions of three runs: {counts}"
    out, status = reference.shell("echo back at the prompt")
    assert status == 0 and "back at the prompt" in out, out


def test_the_sched_clock_stays_stable_through_the_rigs_stops(reference: Guest) -> None:
    """The rig's stops and steps (QEMU's clocks run on through them) must not make the
    kernel mark its TSC or sched clock unstable: that would keep every CPU's tick on
    (``TICK_DEP_BIT_CLOCK_UNSTABLE``), the isolated one's too. The guest boots with
    ``tsc=reliable``; without it the clocksource watchdog marked the TSC unstable in
    about one full run in three (the tick dependency then read 0x8 under watch)."""
    assert "tsc=reliable" in reference.config.cmdline().split()
    assert reference.config.vmlinux is not None
    sites = tuple(find_sites(reference.config.vmlinux, reference.symbols, SIGNAL))
    run = selftestwatch.run_watched(reference, sites, NAME, signal=SIGNAL, max_seconds=120)
    assert run.verdict.passed, run.verdict.describe()
    out, status = reference.shell("dmesg | grep -i -e unstable -e 'read timed out' || echo none")
    assert status == 0 and out.strip() == "none", out


def test_init_and_the_console_shell_stay_off_the_isolated_cpu(reference: Guest) -> None:
    """The guest's init pins itself, and so the console shell and what it starts, to the
    housekeeping CPUs: only what the rig pins to the nohz_full CPU runs there. (The
    reference kernels leave init's affinity at every CPU, isolcpus=domain or not.)"""
    iso = reference.config.isolated
    out, status = reference.shell(
        "cat /sys/devices/system/cpu/nohz_full; grep -h Cpus_allowed_list /proc/1/status /proc/$$/status"
    )
    lines = out.split("\n")
    assert status == 0 and lines[0].strip() == str(iso), out
    housekeeping = ",".join(str(c) for c in range(reference.config.smp) if c != iso)
    assert [ln.split()[-1] for ln in lines[1:3]] == [housekeeping] * 2, out


def test_a_selftest_out_of_time_is_interrupted_and_the_shell_comes_back(reference: Guest) -> None:
    """A watched selftest past its bound is interrupted (Ctrl-C to the foreground job): its
    verdict says TIMEOUT, no process of it is left, and the console shell answers."""
    assert reference.config.vmlinux is not None
    sites = tuple(find_sites(reference.config.vmlinux, reference.symbols, SIGNAL))
    run = selftestwatch.run_watched(reference, sites, NAME, signal=SIGNAL, max_seconds=0.2)
    assert run.verdict.status == selftestwatch.TIMED_OUT, run.verdict.describe()
    assert run.verdict.describe().startswith("TIMEOUT"), run.verdict.describe()
    out, status = reference.shell(f"ps -o pid,comm | grep -c {NAME[:15]} || true")
    assert status == 0 and out.strip() == "0", out
    again = selftestwatch.run_watched(reference, sites, NAME, signal=SIGNAL, max_seconds=120)
    assert again.verdict.passed, again.verdict.describe()
