"""Fixtures shared by the testcases."""

from __future__ import annotations

import pytest

from rig.guest import Guest

#: The CR3 software signal of the patch series (CONFIG_TRACK_CR3).
SIGNAL = "kernel_cr3_loaded"


@pytest.fixture
def signal_guest(pti_guest: Guest) -> Guest:
    """The PTI guest, or a skip saying the kernel lacks the signal."""
    if SIGNAL not in pti_guest.symbols:
        pytest.skip(
            f"kernel {pti_guest.release} lacks {SIGNAL} (CONFIG_TRACK_CR3, the CR3-signal patch); "
            f"symbols from {pti_guest.symbols.source}"
        )
    return pti_guest
