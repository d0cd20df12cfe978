"""Run Linux's x86 selftests in the guest, each under watch mode (or unwatched).

A selftest (``/selftests/<name>`` of the initramfs, see :mod:`rig.supply.selftests`)
runs from a wrapper shell started in the console shell's foreground, pinned with
everything it starts to the isolated vCPU. The wrapper prints its pid and reads a line
from the console before the selftest's first instruction, so the breakpoints of watch
mode (:class:`rig.observe.watching.Watcher`: every CR3 write and signal store of the
entry code, on every vCPU) are armed first; then the rig types an empty line. Once the
selftest has exited the wrapper prints ``CR3RIG-SELFTEST-DONE <name> <status>`` and
reads a line again, which the rig types once the watch is over. The guest goes idle
(no more switch sites run, so a continue runs out its poll interval and the console is
read). Its output goes to ``/tmp/<name>.out`` (a console line costs the vCPU a lot
under TCG); afterwards its ``[OK]``/``[FAIL]``/``[SKIP]`` lines are counted.

Why nothing of the rig's runs on the housekeeping vCPU meanwhile (the console shell
waits in the kernel for its foreground job): that vCPU's tick never stops, and under
watch mode a tick that finds it in user mode costs four stops (the interrupt's entry
and exit, each a store and a CR3 write) while the guest's clock runs on through every
continue and step. At ~1 ms a stop that is the 4 ms tick period: a process there in
user mode gets a tick on every return to it and makes almost no progress, and the ticks
become most of what is watched. Typing ``kill -CONT`` into the shell meanwhile (its line
editor handles each character in user mode) made 550 to 5,000 transitions of a run of
syscall_arg_fault_32 (4 to 49 s, the longer the more loaded the host), the same tick
returning to the same user instruction up to 15 times in a row.

The transitions counted for a selftest are those of every vCPU while it ran: its own,
its wrapper's, and the idle housekeeping vCPU's interrupts.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pexpect

from rig.errors import GuestError
from rig.guest import Guest
from rig.machine.sites import Site
from rig.machine.vcpu import stopped_cpu
from rig.observe.transitions import TransitionChecker
from rig.observe.watching import Watcher, WatchResult
from rig.protocol import SELFTESTS_DIR
from rig.transport.rsp import RspLink

#: Printed by the wrapper once the selftest has exited: ``… <name> <status>``.
DONE_MARKER = "CR3RIG-SELFTEST-DONE"
#: Printed by the wrapper before it reads its starting line: ``… <name> pid=<pid>``.
START_MARKER = "CR3RIG-SELFTEST"
#: Seconds a continue may run without a site hit before the console is read.
POLL_SECONDS = 0.5
#: Also read the console every this many hits (something else may keep hitting).
POLL_EVERY_HITS = 200
#: The status of a selftest that was killed because it ran out of time.
TIMED_OUT = -1
#: Result lines of the kselftest helpers (``[OK]``, ``[FAIL]``, ``[SKIP]``).
VERDICT_WORDS = ("OK", "FAIL", "SKIP")


@dataclass
class SelftestVerdict:
    """What one selftest said: its exit status and its result lines."""

    name: str
    status: int
    counts: dict[str, int] = field(default_factory=dict)
    #: its ``[FAIL]`` lines (the first few), and its last lines if it died
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Exit status 0 and no ``[FAIL]`` line."""
        return self.status == 0 and not self.counts.get("FAIL", 0)

    def describe(self) -> str:
        if self.status == TIMED_OUT:
            return f"TIMEOUT: {'; '.join(self.notes[:1])}"
        how = "PASS" if self.passed else "FAIL"
        counts = " ".join(f"{w}={self.counts.get(w, 0)}" for w in VERDICT_WORDS)
        died = f" (killed by signal {self.status - 128})" if self.status > 128 else ""
        return f"{how}: exit {self.status}{died}, {counts}"

    def to_json(self) -> dict[str, object]:
        return {"status": self.status, "counts": self.counts, "notes": self.notes}

    @classmethod
    def from_json(cls, name: str, data: dict[str, object]) -> SelftestVerdict:
        counts = data.get("counts", {})
        notes = data.get("notes", [])
        return cls(
            name,
            int(str(data["status"])),
            {str(k): int(v) for k, v in counts.items()} if isinstance(counts, dict) else {},
            [str(n) for n in notes] if isinstance(notes, list) else [],
        )


