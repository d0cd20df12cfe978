"""The QEMU process: started frozen, its sockets in a private 0700 directory, QMP.

The machine starts with ``-S`` (no vCPU runs until GDB continues it), the gdbstub, QMP
and the serial console each listen on a unix socket in a directory only this user can
enter, and the console is also written to ``console.log`` there, so its tail survives
any failure of the pexpect side.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rig.errors import ConfigError, GuestError
from rig.transport.host import Host, HostProcess, require_program

#: Default guest memory (MiB).
DEFAULT_MEMORY_MIB = 512


@dataclass(frozen=True)
class QemuConfig:
    """What to boot and how. ``append`` is the full kernel command line."""

    kernel: Path
    initrd: Path
    append: str
    smp: int = 2
    memory_mib: int = DEFAULT_MEMORY_MIB
    accel: str = "tcg"
    qemu: str = "qemu-system-x86_64"
    cpu: str = "max"
    extra_args: tuple[str, ...] = field(default_factory=tuple)


def is_kernel_image(path: Path) -> str | None:
    """None if ``path`` looks like an x86 bzImage or an ELF vmlinux, else why not."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x210)
    except OSError as exc:
        return f"cannot read it ({exc.strerror})"
    if head[:4] == b"\x7fELF":
        return None
    if len(head) >= 0x206 and head[0x202:0x206] == b"HdrS":
        return None
    return "it is neither a bzImage (no 'HdrS' boot header) nor an ELF vmlinux"


class QemuMachine:
    """One QEMU process. Use :meth:`start`, then :meth:`close` (or ``with``)."""

    def __init__(self, host: Host, config: QemuConfig) -> None:
        self.host = host
        self.config = config
        self.dir = host.private_dir("cr3rig-")
        self.gdb_socket = self.dir / "gdbstub.sock"
        self.qmp_socket = self.dir / "qmp.sock"
        self.console_socket = self.dir / "console.sock"
        self.console_log = self.dir / "console.log"
        self.qemu_log = self.dir / "qemu.log"
        self.proc: HostProcess | None = None
        self.version = ""
        self._qmp: Any = None

    def argv(self, qemu_path: str) -> list[str]:
        """The QEMU command line (frozen at reset, everything on unix sockets)."""
        c = self.config
        accel = "kvm" if c.accel == "kvm" else "tcg"
        cpu = "host" if accel == "kvm" and c.cpu == "max" else c.cpu  # KVM: the box's own CPU (PCID)
        h = self.host.host_path
        return [
            qemu_path,
            "-accel", accel,
            "-cpu", cpu,
            "-smp", str(c.smp),
            "-m", str(c.memory_mib),
            "-nodefaults", "-display", "none", "-no-reboot", "-S",
            "-chardev",
            f"socket,id=con0,path={h(self.console_socket)},server=on,wait=off,"
            f"logfile={h(self.console_log)}",
            "-serial", "chardev:con0",
            "-chardev", f"socket,id=gdb0,path={h(self.gdb_socket)},server=on,wait=off",
            "-gdb", "chardev:gdb0",
            "-qmp", f"unix:{h(self.qmp_socket)},server=on,wait=off",
            "-kernel", self.host.stage(c.kernel),
            "-initrd", self.host.stage(c.initrd),
            "-append", c.append,
            *c.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 20.0) -> None:
        """Start QEMU frozen; return once its QMP socket answers."""
        qemu_path = require_program(self.host, self.config.qemu, "qemu-system-x86")
        self.version = (self.host.run([qemu_path, "--version"])[1].splitlines() or ["?"])[0]
        self.proc = self.host.spawn(self.argv(qemu_path), log=self.qemu_log)
        for sock in (self.qmp_socket, self.gdb_socket, self.console_socket):
            self.host.expose(sock)
        from qemu.qmp.legacy import QEMUMonitorProtocol

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise GuestError(f"QEMU exited at start: {self.log_tail(1)}")
            if self.host.exists(self.qmp_socket):
                qmp = QEMUMonitorProtocol(str(self.qmp_socket))
                try:
                    qmp.connect()
                except Exception:  # OSError locally; qemu.qmp's ConnectError through a forwarder
                    qmp.close()
                else:
                    self._qmp = qmp
                    return
            if time.monotonic() > deadline:
                where = "" if self.host.label == "local" else f" on {self.host.label}"
                raise GuestError(f"QEMU{where} did not open its QMP socket within {timeout:.0f} s")
            time.sleep(0.02)  # polling for a socket file to appear; not in any hot path

    def qmp(self, command: str, **args: object) -> Any:
        """Run one QMP command and return its ``return`` value."""
        if self._qmp is None:
            raise GuestError("QMP is not connected (QEMU not started or already closed)")
        try:
            return self._qmp.cmd(command, **args)
        except Exception as exc:
            raise GuestError(f"QMP {command} failed: {exc} ({self.exit_reason()})") from exc

    def inject_nmi(self) -> None:
        """Inject an NMI into every vCPU (QMP ``inject-nmi``)."""
        self.qmp("inject-nmi")

    def hmp(self, command: str) -> str:
        """Run a human-monitor command through QMP and return its text."""
        return str(self.qmp("human-monitor-command", **{"command-line": command}))

    def status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``debug``, ...)."""
        return str(self.qmp("query-status")["status"])

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_reason(self) -> str:
        """A short phrase on whether QEMU still runs."""
        if self.proc is None:
            return "QEMU not started"
        rc = self.proc.poll()
        if rc is None:
            return "QEMU still running"
        tail = self.log_tail(1)
        return f"QEMU {self.proc.exit_text()}" + (f": {tail}" if tail else "")

    def log_tail(self, lines: int = 5) -> str:
        """The last lines QEMU printed on stderr."""
        try:
            text = self.qemu_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def console_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the serial console, from the log file."""
        try:
            data = self.host.read_tail(self.console_log, 65536)
        except OSError:
            return ""
        text = data.decode("utf-8", "replace").replace("\r", "")
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Quit QEMU (SIGKILL its process group) and remove the private directory."""
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        if self.proc is not None:
            self.proc.kill()
        self.host.remove_private_dir(self.dir)

    def __enter__(self) -> QemuMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_accel(host: Host, accel: str) -> None:
    """Raise :class:`ConfigError` unless ``accel`` can run here."""
    if accel == "tcg":
        return
    if accel != "kvm":
        raise ConfigError(f"--accel {accel!r} is not supported: use tcg or kvm")
    why = host.kvm_usable()
    if why is not None:
        where = "here" if host.label == "local" else f"on {host.label}"
        raise ConfigError(f"--accel kvm cannot run {where}: {why}; use --accel tcg")
