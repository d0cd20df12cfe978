"""Run Linux's x86 selftests in the guest, each under watch mode (or unwatched).

A selftest (``/selftests/<name>`` of the initramfs, see :mod:`rig.supply.selftests`)
starts stopped (``kill -STOP`` of its own shell), so the breakpoints of watch mode
(:class:`rig.observe.watching.Watcher`: every CR3 write and signal store of the entry
code, on every vCPU) are armed before its first instruction. It is continued with
``kill -CONT`` and watched until it has exited: its wrapper then prints
``CR3RIG-SELFTEST-DONE <name> <status>`` on the console, and the guest goes idle (no
more switch sites run, so a continue runs out its poll interval and the console is
read). Its output goes to ``/tmp/<name>.out`` (a console line costs the vCPU a lot
under TCG); afterwards its ``[OK]``/``[FAIL]``/``[SKIP]`` lines are counted.

The transitions counted for a selftest are those of every vCPU while it ran: its own,
and the few of its shell (``kill -CONT``, ``wait``).
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
#: Printed by the wrapper before it stops itself: ``… <name> pid=<pid>``.
START_MARKER = "CR3RIG-SELFTEST"
#: Seconds a continue may run without a site hit before the console is read.
POLL_SECONDS = 0.5
#: Also read the console every this many hits (something else may keep hitting).
POLL_EVERY_HITS = 200
#: The status of a selftest that was killed because it ran out of time.
TIMED_OUT = -1
#: Seconds the wrapper of a selftest may take to stop itself after printing its pid.
STOP_SECONDS = 30.0
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


def _wrapper(name: str, cpu: int) -> str:
    """The shell that runs ``name``: it prints its pid, stops itself, and once continued
    becomes the selftest, pinned to vCPU ``cpu`` (output to ``/tmp/<name>.out``, removed
    first: a selftest that never ran leaves no output of an earlier run behind).

    ``cpu`` is the isolated (nohz_full) vCPU: with the selftest alone there, its tick
    stops, so the transitions watched are the selftest's own. Unpinned it ran on the
    housekeeping vCPU 0, whose tick never stops (it keeps time for the nohz_full CPUs):
    a tick from user mode every 4 ms of guest time made most of its transitions, and the
    slower the watch, the more of them (574 to 2,857 transitions, 3-24 s, for
    syscall_arg_fault_32 on reference-7.2)."""
    out = f"/tmp/{name}.out"
    # the markers are split by quotes in the typed line, so only the real output matches
    head, tail = START_MARKER.split("-", 1)
    return (
        f'rm -f {out}; echo {head}-"{tail}" {name} pid=$$; kill -STOP $$; '
        f"exec taskset -c {cpu} /{SELFTESTS_DIR}/{name} >{out} 2>&1 </dev/null"
    )


def _start(guest: Guest, name: str) -> int:
    """Start ``name`` stopped; return the pid of its shell once it is stopped.

    The wrapper prints its pid *before* its ``kill -STOP $$``: a ``kill -CONT`` sent on
    seeing that line can come first and is then lost, and the wrapper stops for good
    (the selftest never runs: a TIMEOUT, seen once in 15 watched runs under QEMU 10).
    So the guest's shell waits here, unwatched, until the wrapper's state is ``T``.
    """
    assert guest.console is not None
    guest.resume()
    wrapper = _wrapper(name, guest.config.isolated)
    line = guest.console.start_background(
        f"(sh -c '{wrapper}'; echo {DONE_MARKER[:-4]}\"\"{DONE_MARKER[-4:]} {name} $?)",
        re.escape(f"{START_MARKER} {name} pid="),
    )
    m = re.search(r"pid=(\d+)", line)
    if m is None:
        raise GuestError(f"selftest {name} printed no pid: {line!r}")
    pid = int(m.group(1))
    # builtins only (no process per poll); ends too if the wrapper is gone
    state, _ = guest.shell(
        f"while read -r _ _ s _ </proc/{pid}/stat && [ $s != T ]; do :; done; "
        f"read -r _ _ s _ </proc/{pid}/stat && echo state=$s",
        timeout=STOP_SECONDS,
    )
    if "state=T" not in state:
        raise GuestError(f"the wrapper of selftest {name} (pid {pid}) did not stop: {state.strip()[:120]!r}")
    return pid


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


def _kill(guest: Guest, name: str, pid: int, why: str) -> SelftestVerdict:
    """Kill a selftest that ran out of time; its verdict says so."""
    assert guest.console is not None
    guest.resume()
    # typed without waiting for the shell: its wrapper's done line (status 137) may come
    # before the shell's own end marker and must not be consumed by waiting for that
    guest.console.send(f"kill -9 {pid}")
    _done(guest, name, 30.0)
    return SelftestVerdict(name, TIMED_OUT, {}, [why])


def run_unwatched(guest: Guest, name: str, timeout: float = 60.0) -> SelftestRun:
    """Run one selftest with the guest running freely (e.g. on a kernel without a vmlinux)."""
    t0 = time.monotonic()
    with guest.userspace.quiet_console():
        pid = _start(guest, name)
        assert guest.console is not None
        guest.console.send(f"kill -CONT {pid}")
        status = _done(guest, name, timeout)
        if status is None:
            verdict = _kill(guest, name, pid, f"did not finish within {timeout:.0f} s (unwatched)")
        else:
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
        pid = _start(guest, name)
        watcher = SelftestWatcher(guest, sites, signal=signal)
        guest.stop()
        with guest.link() as link:
            watcher.arm(link)
            assert guest.console is not None
            guest.console.send(f"kill -CONT {pid}")  # typed now, read once the guest runs
            status: int | None = None
            try:
                result, status = watcher.run_selftest(link, name, max_seconds)
            finally:
                if status is None:  # a rig error: the guest is thrown away, but stop it anyway
                    guest.console.send(f"kill -9 {pid}")
        if status == TIMED_OUT:
            why = f"did not finish within {max_seconds:.0f} s under watch mode"
            verdict = _kill(guest, name, pid, why)
        else:
            verdict = _verdict(guest, name, status)
    return SelftestRun(verdict, result, time.monotonic() - t0)
