"""The guest's user space over its serial console: shell commands, the workloads, a quiet console.

Every command resumes the guest first (a stopped guest runs no shell). The workloads are
the initramfs's ``/bin/<name> <cpu>`` programs (``guests/initramfs/workloads``); each
prints :data:`rig.protocol.WORKLOAD_MARKER` once pinned.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

from rig.errors import GuestError
from rig.protocol import WORKLOAD_MARKER
from rig.transport.console import Console

__all__ = ["Userspace"]


class Userspace:
    """The shell of a guest. ``resume`` lets its vCPUs run; ``alive`` says whether it still
    can run commands (its QEMU lives and it is not closed); workloads go to ``default_cpu``
    unless told otherwise. The :attr:`console` is connected at boot."""

    def __init__(self, resume: Callable[[], None], alive: Callable[[], bool], default_cpu: int) -> None:
        self.console: Console | None = None
        self._resume = resume
        self._alive = alive
        self.default_cpu = default_cpu
        #: pid -> name of each workload still running
        self.workloads: dict[int, str] = {}

    def _console(self) -> Console:
        assert self.console is not None
        return self.console

    def shell(self, command: str, timeout: float = 30.0) -> tuple[str, int]:
        """Run ``command`` in the guest shell (resuming the guest first); (output, status)."""
        console = self._console()
        self._resume()
        return console.run(command, timeout)

    def start_workload(self, name: str, cpu: int | None = None) -> int:
        """Start ``/bin/<name> <cpu>`` in the background; return its pid once it runs."""
        console = self._console()
        cpu = self.default_cpu if cpu is None else cpu
        self._resume()
        line = console.start_background(
            f"/bin/{name} {cpu}", re.escape(f"{WORKLOAD_MARKER} {name} cpu={cpu}")
        )
        m = re.search(r"pid=(\d+)", line)
        if m is None:
            raise GuestError(f"workload {name} printed no pid: {line!r}")
        self.workloads[int(m.group(1))] = name
        return int(m.group(1))

    def stop_workload(self, pid: int) -> None:
        """Kill a workload started with :meth:`start_workload`."""
        self._kill([pid])

    def kill_workloads(self) -> None:
        """Kill every workload still running (between tests), with one shell command:
        each command costs a round trip through a shell that shares its CPU with them."""
        if self.workloads:
            self._kill(list(self.workloads))

    def _kill(self, pids: list[int]) -> None:
        """Kill ``pids`` and reap them, in one shell command."""
        console = self._console()
        self._resume()
        listed = " ".join(str(p) for p in pids)
        console.run(f"kill -9 {listed}; wait {listed} 2>/dev/null")
        for pid in pids:
            self.workloads.pop(pid, None)

    @contextlib.contextmanager
    def quiet_console(self) -> Iterator[None]:
        """Keep kernel messages off the serial console for the block (console_loglevel 0).

        Every injected NMI makes the kernel print "Uhhuh. NMI received for unknown reason"
        at KERN_EMERG; under TCG each line on the emulated UART costs the vCPU ~0.5 s, which
        would dominate an exploration or a watch. Panics and oopses still reach the console
        (they call console_verbose()); the messages stay in the kernel log.
        """
        out, status = self.shell("cat /proc/sys/kernel/printk")
        if status != 0 or not out.split():
            yield  # no sysctl: nothing to quiet
            return
        self.shell("echo 0 > /proc/sys/kernel/printk")
        try:
            yield
        finally:
            if self._alive():
                self.shell(f"echo {out.split()[0]} > /proc/sys/kernel/printk")
