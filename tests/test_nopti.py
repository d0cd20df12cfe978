"""A kernel booted with ``nopti``: every PTI testcase skips and says why."""

from tests.conftest import run_pytest


def test_pti_testcases_skip_under_nopti(tag: str) -> None:
    res = run_pytest(["--append", "nopti", "-rs"], tag)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-2000:]
    skipped = [ln for ln in out.splitlines() if ln.startswith("SKIPPED")]
    assert skipped, out[-2000:]
    assert all("runs without PTI" in ln and "nopti" in ln for ln in skipped), skipped
    assert " passed" not in out.splitlines()[-1], "a PTI testcase ran on a nopti kernel"
