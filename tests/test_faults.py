"""Faults at boot and mid-test: bounded time, a clear error, and no QEMU or GDB left."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rig.diagnosis import diagnose
from rig.errors import GuestError, RigError
from rig.guest import Guest, GuestConfig
from rig.pytestplugin.failfast import one_line_head, one_line_report
from rig.transport.local import LocalHost
from tests.conftest import REPO, junit_outcomes, processes_tagged, run_pytest


@pytest.fixture
def tagged_env(tag: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Children started in this test (QEMU, GDB) inherit the tag."""
    monkeypatch.setenv("CR3RIG_TEST_TAG", tag)
    return tag


def test_kernel_panic_at_boot(base_config: GuestConfig, tagged_env: str) -> None:
    cfg = dataclasses.replace(base_config, append="rdinit=/nonexistent root=/dev/nonexistent")
    t0 = time.monotonic()
    with pytest.raises(GuestError) as err:
        Guest.boot(cfg)
    assert time.monotonic() - t0 < 90
    msg = str(err.value)
    assert "crashed during boot" in msg.splitlines()[0]
    assert "Kernel panic" in msg  # the console tail comes with the error
    assert not processes_tagged(tagged_env)


def test_boot_hang_is_bounded(base_config: GuestConfig, tagged_env: str) -> None:
    cfg = dataclasses.replace(base_config, boot_timeout=2.0)  # boot needs ~6 s under TCG
    t0 = time.monotonic()
    with pytest.raises(GuestError, match="no boot within 2 s"):
        Guest.boot(cfg)
    assert time.monotonic() - t0 < 20
    assert not processes_tagged(tagged_env)


def test_qemu_killed_mid_test(base_config: GuestConfig, tagged_env: str) -> None:
    g = Guest.boot(base_config)
    try:
        g.start_workload("syscall-loop")
        assert g.machine.proc is not None
        os.kill(g.machine.proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RigError) as err:
            g.break_on(g.symbols.address("entry_SYSCALL_64"), g.config.isolated)
        assert time.monotonic() - t0 < 35
        # the line the plugin reports: the error, then what diagnose() finds dead. Which
        # error comes first races with QEMU's exit ("QEMU is gone: ..." or GDB's "the
        # remote target went away"); the SIGKILL must be named in the line either way.
        head = one_line_head(err.value)
        line = str(one_line_report(head, diagnose(g, head), "", 0))
        assert "\n" not in line and "QEMU exited with signal 9 (SIGKILL)" in line, line
    finally:
        g.close()
    assert not processes_tagged(tagged_env)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_leaves_nothing(tag: str, signum: int) -> None:
    """Ctrl-C (SIGINT), and SIGTERM (``kill``, ``timeout``, a cancelled CI job), end the
    run through the fixtures' cleanup: no QEMU or GDB of it survives."""
    env = dict(os.environ, CR3RIG_TEST_TAG=tag)
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "testcases/"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        # wait until the child has QEMU and GDB running (test-harness polling, not rig code)
        while time.monotonic() < deadline:
            procs = " ".join(processes_tagged(tag))
            if "qemu-system" in procs and "gdb" in procs:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the child never started QEMU and GDB")
        child.send_signal(signum)
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert "KeyboardInterrupt" in out or child.returncode == 2, out[-1000:]
    assert not processes_tagged(tag)


#: Each fault in tests/cases/fault_cases.py and the patterns its one-line report must
#: match: the diagnosis of that fault (rig/diagnosis.py, or GDB's death line from
#: GdbMi.death, which the error itself may already carry: diagnose() then leaves it out).
FAULTS = {
    "test_fault_qemu_killed": (r"QEMU exited with signal 9 \(SIGKILL\)",),
    "test_fault_gdb_killed": (
        r"gdb \(\S+\) exited with signal 9 \(SIGKILL\) (while running '[^']*'|during the test); "
        r"its last output: ",
    ),
    "test_fault_console_closed": (
        r"GuestError: the console closed (during|before) ",
        r"\[diagnosis: the serial console closed during [^;\]]+ while QEMU still ran",
    ),
    "test_fault_step_never_returns": (
        r"ReplyTimeout: QEMU sent no reply within 3 s ",
        r"\[diagnosis: QEMU \(pid \d+\) is stopped by a signal \(SIGSTOP/SIGTSTP\): it cannot answer",
    ),
    "test_fault_triple_fault_while_stepped": (
        r"gdbstub connection",
        r"QEMU exited with status \d+(: .*?)? after a triple fault "
        r"\(the guest reset; -no-reboot ends QEMU\)",
    ),
    "test_fault_panic_while_stepped": (
        r"\[diagnosis: (.*; )?the guest kernel printed 'Kernel panic - not syncing: sysrq triggered crash'",
    ),
}


def test_faults_mid_test_diagnosed_and_next_test_passes(tag: str, tmp_path: Path) -> None:
    """Each fault ends its test with a one-line diagnosis (no traceback), the test after
    it passes on a fresh guest, and nothing is left running (7 boots of the stock kernel)."""
    xml = tmp_path / "faults.xml"
    res = run_pytest(["--kernel", "debian", f"--junitxml={xml}"], tag, target="tests/cases/fault_cases.py")
    results = junit_outcomes(xml)
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out[-3000:]
    for name, patterns in FAULTS.items():
        outcome, message, _ = results[name]
        assert outcome == "failure", (name, outcome, message)
        assert "\n" not in message.strip(), (name, message)
        for pattern in patterns:
            assert re.search(pattern, message), (name, pattern, message)
        after = name.replace("test_fault_", "test_after_").replace("_while_stepped", "")
        assert results[after][0] == "passed", (after, results[after])


def test_ctrl_c_inside_a_qmp_call_leaves_no_qemu(base_config: GuestConfig) -> None:
    """A Ctrl-C that lands inside a QMP call is re-raised when QMP is closed: QEMU must
    be killed before that (a soak run left a QEMU behind this way)."""
    g = Guest(LocalHost(), base_config)
    g.machine.start()
    assert g.machine.proc is not None
    pid = g.machine.proc.pid
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                g.machine.qmp("query-qmp-schema")  # a big reply: time goes into its decoding
        with contextlib.suppress(KeyboardInterrupt):
            g.close()
    finally:
        timer.cancel()
        alive = g.machine.proc.poll() is None
        g.machine.proc.kill()  # clean up even when close() failed to
    assert not alive, "QEMU survived Guest.close() after a Ctrl-C inside QMP"
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_tb_long_brings_the_traceback_back(tag: str) -> None:
    short = run_pytest([], tag, target="tests/cases/report_cases.py")
    out = short.stdout
    assert "GuestError: QEMU is gone: QEMU exited with signal 9 (SIGKILL)" in out, out[-2000:]
    assert "_deep_in_the_rig" not in out and "raise GuestError" not in out, out[-2000:]
    long = run_pytest(["--tb=long"], tag, target="tests/cases/report_cases.py")
    assert "_deep_in_the_rig()" in long.stdout and "raise GuestError" in long.stdout, long.stdout[-2000:]
