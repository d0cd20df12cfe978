"""The guest layer: a booted guest (:class:`Guest`) and what decides its boot (:class:`GuestConfig`).

:mod:`rig.guest.guest` composes the parts: :mod:`~rig.guest.runcontrol`,
:mod:`~rig.guest.kernel`, :mod:`~rig.guest.userspace`; :mod:`~rig.guest.config` checks
the input.
"""

from rig.errors import BootEnd
from rig.guest.config import BASE_CMDLINE, GuestConfig, check_inputs
from rig.guest.guest import Effort, Guest

__all__ = ["BASE_CMDLINE", "BootEnd", "Effort", "Guest", "GuestConfig", "check_inputs"]