@dataclass
class SelftestRun:
    """One selftest run: its verdict, and what watch mode saw meanwhile (None: unwatched)."""

    verdict: SelftestVerdict
    watch: WatchResult | None
    seconds: float


def installed_selftests(guest: Guest) -> tuple[list[str], str]:
    """The selftests in the guest's initramfs, and why some or all are missing (its
    ``MISSING`` file: no kernel tree, or a selftest that did not build)."""
    out, status = guest.shell(f"ls /{SELFTESTS_DIR} 2>&1")
    names = out.split()
    if status != 0:
        return [], f"the initramfs has no /{SELFTESTS_DIR} ({out.strip()[:120]})"
    why = ""
    if "MISSING" in names:
        text, _ = guest.shell(f"cat /{SELFTESTS_DIR}/MISSING")
        why = "; ".join(ln.strip() for ln in text.splitlines() if ln.strip())
    return sorted(n for n in names if n != "MISSING"), why


def _wrapper(name: str) -> str:
    """The shell that runs ``name``: it prints its pid, reads a line, runs the selftest
    (output to ``/tmp/<name>.out``, removed first: a selftest that never ran leaves no
    output of an earlier run behind), prints the done line with its status and reads a
    line again."""
    out = f"/tmp/{name}.out"
    # the markers are split by quotes in the typed line, so only the real output matches
    head, tail = START_MARKER.split("-", 1)
    dhead, dtail = DONE_MARKER[:-4], DONE_MARKER[-4:]
    return (
        f'rm -f {out}; echo {head}-"{tail}" {name} pid=$$; read -r _; '
        f'/{SELFTESTS_DIR}/{name} >{out} 2>&1 </dev/null; echo {dhead}"{dtail}" {name} $?; read -r _'
    )


def _job(name: str, cpu: int) -> str:
    """The console shell's foreground job of selftest ``name``: its wrapper, pinned to
    vCPU ``cpu``.

    ``cpu`` is the isolated (nohz_full) vCPU: with the selftest alone there, its tick
    stops, so the transitions watched are the selftest's own. Unpinned it ran on the
    housekeeping vCPU 0, whose tick never stops (it keeps time for the nohz_full CPUs):
    a tick from user mode every 4 ms of guest time made most of its transitions, and the
    slower the watch, the more of them (574 to 2,857 transitions, 3-24 s, for
    syscall_arg_fault_32 on reference-7.2). The wrapper runs there too, so that reading
    its lines and printing its done line are not user-mode work on the housekeeping vCPU
    (see the module doc)."""
    return f"taskset -c {cpu} sh -c '{_wrapper(name)}'"


def _start(guest: Guest, name: str) -> int:
    """Start ``name``'s wrapper, waiting for its starting line; return the wrapper's pid.

    The line the rig types next is kept by the console's line discipline until the
    wrapper reads it: typed early, it is not lost.
    """
    assert guest.console is not None
    guest.resume()
    line = guest.console.start_foreground(
        _job(name, guest.config.isolated), re.escape(f"{START_MARKER} {name} pid=")
    )
    m = re.search(r"pid=(\d+)", line)
    if m is None:
        raise GuestError(f"selftest {name} printed no pid: {line!r}")
    return int(m.group(1))


def _line(guest: Guest) -> None:
    """Type the empty line the wrapper reads (to start the selftest, or to end)."""
    assert guest.console is not None
    guest.console.send("")


def _done(guest: Guest, name: str, timeout: float) -> int | None:
    """The exit status if the wrapper has printed its done line (within ``timeout`` s)."""
    assert guest.console is not None
    child = guest.console.child
    try:
        child.expect(re.escape(f"{DONE_MARKER} {name} ") + r"(\d+)", timeout=timeout)
    except pexpect.TIMEOUT:
        return None
    except pexpect.EOF:
        raise GuestError(f"the console closed while {name} ran") from None
    return int(child.match.group(1))


def _verdict(guest: Guest, name: str, status: int) -> SelftestVerdict:
    """Count the result lines of ``/tmp/<name>.out`` (one shell command)."""
    out = f"/tmp/{name}.out"
    counts = "; ".join(f"echo {w}=$(grep -c '^\\[{w}\\]' {out})" for w in VERDICT_WORDS)
    tail = f"; tail -3 {out} | sed 's/^/last: /'" if status != 0 else ""
    text, _ = guest.shell(f"{counts}; grep '^\\[FAIL\\]' {out} | head -5{tail}")
    found: dict[str, int] = {}
    notes: list[str] = []
    for line in text.splitlines():
        m = re.fullmatch(r"(OK|FAIL|SKIP)=(\d+)", line.strip())
        if m:
            found[m.group(1)] = int(m.group(2))
        elif line.strip():
            notes.append(line.strip())
    return SelftestVerdict(name, status, found, notes)


