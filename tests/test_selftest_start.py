"""A selftest starts stopped and is continued only once it is stopped: a real guest (the
stock kernel, the default initramfs with its selftest) and the wrapper's window between
printing its pid and stopping itself made wide (2 s), as QEMU 10 under watch mode once
made it. Before the wait, the ``kill -CONT`` came inside the window and was lost: the
wrapper then stopped for good and the selftest timed out."""

from __future__ import annotations

import time

import pytest

from rig.guest import Guest
from rig.observe import selftestwatch
from rig.supply.selftests import DEFAULT_SELFTESTS

NAME = DEFAULT_SELFTESTS[0]
#: seconds the wrapper sleeps between printing its pid and stopping itself
WINDOW = 2
TIMEOUT = 20.0


def test_a_continue_waits_for_the_wrapper_to_stop(booted: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    installed, why = selftestwatch.installed_selftests(booted)
    assert NAME in installed, why
    plain = selftestwatch._wrapper

    def slow_to_stop(name: str, cpu: int) -> str:
        text = plain(name, cpu)
        assert "kill -STOP $$" in text
        return text.replace("kill -STOP $$", f"sleep {WINDOW}; kill -STOP $$")

    monkeypatch.setattr(selftestwatch, "_wrapper", slow_to_stop)
    t0 = time.monotonic()
    run = selftestwatch.run_unwatched(booted, NAME, timeout=TIMEOUT)
    assert run.verdict.passed, run.verdict.describe()
    assert run.verdict.counts.get("OK", 0) > 0, run.verdict
    assert time.monotonic() - t0 < TIMEOUT, "it waited out the timeout"


def test_a_selftest_runs_on_the_isolated_vcpu(booted: Guest) -> None:
    """The wrapper pins the selftest to the isolated vCPU (whose tick stops with it alone
    there): the wrapper's exec line names it, and the guest runs it there."""
    cpu = booted.config.isolated
    assert f"exec taskset -c {cpu} /" in selftestwatch._wrapper(NAME, cpu)
    out, status = booted.shell(f"taskset -c {cpu} sh -c 'grep Cpus_allowed_list /proc/self/status'")
    assert status == 0 and out.split()[-1] == str(cpu), out
