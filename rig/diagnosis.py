"""What went wrong with a guest, in one line: which part is dead and what it said last.

:func:`diagnose` looks at a :class:`~rig.guest.Guest` after a failure: QEMU's exit status
and last stderr line (and a triple fault, from its ``-d cpu_reset`` log), GDB's exit
status and last output, a panic or oops on the serial console, a console that closed
while QEMU still ran. It starts nothing and never raises.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rig.guest import Guest

#: Console lines that say the guest kernel died, most telling first.
_DEATH = (
    re.compile(r"Kernel panic - not syncing:[^\r\n]*"),
    re.compile(r"(?:BUG|Oops|general protection fault)[^\r\n]*"),
)


#: What errors say when QEMU's gdbstub or QMP connection ended under them.
_QEMU_GOING = ("went away", "QEMU closed", "connection failed", "QEMU is gone")

#: Seconds :func:`diagnose` waits for a QEMU whose connection just ended to exit.
QEMU_EXIT_GRACE = 2.0


def console_death(console_text: str) -> str | None:
    """The first line of ``console_text`` that says the kernel panicked or oopsed."""
    for pattern in _DEATH:
        m = pattern.search(console_text)
        if m is not None:
            return m.group(0).strip()
    return None


def diagnose(guest: Guest, already_said: str = "") -> str:
    """One line: what is dead (QEMU, GDB, the kernel, the console) and why; "" if all
    live. A finding whose gist is already in ``already_said`` is left out."""
    parts: list[str] = []
    machine = guest.machine
    if machine.proc is not None and machine.alive and any(s in already_said for s in _QEMU_GOING):
        # QEMU closes its sockets while it exits, before it can be reaped: the error saw
        # the first, give the exit (a real event, bounded) a moment to be seen too
        machine.proc.wait_exit(QEMU_EXIT_GRACE)
    if machine.proc is not None and not machine.alive:
        parts.append(machine.exit_reason())
    elif machine.proc is not None and guest.host.label == "local" and _process_state(machine.proc.pid) == "T":
        parts.append(
            f"QEMU (pid {machine.proc.pid}) is stopped by a signal (SIGSTOP/SIGTSTP): it cannot answer"
        )
    gdb = guest.gdb
    if gdb is not None and not gdb.alive and f"gdb ({gdb.path}) exited" not in already_said:
        parts.append(gdb.death("during the test"))
    died = console_death(machine.console_tail(400))
    if died is not None:
        parts.append(f"the guest kernel printed {died!r}")
    console = guest.console
    if console is not None and console.closed_during is not None and machine.alive:
        parts.append(f"the serial console closed during {console.closed_during} while QEMU still ran")
    return "; ".join(p for p in parts if p.split(":")[0] not in already_said)


def _process_state(pid: int) -> str:
    """The state letter of process ``pid`` (``R``, ``S``, ``T`` for stopped ...), "" if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[0]
