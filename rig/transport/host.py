"""Where the rig runs its processes: a small interface, and the local host.

A :class:`Host` starts a process and gives a private directory for its sockets. Only
:class:`LocalHost` exists now; an SSH host would implement the same three methods and
forward the unix sockets.
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rig.errors import ConfigError


class Host(abc.ABC):
    """Runs processes for the rig and owns their private socket directories."""

    @abc.abstractmethod
    def which(self, program: str) -> str | None:
        """The full path of ``program`` on this host, or None."""

    @abc.abstractmethod
    def private_dir(self, prefix: str) -> Path:
        """A new directory only the current user can enter (mode 0700)."""

    @abc.abstractmethod
    def spawn(self, argv: Sequence[str], *, log: Path) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a session of its own, stdout+stderr to ``log``."""

    def kvm_usable(self) -> str | None:
        """None if KVM can run guests here, else why not (one line)."""
        return "KVM is not checked on this host"


class LocalHost(Host):
    """This machine."""

    def which(self, program: str) -> str | None:
        return shutil.which(program)

    def private_dir(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix))  # mkdtemp makes it 0700

    def spawn(self, argv: Sequence[str], *, log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kvm_usable(self) -> str | None:
        if not os.path.exists("/dev/kvm"):
            return "/dev/kvm does not exist"
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "/dev/kvm is not accessible to this user"
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((ln for ln in f if ln.startswith("flags")), "")
        except OSError:
            flags = ""
        if " vmx" not in flags and " svm" not in flags:
            return "the CPU has no vmx/svm flag (nested or emulated /dev/kvm cannot run guests)"
        return None


def kill_process_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and its process group, then reap it. Idempotent."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def require_program(host: Host, program: str, package: str) -> str:
    """The path of ``program`` on ``host`` or a :class:`ConfigError` naming the package."""
    path = host.which(program)
    if path is None:
        raise ConfigError(f"{program} not found: install it with `apt-get install {package}`")
    return path


def remove_tree(path: Path) -> None:
    """Remove a private directory made by :meth:`Host.private_dir`."""
    shutil.rmtree(path, ignore_errors=True)
