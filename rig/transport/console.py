"""The guest's serial console, driven with pexpect over QEMU's console socket.

Commands run in the guest's busybox shell; each is followed by an ``echo`` of a unique
end marker carrying the exit status, so :meth:`Console.run` returns exactly the
command's output and status without guessing where a prompt starts.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
from pathlib import Path

import pexpect
import pexpect.fdpexpect

from rig.errors import GuestError
from rig.protocol import READY_MARKER

#: Patterns that mean the guest kernel is dead.
PANIC_PATTERNS = (r"Kernel panic - not syncing", r"\bBUG: ", r"general protection fault")

# ANSI CSI/OSC escape sequences.  busybox's line editor writes ESC[6n (a
# cursor-position query) after every prompt.
_CONSOLE_ESCAPE_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[@-Z\\-_])")


def strip_console_noise(text: str) -> str:
    """Remove terminal escape sequences and carriage returns from console text.

    The guest shell echoes commands and busybox's line editor emits ESC[6n
    after each prompt; serial output uses CR LF (often CR CR LF through a
    pty).  The result has plain ``\\n`` line ends.
    """
    return _CONSOLE_ESCAPE_RE.sub("", text).replace("\r", "")


class ConsoleTimeout(GuestError):
    """What the rig waited for on the console did not come within ``seconds``."""

    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(f"no {what} within {seconds:.0f} s")
        self.what = what
        self.seconds = seconds


class Console:
    """The serial console of one guest. ``log`` is QEMU's copy of every byte."""

    def __init__(self, path: Path, log: Path) -> None:
        self.log = log
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.child = pexpect.fdpexpect.fdspawn(
            self.sock.fileno(),
            encoding="utf-8",
            codec_errors="replace",
            timeout=30,
            searchwindowsize=4096,
            maxread=65536,
        )
        self._ids = itertools.count(1)
        #: What the console was waiting for when it closed (None while it is open).
        self.closed_during: str | None = None

    def wait_ready(self, timeout: float) -> None:
        """Wait for the guest's readiness marker.

        Raises:
            ConsoleTimeout: no marker within ``timeout`` seconds.
            GuestError: the kernel panicked, or the console closed.
        """
        idx = self._expect([re.escape(READY_MARKER), *PANIC_PATTERNS], timeout, "boot")
        if idx != 0:
            raise GuestError("the guest kernel crashed during boot")

    def _expect(self, patterns: list[str], timeout: float, what: str) -> int:
        try:
            return int(self.child.expect(patterns, timeout=timeout))
        except pexpect.TIMEOUT:
            raise ConsoleTimeout(what, timeout) from None
        except pexpect.EOF:
            self.closed_during = what
            raise GuestError(f"the console closed during {what}") from None

    def run(self, command: str, timeout: float = 30.0) -> tuple[str, int]:
        """Run ``command`` in the guest shell; return (output, exit status)."""
        n = next(self._ids)
        tag = f"__CR3RIG_{n}__"
        # the marker is split in the echoed command line so only the real output matches
        self._sendline(f'{command}; echo __CR3RIG_{n}""__ $?', command)
        idx = self._expect([re.escape(tag) + r" (\d+)\r?\n", *PANIC_PATTERNS], timeout, command)
        if idx != 0:
            raise GuestError(f"the guest kernel crashed while running {command!r}")
        status = int(self.child.match.group(1))
        out = strip_console_noise(self.child.before)
        # drop everything up to and including the echoed command line
        echoed = out.rfind(f'echo __CR3RIG_{n}""__ $?')
        if echoed >= 0:
            out = out[out.find("\n", echoed) + 1 :] if "\n" in out[echoed:] else ""
        return out.strip("\n"), status

    def check(self, command: str, timeout: float = 30.0) -> str:
        """Like :meth:`run` but a non-zero status raises :class:`GuestError`."""
        out, status = self.run(command, timeout)
        if status != 0:
            raise GuestError(f"guest command {command!r} failed with status {status}: {out[-200:]}")
        return out

    def send(self, line: str) -> None:
        """Type ``line`` into the shell without waiting for anything (the guest may be
        stopped by a breakpoint before it runs; later commands tolerate its output)."""
        self._sendline(line, line)

    def start_background(self, command: str, marker: str, timeout: float = 30.0) -> str:
        """Start ``command &`` and wait for a line matching regex ``marker``; return the line."""
        return self.start_foreground(f"{command} &", marker, timeout)

    def start_foreground(self, command: str, marker: str, timeout: float = 30.0) -> str:
        """Type ``command`` and wait for a line matching regex ``marker`` (the command may
        still run, e.g. waiting for input); return the line."""
        self._sendline(command, command)
        idx = self._expect([marker + r"[^\r\n]*\r?\n", *PANIC_PATTERNS], timeout, f"{marker!r}")
        if idx != 0:
            raise GuestError(f"the guest kernel crashed while starting {command!r}")
        return str(self.child.after).strip()

    def _sendline(self, line: str, what: str) -> None:
        try:
            self.child.sendline(line)
        except OSError as exc:
            self.closed_during = what
            raise GuestError(f"the console closed before {what!r} could be typed ({exc.strerror})") from None

    def read_until_closed(self, timeout: float) -> bool:
        """Read (and drop: QEMU's log keeps it) whatever the guest prints until QEMU closes
        the console or ``timeout`` seconds pass; True if it closed. A guest whose console
        is not read stalls in its next write: QEMU's serial port sends a byte at a time,
        and a few hundred unread bytes fill the socket (e.g. the rest of an oops)."""
        try:
            self.child.expect(pexpect.EOF, timeout=timeout)
        except pexpect.TIMEOUT:
            return False
        except OSError:
            pass
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
