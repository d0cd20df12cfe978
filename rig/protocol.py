"""What the rig's guest userspace and the rig say to each other over the serial console.

The guest's ``/init`` (``guests/initramfs/init``) and its workloads
(``guests/initramfs/workloads/workload.h``, ``compat32.h``) print these markers; the
initramfs builder (:mod:`rig.supply.initramfs`) lays the files out where they are named;
the console driver (:mod:`rig.transport.console`) and the guest's shell helpers
(:mod:`rig.guest.userspace`) wait for them. Defined here, below both sides, so that neither
imports the other for a string.
"""

from __future__ import annotations

__all__ = ["PROMPT", "READY_MARKER", "SELFTESTS_DIR", "WORKLOAD_MARKER"]

#: Line printed by ``/init`` once the guest is up, just before the shell starts.
READY_MARKER = "CR3RIG-READY"
#: PS1 of the interactive shell on the serial console.
PROMPT = "cr3rig# "
#: First word of the line each workload prints once pinned:
#: ``CR3RIG-WORKLOAD <name> cpu=<N> pid=<pid>``.
WORKLOAD_MARKER = "CR3RIG-WORKLOAD"
#: Where the x86 selftests go in the guest (``/selftests/<name>``).
SELFTESTS_DIR = "selftests"
