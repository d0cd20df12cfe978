"""A kernel booted with ``nopti``: every PTI testcase skips and says why; only the
testcases of the signal with PTI off (testcases/test_cr3_signal_off.py) run, and pass."""

from tests.conftest import run_pytest

#: The testcases whose subject is a kernel without PTI: they run under ``nopti``.
PTI_OFF_TESTCASES = "test_cr3_signal_off.py"


def test_pti_testcases_skip_under_nopti(tag: str) -> None:
    res = run_pytest(["--append", "nopti", "-rsp"], tag)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-2000:]
    skipped = [ln for ln in out.splitlines() if ln.startswith("SKIPPED")]
    assert skipped, out[-2000:]
    assert all("runs without PTI" in ln and "nopti" in ln for ln in skipped), skipped
    passed = [ln for ln in out.splitlines() if ln.startswith("PASSED")]
    assert passed, out[-2000:]
    assert all(PTI_OFF_TESTCASES in ln for ln in passed), f"a PTI testcase ran on a nopti kernel: {passed}"
