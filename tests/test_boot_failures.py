"""A failed boot is remembered for its configuration; a default that cannot boot ends
the session. Real boots of the stock kernel in child pytest sessions."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import junit_outcomes, run_pytest

#: Long enough for the stock kernel to boot under a loaded TCG host (it needs ~6 s idle).
BOOT_TIMEOUT = 30


def test_failed_boot_is_remembered_per_configuration(tag: str, tmp_path: Path) -> None:
    xml = tmp_path / "boots.xml"
    t0 = time.monotonic()
    res = run_pytest(
        ["--kernel", "debian", "--boot-timeout", str(BOOT_TIMEOUT), f"--junitxml={xml}"],
        tag,
        target="tests/cases/boot_cases.py",
    )
    elapsed = time.monotonic() - t0
    results = junit_outcomes(xml)
    out = res.stdout + res.stderr
    assert results["test_default_boots"][0] == "passed", results
    assert "Traceback" not in out, out[-3000:]
    for prefix, first_says in (
        ("test_hang_", f"no boot within {BOOT_TIMEOUT} s"),
        ("test_panic_", "Kernel panic"),
    ):
        names = sorted(n for n in results if n.startswith(prefix))
        first = results[names[0]]
        assert first[0] == "error" and first_says in first[1], first
        assert "\n" not in first[1].strip(), first[1]
        for later in names[1:]:
            outcome, message, seconds = results[later]
            assert outcome == "error", (later, outcome)
            assert message.startswith(first[1].rstrip('"')), (later, message)  # the same line
            assert "not booted again" in message, (later, message)
            assert seconds < 2, f"{later} took {seconds:.1f} s: it booted again"
    # one hang timeout for the whole session, not one per test
    assert elapsed < 2 * BOOT_TIMEOUT + 60, f"{elapsed:.0f} s"


def test_default_configuration_that_cannot_boot_ends_the_session(tag: str) -> None:
    t0 = time.monotonic()
    res = run_pytest(["--kernel", "debian", "--append", "rdinit=/bin/sh", "--boot-timeout", "10"], tag)
    elapsed = time.monotonic() - t0
    out = res.stdout + res.stderr
    lines = [ln for ln in out.splitlines() if "the default configuration cannot boot" in ln]
    assert len(lines) == 1, out[-3000:]
    assert "no boot within 10 s" in lines[0]
    assert res.returncode == 3
    assert "Traceback" not in out and " ERROR " not in out, out[-3000:]
    assert elapsed < 10 + 15, f"{elapsed:.0f} s: more than one boot timeout"
