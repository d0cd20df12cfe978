"""Where the rig runs its processes: a small interface, and helpers every host shares.

A :class:`Host` starts a process (QEMU) and gives a private directory for its sockets.
The rig itself (GDB, the relay, pytest, the checks) always runs here; it reaches the
host's sockets and logs through the *local* paths of that directory. On the local host
(:class:`rig.transport.local.LocalHost`) the host's view and the local view are the same
directory; an SSH host (:mod:`rig.transport.ssh`) maps them to a remote private directory
and forwards the unix sockets.
"""

from __future__ import annotations

import abc
import os
import shutil
import signal
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from rig.errors import ConfigError
from rig.transport.rsp import Stream


class HostProcess(abc.ABC):
    """A process started by :meth:`Host.spawn` (in a process group of its own)."""

    pid: int

    @abc.abstractmethod
    def poll(self) -> int | None:
        """None while it runs, else its exit status (negative: killed by that signal)."""

    @abc.abstractmethod
    def kill(self) -> None:
        """SIGKILL its process group and reap it. Idempotent."""

    def exit_text(self) -> str:
        """A short phrase on how it ended (call once :meth:`poll` is not None)."""
        rc = self.poll()
        return "is still running" if rc is None else f"exited with {describe_status(rc)}"

    def wait_exit(self, seconds: float) -> int | None:
        """Wait at most ``seconds`` for it to end (it is known to be ending); :meth:`poll`."""
        return self.poll()


def sigterm_as_ctrl_c() -> None:
    """Make SIGTERM (``kill``, ``timeout``, a CI runner cancelling the job) end this
    process as Ctrl-C does, so its cleanup (fixtures, a cell's container, sshd) runs; by
    default SIGTERM kills Python at once and leaves its QEMUs running. Only from the main
    thread, and only while SIGTERM has its default action (someone else may decide)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


class Host(abc.ABC):
    """Runs processes for the rig and owns their private socket directories."""

    #: How errors name this host (``local``, ``ssh://root@box:22``).
    label = "local"

    @abc.abstractmethod
    def which(self, program: str) -> str | None:
        """The full path of ``program`` on this host, or None."""

    @abc.abstractmethod
    def private_dir(self, prefix: str) -> Path:
        """A new local directory only the current user can enter (mode 0700); the host
        has its own private directory behind it (:meth:`host_path`)."""

    @abc.abstractmethod
    def spawn(self, argv: Sequence[str], *, log: Path) -> HostProcess:
        """Start ``argv`` in a process group of its own, stdout+stderr to the local file
        ``log``, which lies in a directory made by :meth:`private_dir`."""

    @abc.abstractmethod
    def run(self, argv: Sequence[str], timeout: float = 30.0) -> tuple[int, str]:
        """Run ``argv`` to completion on the host; (exit status, stdout+stderr)."""

    def host_path(self, local: Path) -> str:
        """How the host's processes name ``local`` (a path in a :meth:`private_dir`)."""
        return str(local)

    def stage(self, local_file: Path) -> str:
        """The path under which the host's processes read ``local_file`` (uploaded once)."""
        return str(local_file)

    def open_stream(self, local_socket: Path) -> Stream:
        """A new connection to the host's unix socket at ``host_path(local_socket)``, for a
        hot path that should not pass through :meth:`expose`'s local socket (the gdbstub
        link of the stepping loop). OSError if it cannot be made."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(local_socket))
        except OSError:
            sock.close()
            raise
        return sock

    def expose(self, local_socket: Path) -> None:  # noqa: B027 (a no-op for the local host)
        """Make the host's unix socket at ``host_path(local_socket)`` reachable at
        ``local_socket`` (nothing to do when the host is this machine)."""

    def exists(self, local: Path) -> bool:
        """Whether ``host_path(local)`` exists on the host."""
        return local.exists()

    def read_tail(self, local: Path, size: int) -> bytes:
        """The last ``size`` bytes of the host's file ``host_path(local)``; OSError if unreadable."""
        with open(local, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read()

    def remove_private_dir(self, local: Path) -> None:
        """Remove a directory made by :meth:`private_dir` (and the host's side of it)."""
        remove_tree(local)

    def kvm_usable(self, qemu: str = "qemu-system-x86_64") -> str | None:
        """None if KVM can run guests here, else why not (one line)."""
        return "KVM is not checked on this host"

    def summary(self) -> str | None:
        """One line on what the rig did to reach this host (uploads), or None."""
        return None

    def close(self) -> None:  # noqa: B027 (a no-op for the local host)
        """Release the connection to the host, if any. Idempotent."""


def require_program(host: Host, program: str, package: str) -> str:
    """The path of ``program`` on ``host`` or a :class:`ConfigError` naming the package."""
    path = host.which(program)
    if path is None:
        where = "" if host.label == "local" else f" on {host.label}"
        raise ConfigError(f"{program} not found{where}: install it with `apt-get install {package}`")
    return path


def remove_tree(path: Path) -> None:
    """Remove a private directory made by :meth:`Host.private_dir`."""
    shutil.rmtree(path, ignore_errors=True)


def describe_status(returncode: int) -> str:
    """``status N`` or ``signal N (SIGNAME)`` for a Popen return code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "?"
        return f"signal {-returncode} ({name})"
    return f"status {returncode}"


def processes_with_env(name: str, value: str) -> list[tuple[int, str]]:
    """(pid, whole command line) of this machine's live processes whose environment has
    ``name=value`` (how tests and the private sshd find what they started, and only that)."""
    found = []
    needle = f"{name}={value}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append((int(pid), cmd))
        except OSError:
            continue
    return found
