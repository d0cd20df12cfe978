"""Faults at boot and mid-test: bounded time, a clear error, and no QEMU or GDB left."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest

from rig.errors import GuestError, RigError
from rig.guest import Guest, GuestConfig
from tests.conftest import REPO, processes_tagged


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
        assert "QEMU" in str(err.value) or "gdb" in str(err.value).lower()
    finally:
        g.close()
    assert not processes_tagged(tagged_env)


def test_ctrl_c_leaves_nothing(tag: str) -> None:
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
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert "KeyboardInterrupt" in out or child.returncode == 2, out[-1000:]
    assert not processes_tagged(tag)
