"""A process on the box under a small ``sh`` supervisor, tied to its SSH exec channel.

QEMU gets a process group of its own; the supervisor blocks reading the channel's stdin
and, when it closes (the rig closes it, or the SSH session ends for any reason: the
connection drops, the rig is killed), kills that group and removes the remote private
directory. QEMU's output streams back over the channel's stderr into the local log file.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Protocol

import paramiko

from rig.errors import GuestError
from rig.transport.host import HostProcess

__all__ = ["SUPERVISOR", "Session", "SshProcess"]

#: The remote supervisor: ``sh -c SUPERVISOR cr3rig-supervisor DIR ARGV...``. It starts
#: ARGV with setsid (a process group of its own, stdout+stderr to the channel's stderr),
#: prints ``pid N``, then ``exit N`` when it ends; a watcher holding the channel's stdin
#: kills the group and removes DIR when stdin reaches EOF, i.e. when the rig closes it
#: or the SSH session ends for any reason. ``kill`` of the pid as well covers the
#: instant before setsid has run.
SUPERVISOR = r"""
d=$1; shift
cd "$d" || { echo "error cannot enter $d"; exit 125; }
exec 3<&0 </dev/null
setsid "$@" 1>&2 3<&- &
q=$!
echo "pid $q"
( while read -r _ <&3; do :; done
  kill -9 -"$q" 2>/dev/null || kill -9 "$q" 2>/dev/null
  cd / && rm -rf -- "$d" ) >/dev/null 2>&1 &
exec 3<&-
wait "$q"
echo "exit $?"
wait
"""


class Session(Protocol):
    """What a supervised process needs of its SSH host (:class:`rig.transport.ssh.SshHost`)."""

    label: str
    transport: paramiko.Transport

    def lost_reason(self) -> str:
        """Why the connection is gone, in a few words."""
        ...


class SshProcess(HostProcess):
    """A process on the box under :data:`SUPERVISOR`, tied to its exec channel."""

    def __init__(self, host: Session, chan: paramiko.Channel, log: Path, timeout: float = 20.0) -> None:
        self.host = host
        self.chan = chan
        self.pid = 0
        self._status: int | None = None
        self._lost: str | None = None
        self._started = threading.Event()
        self._stdout_done = threading.Event()
        #: set at "exit N" or when the channel's stdout ends (the supervisor's own stdout
        #: stays open until its watcher ends, at the kill: not a sign of the exit)
        self._ended = threading.Event()
        self._log = open(log, "ab")  # noqa: SIM115 (closed by the stderr thread)
        threading.Thread(target=self._read_stdout, name="ssh-proc-out", daemon=True).start()
        threading.Thread(target=self._read_stderr, name="ssh-proc-err", daemon=True).start()
        if not self._started.wait(timeout):
            self.kill()
            raise GuestError(
                f"the supervisor on {host.label} did not start the process within {timeout:.0f} s"
            )
        if self._status is not None and self.pid == 0:
            raise GuestError(
                f"the supervisor on {host.label} could not start the process (status {self._status})"
            )

    def _read_stdout(self) -> None:
        f = self.chan.makefile("rb")
        try:
            for raw in f:
                line = raw.decode(errors="replace").split()
                if len(line) == 2 and line[0] == "pid" and line[1].isdigit():
                    self.pid = int(line[1])
                    self._started.set()
                elif len(line) == 2 and line[0] == "exit" and line[1].lstrip("-").isdigit():
                    self._status = int(line[1])
                    self._ended.set()
                elif line and line[0] == "error":
                    self._status = 125
                    self._started.set()
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            self._stdout_done.set()
            self._ended.set()
            if self._status is None:
                self._lost = self.host.lost_reason()
            self._started.set()

    def _read_stderr(self) -> None:
        try:
            while True:
                data = self.chan.recv_stderr(65536)
                if not data:
                    break
                self._log.write(data)
                self._log.flush()
        except (OSError, EOFError, paramiko.SSHException, ValueError):
            pass
        finally:
            self._log.close()

    def poll(self) -> int | None:
        if self._status is not None:
            return self._status
        if self._stdout_done.is_set() or not self.host.transport.is_active():
            if self._lost is None:
                self._lost = self.host.lost_reason()
            return 255
        return None

    def wait_exit(self, seconds: float) -> int | None:
        self._ended.wait(seconds)
        return self.poll()

    def exit_text(self) -> str:
        if self._status is None and self.poll() is not None:
            return (
                f"is out of reach: the SSH connection to {self.host.label} was lost ({self._lost}); "
                "the supervisor on the box kills QEMU when the session ends"
            )
        return f"exited with status {self._status} on {self.host.label}"

    def kill(self) -> None:
        """Close the channel's stdin: the supervisor kills the group and removes the
        directory; wait (bounded) for it to report, then close the channel."""
        with contextlib.suppress(Exception):
            if self.host.transport.is_active() and not self.chan.closed:
                self.chan.shutdown_write()
                self.chan.status_event.wait(10)
        with contextlib.suppress(Exception):
            self.chan.close()
        self._stdout_done.wait(2)
