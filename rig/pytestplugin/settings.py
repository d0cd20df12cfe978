"""The rig's settings for a session: the options resolved (:class:`RigSettings`, the
``rig_settings`` fixture), how a run ends from a fixture, and what a missing feature is
(a skip on a kernel the user chose, an error on a reference kernel)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from rig.errors import RigError
from rig.guest import GuestConfig
from rig.pytestplugin import distributed
from rig.pytestplugin.failfast import (
    BootFailed,
)
from rig.report import hooks as report_hooks
from rig.report.session import session_report
from rig.supply.cache import default_cache_dir
from rig.supply.kernel import is_reference_kernel
from rig.transport.host import Host

__all__ = [
    "HOST_KEY",
    "PTI_OFF_PARAMETERS",
    "EndRun",
    "RigSettings",
    "exit_run",
    "missing_on_reference",
    "options_config",
    "pti_off_asked",
    "rig_settings",
    "run_ender",
]

#: The session's host (set by the options' check, before anything boots).
HOST_KEY = pytest.StashKey[Host]()


@dataclass(frozen=True)
class RigSettings:
    """The options, resolved: what every guest of this session boots."""

    base: GuestConfig
    trace_dir: Path
    host: Host
    site_coverage: str = "auto"
    #: the kernel is one of the rig's reference builds (the default): a missing signal,
    #: PTI or site list there is an error, never a skip (see :func:`missing_on_reference`)
    reference: bool = False
    #: which boundaries the exploration windows take an event at (``--explore``)
    explore: str = "sample"


#: Ends the run with one line and a status (and the boot failure behind it, if any).
EndRun = Callable[[str, int, "BootFailed | None"], NoReturn]


def exit_run(line: str, returncode: int, failed: BootFailed | None = None) -> NoReturn:
    """End the run with one line and a status (:func:`pytest.exit`)."""
    pytest.exit(line, returncode=returncode)


def run_ender(request: pytest.FixtureRequest) -> EndRun:
    """:func:`pytest.exit`, or in an xdist worker (where it would crash xdist's
    controller) :func:`distributed.end_run` and an error for this test."""
    if distributed.role(request.config) != "worker":
        return exit_run
    session = request.session

    def end_worker(line: str, returncode: int, failed: BootFailed | None = None) -> NoReturn:
        tail = failed.console_tail if failed is not None else ""
        distributed.end_run(session, line, returncode, tail, tell=not (failed and failed.remembered))
        raise failed if failed is not None else distributed.RunEnded(line)

    return end_worker


def options_config(opt: Any, **files: Any) -> GuestConfig:
    """The guest the options describe; ``files`` give the kernel, initrd, vmlinux, label
    (and cache) as far as they are known."""
    return GuestConfig(
        smp=opt.smp,
        isolated_cpu=opt.isolated_cpu,
        append=opt.append,
        accel=opt.accel,
        qemu=opt.qemu,
        gdb=opt.gdb,
        boot_timeout=opt.boot_timeout,
        **files,
    )


@pytest.fixture(scope="session")
def rig_settings(pytestconfig: pytest.Config, request: pytest.FixtureRequest) -> RigSettings:
    from rig.supply.initramfs import build_initramfs, selftest_choice
    from rig.supply.kernel import resolve_kernel

    opt = pytestconfig.option
    cache = opt.cr3rig_cache or default_cache_dir()
    # A cold cache builds the kernel here: let its progress line reach the terminal.
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    uncaptured = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
    try:
        with uncaptured:
            kernel = resolve_kernel(opt.kernel, opt.vmlinux, cache)
            # the initramfs holds the selftests --selftests chose (the full one for all)
            chosen = selftest_choice(str(getattr(opt, "selftests", "default") or "default"))
            initrd = opt.initrd or build_initramfs(cache, selftests=chosen)
    except RigError as exc:
        run_ender(request)(f"cr3rig: {exc}", 4, None)
    host = pytestconfig.stash[HOST_KEY]
    if opt.accel == "kvm":
        from rig.transport.kvmprobe import kernel_probe

        why = kernel_probe(host, opt.qemu, "kvm", kernel.image, initrd)
        if why is not None:
            run_ender(request)(
                f"cr3rig: --accel kvm cannot run on {host.label}: {why}; use --accel tcg", 4, None
            )
    base = options_config(
        opt, kernel=kernel.image, initrd=initrd, vmlinux=kernel.vmlinux, label=kernel.label, cache_dir=cache
    )
    settings = RigSettings(
        base,
        opt.trace_dir or pytestconfig.rootpath / "results",
        host,
        opt.site_coverage,
        is_reference_kernel(opt.kernel and str(opt.kernel)),
        opt.explore,
    )
    session_report(pytestconfig).directory = settings.trace_dir
    report_hooks.settings_resolved(pytestconfig, base)
    return settings


PTI_OFF_PARAMETERS = ("nopti", "pti=off", "pti=auto", "mitigations=off")


def pti_off_asked(cmdline: str) -> bool:
    """True if the kernel command line turns PTI off (:data:`PTI_OFF_PARAMETERS`)."""
    return any(word in PTI_OFF_PARAMETERS for word in cmdline.split())


def missing_on_reference(settings: RigSettings, reason: str) -> None:
    """Skip a testcase that cannot run on this kernel (``reason`` says what it lacks and how
    that was seen), or, on a reference kernel (the default, which the rig builds with the
    signal and PTI), fail it: there the lack is a broken build that a skip would hide.

    Raises:
        pytest.skip.Exception: on a kernel the user chose with ``--kernel``.
        pytest.fail.Exception: on a reference kernel.
    """
    if settings.reference:
        pytest.fail(
            f"the reference kernel {settings.base.label} is broken: {reason}; rebuild it "
            "(cr3rig kernel) or check its config fragment",
            pytrace=False,
        )
    pytest.skip(reason)
