"""A kernel booted with ``nopti``: every PTI testcase skips and says why."""

from tests.conftest import run_pytest

#: Testcases made for a kernel with PTI (or the signal's gate) off: they pass under nopti.
PTI_OFF_TESTCASES = "testcases/test_cr3_signal_off.py::"


def test_pti_testcases_skip_under_nopti(tag: str) -> None:
    res = run_pytest(["--append", "nopti", "-rA"], tag)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-2000:]
    skipped = [ln for ln in out.splitlines() if ln.startswith("SKIPPED")]
    assert skipped, out[-2000:]
    assert all("runs without PTI" in ln and "nopti" in ln for ln in skipped), skipped
    passed = [ln.split()[1] for ln in out.splitlines() if ln.startswith("PASSED")]
    ran = [t for t in passed if not t.startswith(PTI_OFF_TESTCASES)]
    assert not ran, f"PTI testcases ran on a nopti kernel: {ran}"
