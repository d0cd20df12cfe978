"""The rules of a CR3 transition and the signal, over a stream of executed switch sites.

Pure (no guest): watch mode (:mod:`rig.observe.watching`) feeds it every site any vCPU
executes; the exploration (:mod:`rig.observe.exploration`) feeds it the stops of the
vCPU it fast-forwards. The rules:

* a CR3 write that loads the kernel CR3 finds the signal at 1;
* a CR3 write that loads the user CR3 finds it at 0, except a paranoid restore
  (:data:`PARANOID_RESTORE_FUNCTIONS`) of a paranoid entry, which must find the value
  that entry found (a per-vCPU stack of paranoid entries);
* the store of a paranoid exit puts back the value its entry found;
* the signal of a vCPU changes only at a store site.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from rig.machine.sites import Site
from rig.machine.x86 import cr3_side, user_cr3
from rig.observe.findings import Finding, Rule

#: Where paranoid exceptions put CR3 and the signal back (PARANOID_RESTORE_CR3 / RESTORE_CR3).
PARANOID_RESTORE_FUNCTIONS = frozenset({"paranoid_exit", "end_repeat_nmi", "nmi_restore"})


def agreed_signal(reads: Sequence[int | None]) -> tuple[int | None, str]:
    """The signal the observers agree on, and a problem text if they disagree.

    ``reads`` is the value each other vCPU read (None: not mapped through its CR3).
    The value is None when nobody could read it.
    """
    seen = [v for v in reads if v is not None]
    if not seen:
        return None, ""
    if any(v != seen[0] for v in seen):
        return seen[0], f"the other vCPUs read different signals {list(reads)}"
    return seen[0], ""


@dataclass(frozen=True)
class Hit:
    """One checked stop: vCPU ``cpu`` executed the site at ``site.address``.

    ``signal_*`` is the hitting vCPU's signal as the other vCPUs read it (agreed value).
    """

    cpu: int
    site: Site
    cr3_before: int
    cr3_after: int
    signal_before: int | None
    signal_after: int | None


class TransitionChecker:
    """The rules (module doc) over a stream of hits of ``ncpus`` vCPUs.

    Feed it :meth:`paranoid_entry` when a vCPU reaches ``paranoid_entry``, :meth:`check`
    for every executed site, and :meth:`observe` for any other stop where the signal was
    read; it keeps, per vCPU, the paranoid entries not yet returned (each: the signal it
    found, and whether its exit stored it back) and the last signal value seen.

    ``sites`` are the kernel's switch sites: a paranoid exit's store that the CR3 write
    of the interrupted user CR3 immediately follows (the next site of its function is
    that write) leaves its entry on the stack until the write; any other paranoid exit's
    store ends its entry at once (the exception found the kernel CR3 and leaves CR3
    alone). An exception nested between that store and that write (an NMI inside a #DB's
    exit), or several exits in a row, each find their own entry on top.

    A paranoid restore with no paranoid entry on its vCPU's stack (its entry ran before
    the stream began) is counted in :attr:`unverified_restores`; with ``strict_restores``
    it is checked as an ordinary user CR3 write instead (a stream that saw every entry).
    """

    def __init__(self, ncpus: int, sites: Sequence[Site], *, strict_restores: bool = False) -> None:
        self.paranoid: list[list[list[int | bool | None]]] = [[] for _ in range(ncpus)]
        self.last_signal: list[int | None] = [None] * ncpus
        self.unverified_restores = 0
        self.strict_restores = strict_restores
        self.store_then_write = stores_before_their_cr3_write(sites)

    def paranoid_entry(self, cpu: int, signal: int | None) -> list[Finding]:
        problems = self._unchanged(cpu, signal, "paranoid_entry")
        self.paranoid[cpu].append([signal, False])
        return problems

    def observe(self, cpu: int, signal: int | None, where: str) -> list[Finding]:
        """A stop at ``where`` (not a site) read ``signal``: it must not have changed."""
        return self._unchanged(cpu, signal, where)

    def restores_paranoid_entry(self, cpu: int, site: Site) -> bool:
        """Whether ``site``, executed next on ``cpu``, is the CR3 restore of a paranoid entry."""
        restore = site.function in PARANOID_RESTORE_FUNCTIONS
        return site.kind == "cr3-write" and restore and bool(self.paranoid[cpu])

    def _unchanged(self, cpu: int, signal: int | None, where: str) -> list[Finding]:
        last = self.last_signal[cpu]
        self.last_signal[cpu] = signal
        if last is not None and signal is not None and signal != last:
            return [
                Finding(
                    Rule.UNLISTED_STORE,
                    f"vCPU {cpu}: the signal changed {last}->{signal} before {where} "
                    "with no store site in between",
                    cpu=cpu,
                    where=where,
                )
            ]
        return []

    def check(self, hit: Hit) -> list[Finding]:
        """The problems of one executed site (empty: it was right)."""
        cpu, site = hit.cpu, hit.site
        where = f"vCPU {cpu} at {site.where}"
        problems = self._unchanged(cpu, hit.signal_before, site.where)
        self.last_signal[cpu] = hit.signal_after
        stack = self.paranoid[cpu]
        restore = site.function in PARANOID_RESTORE_FUNCTIONS
        if site.kind == "signal-store":
            if restore and stack:
                if hit.signal_after != stack[-1][0]:
                    problems.append(
                        Finding(
                            Rule.PARANOID_RESTORE,
                            f"{where}: the paranoid exit stored {hit.signal_after}; "
                            f"its entry found {stack[-1][0]}",
                            cpu=cpu,
                            where=site.where,
                        )
                    )
                if site.address in self.store_then_write:
                    stack[-1][1] = True  # its CR3 write follows and ends it
                else:
                    stack.pop()  # the exception found the kernel CR3: its exit is done
            return problems
        if not user_cr3(hit.cr3_after):
            if hit.signal_before != 1:
                problems.append(
                    Finding(
                        Rule.KERNEL_CR3_BEFORE_SIGNAL,
                        f"{where}: the CR3 write loaded the kernel CR3 ({cr3_side(hit.cr3_before)}->kernel) "
                        f"with the signal {hit.signal_before}",
                        cpu=cpu,
                        where=site.where,
                    )
                )
            if restore and stack and stack[-1][1]:
                stack.pop()
            return problems
        if restore and (stack or not self.strict_restores):
            if not stack:
                self.unverified_restores += 1  # its entry ran before the stream began
                return problems
            want = stack.pop()[0]
            if hit.signal_before != want:
                problems.append(
                    Finding(
                        Rule.PARANOID_RESTORE,
                        f"{where}: the paranoid restore of the interrupted user CR3 found the signal "
                        f"{hit.signal_before}; its entry found {want}",
                        cpu=cpu,
                        where=site.where,
                    )
                )
            return problems
        if hit.signal_before != 0:
            problems.append(
                Finding(
                    Rule.USER_CR3_BEFORE_SIGNAL,
                    f"{where}: the CR3 write loaded the user CR3 ({cr3_side(hit.cr3_before)}->user) "
                    f"with the signal {hit.signal_before}",
                    cpu=cpu,
                    where=site.where,
                )
            )
        return problems


class CR3Sides:
    """Per vCPU, the CR3 side its last watched instruction left it on (pure, no guest).

    Only the sites switch sides (a context switch loads another *kernel* CR3, never a user
    one), so a vCPU found on the other side at its next watched instruction went through a
    CR3 write the plugin did not see: this checks the plugin's own completeness.
    """

    def __init__(self, ncpus: int) -> None:
        self.last: list[bool | None] = [None] * ncpus

    def continues(self, cpu: int, cr3: int, where: str) -> list[Finding]:
        """The problem if ``cpu`` is at ``where`` on another side than it was left on."""
        last = self.last[cpu]
        now = user_cr3(cr3)
        self.last[cpu] = now
        if last is None or last == now:
            return []
        was, got = ("user", "kernel") if last else ("kernel", "user")
        text = (
            f"vCPU {cpu} at {where}: CR3 went from the {was} to the {got} side since its last watched "
            "instruction (a CR3 write at an unlisted site)"
        )
        return [Finding(Rule.UNLISTED_CR3_WRITE, text, cpu=cpu, where=where)]

    def left(self, cpu: int, cr3: int) -> None:
        """``cpu``'s watched instruction left it on ``cr3``."""
        self.last[cpu] = user_cr3(cr3)


def stores_before_their_cr3_write(sites: Sequence[Site]) -> frozenset[int]:
    """Addresses of the paranoid exits' signal stores whose next site in their function is
    a CR3 write (PARANOID_RESTORE_CR3's store before ``mov ..., %cr3``; not the store of
    its path that leaves CR3 alone)."""
    by_function: dict[str, list[Site]] = {}
    for s in sorted(sites, key=lambda s: s.address):
        if s.function in PARANOID_RESTORE_FUNCTIONS:
            by_function.setdefault(s.function, []).append(s)
    out = set()
    for group in by_function.values():
        for a, b in itertools.pairwise(group):
            if a.kind == "signal-store" and b.kind == "cr3-write":
                out.add(a.address)
    return frozenset(out)