def _kill(guest: Guest, name: str, why: str) -> SelftestVerdict:
    """Interrupt a selftest that ran out of time (Ctrl-C: the foreground job, the
    selftest and its wrapper); its verdict says so."""
    assert guest.console is not None
    guest.resume()
    guest.console.send("\x03")
    guest.shell("true")  # the console shell is back at its prompt
    return SelftestVerdict(name, TIMED_OUT, {}, [why])


def run_unwatched(guest: Guest, name: str, timeout: float = 60.0) -> SelftestRun:
    """Run one selftest with the guest running freely (e.g. on a kernel without a vmlinux)."""
    t0 = time.monotonic()
    with guest.userspace.quiet_console():
        _start(guest, name)
        _line(guest)
        status = _done(guest, name, timeout)
        if status is None:
            verdict = _kill(guest, name, f"did not finish within {timeout:.0f} s (unwatched)")
        else:
            _line(guest)
            verdict = _verdict(guest, name, status)
    return SelftestRun(verdict, None, time.monotonic() - t0)


class SelftestWatcher(Watcher):
    """A :class:`Watcher` that watches until a selftest has exited, not for N transitions.

    The loop body is :meth:`Watcher.run`'s, without NMIs; the end is the selftest's done
    line on the console, read whenever a continue runs :data:`POLL_SECONDS` without a hit.
    """

    def run_selftest(self, link: RspLink, name: str, max_seconds: float) -> tuple[WatchResult, int]:
        """Watch until ``name`` is done (or ``max_seconds`` passed: :data:`TIMED_OUT`);
        return what was seen and its exit status."""
        g = self.guest
        result = self.new_result()
        checker = TransitionChecker(self.ncpus, list(self.sites.values()))
        t0 = time.monotonic()
        status: int | None = None
        try:
            while status is None:
                if time.monotonic() - t0 > max_seconds:
                    status = TIMED_OUT
                    break
                tr = time.monotonic()
                try:
                    reply = link.resume("vCont;c", POLL_SECONDS)
                except GuestError as exc:
                    if "no stop within" not in str(exc):
                        raise
                    result.running_seconds += time.monotonic() - tr
                    status = _done(g, name, 0.05)  # stopped by the link's interrupt: idle
                    continue
                result.running_seconds += time.monotonic() - tr
                stopped = stopped_cpu(reply)
                if reply.startswith("T02"):
                    result.paused += 1
                    continue
                if not reply.startswith("T05") or stopped is None:
                    raise GuestError(f"the guest stopped with {reply!r} (not a breakpoint)")
                self.check_hit(link, stopped, result, checker)
                if result.hits % POLL_EVERY_HITS == 0:
                    status = _done(g, name, 0)
        finally:
            self.disarm(link)
            result.seconds = time.monotonic() - t0
            result.unverified_restores = checker.unverified_restores
            result.repeated_steps = self.repeated_steps
        return result, status


def run_watched(
    guest: Guest, sites: Sequence[Site], name: str, *, signal: str, max_seconds: float = 120.0
) -> SelftestRun:
    """Run one selftest under watch mode (see the module doc); the guest runs on after."""
    t0 = time.monotonic()
    with guest.userspace.quiet_console():
        _start(guest, name)
        watcher = SelftestWatcher(guest, sites, signal=signal)
        guest.stop()
        with guest.link() as link:
            watcher.arm(link)
            assert guest.console is not None
            _line(guest)  # typed now, read once the guest runs
            status: int | None = None
            try:
                result, status = watcher.run_selftest(link, name, max_seconds)
            finally:
                if status is None:  # a rig error: the guest is thrown away, but stop it anyway
                    guest.console.send("\x03")
        if status == TIMED_OUT:
            why = f"did not finish within {max_seconds:.0f} s under watch mode"
            verdict = _kill(guest, name, why)
        else:
            guest.resume()
            _line(guest)
            verdict = _verdict(guest, name, status)
    return SelftestRun(verdict, result, time.monotonic() - t0)
