"""The task a vCPU runs: its ``comm``, read through the gdbstub from the kernel's
per-CPU ``current_task`` (``pcpu_hot.current_task`` from 6.2 to 6.14); the symbol
table is all it needs, no debug info.

``comm`` sits at a fixed offset in ``struct task_struct`` that depends on the kernel's
config. A :class:`TaskNames` finds it once, from a task whose name is known (the
workload the rig started): the first NUL-terminated copy of that name, 8-byte aligned,
in its ``task_struct``.

Reads go through the vCPU's own page tables: the ``task_struct`` is kernel memory, not
mapped in the PTI user page tables, so the vCPU must be on its kernel CR3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rig.errors import GuestError
from rig.machine.vcpu import Vcpu
from rig.transport.rsp import RspLink

if TYPE_CHECKING:
    from rig.guest.guest import Guest

__all__ = ["COMM_LEN", "TaskNames", "task_names"]

#: ``TASK_COMM_LEN``: ``comm`` holds at most 15 characters and a NUL
COMM_LEN = 16
#: how much of a ``task_struct`` is searched for ``comm`` (its offset is about 0x5c0
#: to 0xc00 on the reference kernels, larger with debug options); read in chunks a
#: gdbstub answers at once
SEARCH_BYTES = 0x4000
CHUNK = 0x200


def comm_bytes(name: str) -> bytes:
    """``name`` as the kernel stores it in ``comm``: truncated to 15 bytes, NUL-ended."""
    return name.encode()[: COMM_LEN - 1] + b"\0"


def task_names(guest: Guest) -> TaskNames | None:
    """The :class:`TaskNames` of ``guest``'s vCPUs; None for a kernel with neither
    ``current_task`` nor ``pcpu_hot`` (whose first field it is, 6.2 to 6.14)."""
    name = next((n for n in ("current_task", "pcpu_hot") if n in guest.symbols), None)
    if name is None:
        return None
    return TaskNames({cpu: guest.per_cpu(name, cpu) for cpu in range(guest.config.smp)})


class TaskNames:
    """Names the task each vCPU of a stopped guest runs (``current_task``'s ``comm``).

    ``current_task`` maps a vCPU to the address of its ``current_task`` copy
    (:meth:`rig.guest.Guest.per_cpu`).
    """

    #: tasks searched for a name without finding it before :meth:`runs` gives up
    #: telling tasks apart (a ``comm`` beyond ``SEARCH_BYTES``)
    LEARN_TRIES = 16

    def __init__(self, current_task: dict[int, int]) -> None:
        self._current_task = current_task
        self.comm_offset: int | None = None
        self._failed_learns = 0

    def current(self, link: RspLink, vcpu: Vcpu) -> int:
        """The ``task_struct`` address vCPU ``vcpu`` runs.

        Raises:
            GuestError: the pointer is unreadable (the vCPU is on its user CR3).
        """
        task = vcpu.read_u64(link, self._current_task[vcpu.index])
        if task is None:
            raise GuestError(f"cannot read current_task of vCPU {vcpu.index} (on its user CR3?)")
        return task

    def learn(self, link: RspLink, vcpu: Vcpu, name: str) -> int:
        """Find ``comm``'s offset from vCPU ``vcpu``, which runs the task called ``name``.

        Raises:
            GuestError: no NUL-terminated ``name`` in the first ``SEARCH_BYTES`` of its
                ``task_struct`` (the vCPU runs another task, or the memory is unreadable).
        """
        task = self.current(link, vcpu)
        want = comm_bytes(name)
        data = b""
        for start in range(0, SEARCH_BYTES, CHUNK):
            chunk = vcpu.read(link, task + start, CHUNK)
            if chunk is None:
                break
            data += chunk
        at = data.find(want)
        while at >= 0 and at % 8:  # comm is 8-byte aligned in every layout seen
            at = data.find(want, at + 1)
        if at < 0:
            raise GuestError(
                f"vCPU {vcpu.index} does not run a task called {name!r}: no such comm in "
                f"the {len(data)} bytes of its task_struct at {task:#x}"
            )
        self.comm_offset = at
        return at

    def comm(self, link: RspLink, vcpu: Vcpu) -> str | None:
        """The ``comm`` of the task vCPU ``vcpu`` runs; None if unreadable or not learnt."""
        if self.comm_offset is None:
            return None
        task = vcpu.read_u64(link, self._current_task[vcpu.index])
        raw = None if task is None else vcpu.read(link, task + self.comm_offset, COMM_LEN)
        return None if raw is None else raw.split(b"\0", 1)[0].decode(errors="replace")

    def runs(self, link: RspLink, vcpu: Vcpu, name: str) -> bool:
        """Whether vCPU ``vcpu`` runs a task called ``name``, learning ``comm``'s offset
        from it until it is known. True for every task once ``LEARN_TRIES`` tasks in a
        row had no such name (the offset cannot be found: tasks cannot be told apart)."""
        if self.comm_offset is None:
            if self._failed_learns >= self.LEARN_TRIES:
                return True
            try:
                self.learn(link, vcpu, name)
            except GuestError:
                self._failed_learns += 1
                return False
            return True
        return self.comm(link, vcpu) == comm_bytes(name)[:-1].decode()
