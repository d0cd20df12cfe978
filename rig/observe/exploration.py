"""Explore asynchronous events at every instruction boundary of a CR3 switch window.

A :class:`~rig.observe.windows.Window` names an entry (or exit) path, the workload that
drives it, and how many boundaries around its signal store and CR3 write to try.
:func:`explore` (the engine: :class:`rig.observe.explorer.Explorer`):

1. *scouts* the path once: breaks on the window's entry on the chosen vCPU and
   single-steps it past the CR3 write, locating the signal store and the CR3 write;
2. for each boundary k of the window, arrives afresh, steps k instructions, makes an NMI
   pending (QMP ``inject-nmi``: single-stepping masks interrupts, so it is taken on the
   next continue, exactly at boundary k), then *fast-forwards*: the vCPU runs alone at
   full TCG speed with breakpoints on every CR3 write and every signal store of the
   kernel (:mod:`rig.machine.sites`), on the NMI entry, ``paranoid_entry``, the C handler
   and the interrupted instruction. At each stop it reads CR3 and the signal (as a
   frozen sibling reads it), steps the one switch instruction, and checks:

   * a CR3 write that loads the kernel CR3 finds the signal at 1;
   * a CR3 write that loads the user CR3 finds it at 0, except the paranoid restore
     of the interrupted user CR3, which must find the value the event found;
   * the NMI handler body runs on the kernel CR3 with the signal at 1;
   * the event leaves the signal as it found it (checked when it returns to the
     interrupted instruction);
   * the signal changes only at a known store site.

   Between two stops neither CR3 nor the signal can change (every instruction that can
   change them is a breakpoint), so the checks at the stops cover every boundary of
   the run, the handler body included, without stepping it.

The run of boundary k ends once the event has returned and the interrupted path has
loaded the user CR3 again (or, for an exit window, when it returns to the user CR3).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from rig.errors import GuestError
from rig.guest import Guest
from rig.machine.sites import Site
from rig.machine.trace import Trace
from rig.machine.x86 import in_user_half
from rig.observe.checks import frozen_violations, gs_symbol, signal_problems, window_findings
from rig.observe.explorer import Explorer
from rig.observe.windows import SAMPLE_EVERY, BoundaryRun, Exploration, Window, boundaries_of
from rig.transport.qemu import NMI_CPU

__all__ = ["explore"]


def explore(
    guest: Guest,
    sites: Sequence[Site],
    window: Window,
    *,
    signal: str,
    cpu: int = NMI_CPU,
    tries: int = 5,
    every: bool = False,
    stride: int = SAMPLE_EVERY,
) -> Exploration:
    """Explore ``window`` on vCPU ``cpu``: an NMI at each of its boundaries (see the module
    doc; ``every``: all of them, else the sample of :func:`boundaries_of` with ``stride``).

    The window's workload must already run on ``cpu``. Each boundary's arrival is retried
    up to ``tries`` times when the path differs from the scouted one.
    """
    t0 = time.monotonic()
    with guest.userspace.quiet_console():
        result = _explore(guest, sites, window, signal, cpu, tries, every=every, stride=stride)
    result.seconds = time.monotonic() - t0
    return result


def _explore(
    guest: Guest,
    sites: Sequence[Site],
    window: Window,
    signal: str,
    cpu: int,
    tries: int,
    scouts: int = 3,
    *,
    every: bool = False,
    stride: int = SAMPLE_EVERY,
) -> Exploration:
    """Scout, then explore; a scout whose path the arrivals do not follow (it took a rare
    branch) is replaced by a new one, up to ``scouts`` times."""
    ex = Explorer(guest, sites, cpu=cpu, signal=signal)
    abandoned: list[str] = []
    k = 0
    for attempt in range(1, scouts + 1):
        scout, store, cr3_write = ex.scout(window)
        result = Exploration(window, cpu, scout, store, cr3_write)
        # the scout is a stepped trace: held to the stepped rules, the store-to-write rule too
        problems = signal_problems(scout, ex.observer, signal, complete=False)
        problems += window_findings(scout, ex.observer, signal, gs_symbol(guest.symbols))
        problems += frozen_violations(scout)
        if problems:
            result.runs.append(
                BoundaryRun(
                    -1, "scout", "", scout.snapshots[0].cr3[cpu], None, "none", "stepped", problems=problems
                )
            )
        last = len(scout.snapshots) - 1
        guest.stop()
        with guest.link() as link:
            for k in boundaries_of(window, store, cr3_write, last, every=every, stride=stride):
                if in_user_half(scout.snapshots[k].pc):
                    continue  # user mode: not part of the window
                run = None
                for _ in range(tries):
                    run = ex.run_boundary(link, window, k, scout.snapshots[k], start=scout.snapshots[0].pc)
                    if run is not None:
                        break
                    guest.effort.discarded.append(
                        f"{window.name}: boundary {k}: the arrival took another path ({ex.mismatch}); "
                        "arrived again"
                    )
                if run is None:
                    complete = False
                    break
                result.runs.append(run)
            else:
                complete = True
            # a finding in any run ends the exploration with this scout, even if a later
            # boundary's arrivals took another path: no judged run is thrown away
            if complete or any(r.problems for r in result.runs):
                result.repeated_steps = ex.repeated_steps
                result.abandoned = abandoned
                _mark_runs(scout, result)
                return result
        # every run of this attempt was judged and clean; its scout's path is not the one
        # the arrivals follow, so a new scout replaces it (listed in the report)
        abandoned.append(
            f"scout {attempt}: arrivals took another path to boundary {k} ({ex.mismatch}); "
            f"{len(result.runs)} boundaries explored, no findings"
        )
        guest.effort.discarded.append(f"{window.name}: {abandoned[-1]}")
        if attempt == scouts:
            raise GuestError(
                f"{window.name}: {tries} arrivals in a row took another path to boundary {k} "
                f"(last {ex.mismatch}), after {scouts} scouts"
            )
        guest.traces.pop()  # that scout's trace: replaced by the next one
    raise AssertionError("unreachable")


def _mark_runs(scout: Trace, result: Exploration) -> None:
    """Mark each explored boundary on the scout (the trace a failure's timeline shows)."""
    for r in result.runs:
        if r.k >= 0:
            scout.mark(r.k, "event", f"{r.event} at boundary {r.k}: path {r.path}, {r.verdict}")
