"""Fixtures for the rig's own tests: the stock kernel, a booted guest, leftover checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rig.guest import Guest, GuestConfig
from rig.supply.cache import default_cache_dir
from rig.supply.initramfs import build_initramfs
from rig.supply.kernel import DEFAULT_KERNEL, Kernel, resolve_kernel
from rig.transport.host import processes_with_env

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C reaches these tests even when their runner was started with SIGINT ignored.

    A POSIX shell starts a background job (``cmd &``, a CI runner's detached step) with
    SIGINT and SIGQUIT ignored; Python then installs no KeyboardInterrupt handler, and the
    children the tests start inherit the ignored signal, so the tests that press Ctrl-C
    on a run (``test_faults``, ``test_xdist``) would see it do nothing. A user's Ctrl-C
    always arrives with SIGINT enabled, which is what they check.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def stock_kernel() -> Kernel:
    return resolve_kernel("debian", None, default_cache_dir())


@pytest.fixture(scope="session")
def initrd() -> Path:
    return build_initramfs(default_cache_dir())


@pytest.fixture(scope="session")
def base_config(stock_kernel: Kernel, initrd: Path) -> GuestConfig:
    return GuestConfig(
        kernel=stock_kernel.image, initrd=initrd, label=stock_kernel.label, cache_dir=default_cache_dir()
    )


def reference_config(kernel: str = DEFAULT_KERNEL, **options: object) -> GuestConfig:
    """The config of a reference kernel (built once into the cache) with the default
    initramfs and its vmlinux; ``options`` are further :class:`GuestConfig` fields."""
    cache = default_cache_dir()
    k = resolve_kernel(kernel, None, cache)
    return GuestConfig(
        kernel=k.image,
        initrd=build_initramfs(cache),
        vmlinux=k.vmlinux,
        label=k.label,
        cache_dir=cache,
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def booted(base_config: GuestConfig) -> Iterator[Guest]:
    g = Guest.boot(base_config)
    try:
        yield g
    finally:
        g.close()


def processes_tagged(tag: str) -> list[str]:
    """Command lines of live processes whose environment carries CR3RIG_TEST_TAG=tag."""
    return [cmd[:120] for _, cmd in processes_with_env("CR3RIG_TEST_TAG", tag)]


def run_pytest(
    args: list[str], tag: str, timeout: float = 300, target: str = "testcases/"
) -> subprocess.CompletedProcess[str]:
    """Run ``pytest TARGET ARGS`` in a child whose processes carry ``tag``."""
    env = dict(os.environ, CR3RIG_TEST_TAG=tag)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", target, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def tag() -> Iterator[str]:
    """A unique tag for the processes a test starts; fails the test if any survive it."""
    t = uuid.uuid4().hex
    yield t
    left = processes_tagged(t)
    assert not left, f"processes left behind: {left}"


def junit_outcomes(path: Path) -> dict[str, tuple[str, str, float]]:
    """test name -> (outcome, one-line message, seconds) from a pytest JUnit XML report."""
    import xml.etree.ElementTree as ET

    out = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for el in tc:
            if el.tag in ("failure", "error", "skipped"):
                outcome, message = el.tag, el.get("message") or ""
        out[tc.get("name", "")] = (outcome, message, float(tc.get("time", "0")))
    return out
