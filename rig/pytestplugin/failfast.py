"""Failing fast and clean inside a pytest session.

* :class:`BootFailures`: a configuration that failed to boot once is not booted again
  in the session; every later test that needs it errors at once with the same line.
  Under pytest-xdist the workers share what failed through a directory of the run.
* :func:`one_line_report`: a :class:`~rig.errors.RigError` (a problem the user can act
  on) is reported as one line, not a traceback (``--tb=long`` keeps the traceback).
* :func:`check_writable`: the static check of the trace and cache directories.
* :class:`BootFault`, :func:`boot_fault`: a boot that faulted before its readiness marker
  (the kernel crashed, QEMU ended by itself: killed, aborted, a triple fault, or the
  kernel hung before it started init), told apart from a boot whose user space never
  became ready (a timeout after init started) or that failed in the rig. The guest pool boots a
  faulted configuration once more; each fault is recorded with its console tail and RIP.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rig.diagnosis import console_death
from rig.errors import ConfigError, GuestError, RigError
from rig.guest import Guest, GuestConfig
from rig.report.bootfault import TIMEOUT_BEFORE_INIT, BootFault

_TAIL_MARK = "; console tail:"


class BootFailed(GuestError):
    """The guest of one configuration did not boot; ``console_tail`` is what it printed;
    ``remembered``: raised for a configuration that failed earlier (not booted again)."""

    def __init__(self, reason: str, console_tail: str = "", *, remembered: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.console_tail = console_tail
        self.remembered = remembered


def split_boot_error(exc: BaseException) -> tuple[str, str]:
    """(one-line reason, console tail) of an error from :meth:`Guest.boot`."""
    text = str(exc)
    head, _, tail = text.partition("\n")
    if head.endswith(_TAIL_MARK):
        return head.removesuffix(_TAIL_MARK), tail
    return head, tail


#: The faulting RIP of an oops (``RIP: 0010:func+0x1b/0x40``; user mode: ``RIP: 0033:0x4011d6``).
_RIP = re.compile(r"\bRIP: ([0-9a-f]{4}:\S+)")


def fault_rip(console: str) -> str:
    """The RIP of the first register dump the console shows (``0010:func+0x1b/0x40``),
    "" if none: a panic without an oops, a triple fault, a QEMU that was killed."""
    m = _RIP.search(console)
    return m.group(1) if m is not None else ""


def boot_fault(exc: RigError, cmdline: str, boot: int) -> BootFault | None:
    """The fault behind the boot error ``exc``, or None if the boot did not fault.

    A fault is what a second boot can tell apart, an emulator's one-off from a broken
    kernel: the kernel crashed (panic, oops, BUG on the console), QEMU ended by itself
    (a signal, an abort, a triple fault), or the kernel hung before it started init
    (:data:`~rig.report.bootfault.TIMEOUT_BEFORE_INIT`: the boot timed out with the
    kernel's ``system_state`` still before ``SYSTEM_RUNNING``, :mod:`rig.guest.hang`; its
    "RIP" is where each vCPU was; a timeout too short for the boot looks the same). Not
    faults, never booted again: bad input (:class:`ConfigError`, QEMU refusing to start
    among it), a boot that timed out after the kernel started init, or whose state could
    not be read (a wrong init, an initramfs without the rig's: the same every time),
    and errors of the rig's own parts while QEMU still ran (GDB, QMP).
    """
    end = exc.boot_end
    if end is None or isinstance(exc, ConfigError):
        return None
    died = console_death(end.console)
    if died is not None:
        kind, what = "kernel crash", died
        if end.qemu_exit is not None and end.triple_fault:
            what += f"; {end.qemu_exit}"
    elif end.qemu_exit is not None:
        kind = "triple fault" if end.triple_fault else "QEMU exit"
        what = end.qemu_exit
    elif end.hung_before_init:
        what = f"the kernel still at {end.hang_state}"
        return BootFault(cmdline, boot, TIMEOUT_BEFORE_INIT, what, end.hang_where, end.console)
    else:
        return None
    return BootFault(cmdline, boot, kind, what, fault_rip(end.console), end.console)


def both_faulted(exc: RigError, fault: BootFault) -> RigError:
    """The error of a second boot that faulted as the first did: its line says so and
    what the kernel or QEMU said; the console tail is kept."""
    head, tail = split_boot_error(exc)
    if fault.what not in head:
        head += f": {fault.what}"
    again = type(exc)(f"{head} [both boots faulted]{_TAIL_MARK}\n{tail}")
    again.boot_end = exc.boot_end
    return again


@dataclass
class _Failure:
    reason: str
    console_tail: str


class BootFailures:
    """The configurations that failed to boot in this session, with their reason.

    ``shared`` (pytest-xdist: a directory of the run, the same for every worker) also
    keeps each failure as a file there, so a configuration that failed on one worker is
    not booted by the others either.
    """

    def __init__(self, shared: Path | None = None, who: str = "") -> None:
        self._failed: dict[GuestConfig, _Failure] = {}
        self.shared = shared
        self.who = who

    def _shared_file(self, config: GuestConfig) -> Path | None:
        if self.shared is None:
            return None
        return self.shared / (hashlib.sha256(repr(config).encode()).hexdigest()[:32] + ".json")

    def check(self, config: GuestConfig) -> None:
        """Raise :class:`BootFailed` (the first failure's line) if ``config`` failed before,
        here or (``shared``) on another worker."""
        f = self._failed.get(config)
        where = ""
        path = self._shared_file(config)
        if f is None and path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                f = _Failure(str(data["reason"]), str(data["console_tail"]))
                where = f" on {data['who']}" if data.get("who") else ""
            except (OSError, ValueError, KeyError):
                f = None
        if f is not None:
            raise BootFailed(
                f"{f.reason} [not booted again: this configuration failed earlier{where}]",
                f.console_tail,
                remembered=True,
            )

    def remember(self, config: GuestConfig, exc: RigError) -> BootFailed:
        """Record the failure of ``config``; return the one-line error to raise."""
        reason, tail = split_boot_error(exc)
        died = console_death(tail)
        if died is not None and died not in reason:
            reason += f": {died}"
        self._failed[config] = _Failure(reason, tail)
        path = self._shared_file(config)
        if path is not None:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps({"reason": reason, "console_tail": tail, "who": self.who}))
                tmp.replace(path)
            except OSError:
                tmp.unlink(missing_ok=True)  # then only this worker remembers it
        return BootFailed(reason, tail)


class OneLineRepr:
    """A failure report that is one line (pytest prints it in place of a traceback)."""

    def __init__(self, line: str, path: str, lineno: int) -> None:
        from _pytest._code.code import ReprFileLocation

        self.line = line
        self.reprcrash = ReprFileLocation(path, lineno, line)

    def toterminal(self, tw: Any) -> None:
        tw.line(self.line, red=True, bold=True)

    def __str__(self) -> str:
        return self.line


def one_line_head(exc: BaseException) -> str:
    """``Class: first line`` of a rig error (a boot error without its console tail)."""
    return f"{type(exc).__name__}: {split_boot_error(exc)[0]}"


def one_line_report(head: str, diagnosis: str, path: str, lineno: int) -> OneLineRepr:
    """The one-line report of a rig error: its head and the diagnosis of the guest."""
    return OneLineRepr(f"{head} [diagnosis: {diagnosis}]" if diagnosis else head, path, lineno)


def breaks_guest(exc: BaseException | None) -> bool:
    """True if ``exc`` leaves the guest in an unknown state (a rig error, a dead socket)."""
    return isinstance(exc, (RigError, OSError))


def wants_one_line(exc: BaseException | None, tbstyle: str) -> bool:
    """True for a rig error unless the user asked for tracebacks (``--tb=long``)."""
    return isinstance(exc, RigError) and tbstyle != "long"


def check_writable(directory: Path, what: str, option: str) -> None:
    """Raise :class:`ConfigError` unless ``directory`` (the ``what``, set by ``option``)
    exists or can be made, and takes files."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".cr3rig-probe-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(
            f"{what} {directory}: cannot write there ({exc.strerror}); "
            f"pass a writable directory with {option}"
        ) from None


def kernel_crashed(exc: BaseException | None, guest: Guest | None) -> bool:
    """True if the guest kernel is known to have crashed: its console (of the failed boot,
    or of the running guest) shows a panic or oops, or QEMU logged a triple fault. Such a
    failure is a finding about the kernel, not a rig error."""
    if isinstance(exc, BootFailed) and console_death(f"{exc.reason}\n{exc.console_tail}"):
        return True
    if guest is None:
        return False
    return console_death(guest.machine.console_tail(200)) is not None or guest.machine.triple_faulted()
