"""Fixtures shared by the testcases."""

from __future__ import annotations

import pytest

from rig.guest import Guest
from rig.machine.sites import SIGNAL, Site
from rig.observe.coverage import SiteCoverage
from rig.observe.findings import SkipKind
from rig.pytestplugin.caseoptions import note_skip
from rig.pytestplugin.settings import RigSettings, missing_on_reference

#: Interrupt entries a CPU spinning in user mode takes: its tick, and the IPIs a wake-up
#: of a task pinned to it sends.
INTERRUPT_ENTRIES = (
    "asm_sysvec_apic_timer_interrupt",
    "asm_sysvec_reschedule_ipi",
    "asm_sysvec_call_function_single",
    "asm_sysvec_call_function",
)


@pytest.fixture
def signal_guest(pti_guest: Guest, rig_settings: RigSettings, request: pytest.FixtureRequest) -> Guest:
    """The PTI guest, or a skip saying the kernel lacks the signal (an error on a
    reference kernel: it is built with the signal)."""
    if SIGNAL not in pti_guest.symbols:
        note_skip(request.node, SkipKind.NO_SIGNAL)
        missing_on_reference(
            rig_settings,
            f"kernel {pti_guest.release} lacks {SIGNAL} (CONFIG_TRACK_CR3, the CR3-signal patch); "
            f"symbols from {pti_guest.symbols.source}",
        )
    return pti_guest


@pytest.fixture
def watch_sites(
    signal_guest: Guest, site_coverage: SiteCoverage | None, rig_settings: RigSettings
) -> tuple[Site, ...]:
    """The CR3 switch sites watch mode arms, or a skip saying why it cannot run (an error
    on a reference kernel, whose vmlinux the rig built)."""
    if not signal_guest.config.vmlinux or site_coverage is None or not site_coverage.sites:
        missing_on_reference(
            rig_settings, "watch mode needs the kernel's vmlinux (--vmlinux) to find its CR3 switch sites"
        )
    assert site_coverage is not None
    if signal_guest.config.smp < 2:
        pytest.skip(
            f"watch mode needs --smp 2 or more (other vCPUs read the signal); smp={signal_guest.config.smp}"
        )
    return tuple(site_coverage.sites)
