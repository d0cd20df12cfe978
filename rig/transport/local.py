"""This machine as a :class:`~rig.transport.host.Host`: processes are children of this one.

Its KVM verdict comes from the real probe boots of :mod:`rig.transport.kvmprobe`, which
work on any host through the :class:`~rig.transport.host.Host` interface.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rig.transport.host import Host, HostProcess
from rig.transport.kvmprobe import kvm_problem

__all__ = ["LocalHost", "LocalProcess", "kill_process_group"]


class LocalProcess(HostProcess):
    """A child process of this Python process."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait_exit(self, seconds: float) -> int | None:
        try:
            return self.popen.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        kill_process_group(self.popen)


class LocalHost(Host):
    """This machine."""

    def which(self, program: str) -> str | None:
        return shutil.which(program)

    def private_dir(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix))  # mkdtemp makes it 0700

    def spawn(self, argv: Sequence[str], *, log: Path) -> HostProcess:
        """Start ``argv`` in a session of its own (a terminal's Ctrl-C does not reach it;
        the rig closes it), killed by the kernel if this process dies first (util-linux
        ``setpriv --pdeathsig KILL``, which then executes ``argv`` in its place: a worker
        that pytest-xdist kills in the middle of its cleanup leaves no QEMU behind)."""
        setpriv = shutil.which("setpriv")
        launch = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
        with open(log, "wb") as out:
            return LocalProcess(
                subprocess.Popen(
                    [*launch, *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def run(self, argv: Sequence[str], timeout: float = 30.0) -> tuple[int, str]:
        p = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False, errors="replace"
        )
        return p.returncode, p.stdout + p.stderr

    def kvm_usable(self, qemu: str = "qemu-system-x86_64") -> str | None:
        return kvm_problem(self, qemu)


def kill_process_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and its process group, then reap it. Idempotent."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
