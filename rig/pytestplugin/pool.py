"""The guest pool: one guest per distinct kernel command line, at most one alive; a boot
fault is booted once more and recorded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from rig.errors import ConfigError, RigError
from rig.guest import Guest, GuestConfig
from rig.machine.sites import SIGNAL
from rig.observe.coverage import SiteCoverage, coverage_of
from rig.pytestplugin.failfast import (
    BootFailed,
    BootFailures,
    boot_fault,
    both_faulted,
    split_boot_error,
)
from rig.pytestplugin.settings import EndRun, RigSettings, exit_run
from rig.report.bootfault import RETRY_BOOTED, BootFault

__all__ = ["GuestPool"]


class GuestPool:
    """Boots guests on demand, one per distinct command line, at most one alive.

    A boot that faults before its readiness marker (the kernel crashed, QEMU ended by
    itself, or the kernel hung before init: :func:`~rig.pytestplugin.failfast.boot_fault`)
    is made once more: an emulator's one-off fault is not a test result. Each fault goes
    to ``on_boot_fault`` (and :attr:`boot_faults`) with its console tail, its RIP and what
    the second boot did. A configuration that fails to boot (a second fault, a timeout
    after init, a rig error) is not booted again: later tests needing it get the same
    one-line error at once. If the default configuration (no ``cmdline`` marker) cannot
    boot, the session ends, as it does for bad input.
    """

    def __init__(
        self,
        settings: RigSettings,
        on_fatal: Any = None,
        failures: BootFailures | None = None,
        end_run: EndRun = exit_run,
        on_boot_fault: Callable[[BootFault], None] | None = None,
    ) -> None:
        self.settings = settings
        self.current: Guest | None = None
        self.failures = failures if failures is not None else BootFailures()
        self.on_fatal = on_fatal
        self.end_run = end_run
        self.on_boot_fault = on_boot_fault
        #: every boot fault of the session, in order
        self.boot_faults: list[BootFault] = []
        self._coverage: SiteCoverage | None = None

    def get(self, extra_append: str = "", *, isolate: bool = True) -> Guest:
        """The guest booted with ``extra_append`` (and, unless ``isolate`` is False, the
        rig's nohz_full/isolcpus parameters for the isolated CPU)."""
        base = self.settings.base
        config = replace(base, append=f"{base.append} {extra_append}".strip(), isolate=isolate)
        cur = self.current
        if cur is not None and (cur.config != config or not cur.usable()):
            cur.close()
            self.current = None
        if self.current is None:
            default = extra_append == "" and isolate
            try:
                self.failures.check(config)
            except BootFailed as remembered:  # the default one only if another worker failed it
                if default:
                    self.end_run(
                        f"cr3rig: {remembered.reason} (the default configuration cannot boot)", 3, remembered
                    )
                raise
            try:
                self.current = self._boot(config)
            except ConfigError as exc:
                self.end_run(f"cr3rig: {exc}", 4, None)
            except RigError as exc:
                failed = self.failures.remember(config, exc)
                if default:
                    if self.on_fatal is not None:
                        self.on_fatal(failed)
                    self.end_run(
                        f"cr3rig: {failed.reason} (the default configuration cannot boot)", 3, failed
                    )
                raise failed from None
        return self.current

    def _boot(self, config: GuestConfig) -> Guest:
        """Boot ``config``, once more if the first boot faulted; a second fault raises the
        second boot's error, saying that both boots faulted."""
        first: BootFault | None = None
        for boot in (1, 2):
            try:
                guest = Guest.boot(config, self.settings.host)
            except RigError as exc:
                fault = boot_fault(exc, config.cmdline(), boot)
                if first is None:
                    if fault is None:
                        raise
                    first = fault
                    continue
                if fault is None:
                    head = split_boot_error(exc)[0]
                    self._fault(replace(first, then=f"the second boot failed otherwise: {head}"))
                    raise
                self._fault(replace(first, then="the second boot faulted too"))
                self._fault(replace(fault, then="both boots faulted: the configuration fails"))
                raise both_faulted(exc, fault) from exc
            if first is not None:
                self._fault(replace(first, then=RETRY_BOOTED))
            return guest
        raise AssertionError("unreachable: the second boot returns or raises")

    def _fault(self, fault: BootFault) -> None:
        self.boot_faults.append(fault)
        if self.on_boot_fault is not None:
            self.on_boot_fault(fault)

    def coverage(self, guest: Guest) -> SiteCoverage | None:
        """The session's switch-site coverage of ``guest``'s kernel (None: no vmlinux)."""
        if self._coverage is None and guest.config.vmlinux is not None:
            self._coverage = coverage_of(guest, SIGNAL)
        if self._coverage is not None and guest.pti_enabled:
            self._coverage.pti = True  # sites are reachable once one guest runs with PTI
        return self._coverage

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None
