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
from rig.transport.host import Host, HostProcess, describe_status, require_program
from rig.transport.kvmprobe import (
    ARCH_CAPABILITIES_CAUSE,
    KVM_CPU,
    arch_capabilities_abort,
    kvm_cpu_retry,
)

#: Default guest memory (MiB).
DEFAULT_MEMORY_MIB = 512
#: The vCPU an NMI injected through QMP (:meth:`QemuMachine.inject_nmi`) is taken on: vCPU 0
#: only (LINT1 is masked on the APs).
NMI_CPU = 0


@dataclass(frozen=True)
class QemuPlugin:
    """A TCG plugin to load (``-plugin LIBRARY,KEY=VALUE,...``).

    ``files`` (name, text) are written into the machine's private directory before QEMU
    starts; in ``args`` (key, value), ``{dir}`` stands for that directory, so a plugin's
    files and sockets live where only this user can reach them and go with the machine.
    Plugins load on a local QEMU only.
    """

    library: Path
    args: tuple[tuple[str, str], ...] = ()
    files: tuple[tuple[str, str], ...] = ()

    def argument(self, private_dir: str) -> str:
        """The ``-plugin`` argument, with ``{dir}`` replaced by ``private_dir``."""
        opts = [f"{k}={v.replace('{dir}', private_dir)}" for k, v in self.args]
        return ",".join([str(self.library), *opts])


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
    plugin: QemuPlugin | None = None


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
        #: QEMU's ``-d cpu_reset`` log: "Triple fault" lands here (resets are rare, so it stays small).
        self.debug_log = self.dir / "qemu-debug.log"
        self.proc: HostProcess | None = None
        #: The ``-cpu`` model QEMU runs with: under KVM ``max`` is the box's own CPU
        #: (``host``); :meth:`start` moves to ``host,-arch-capabilities`` where ``host``
        #: aborts on IA32_ARCH_CAPABILITIES (rig.transport.kvmprobe).
        self.cpu = KVM_CPU if config.accel == "kvm" and config.cpu == "max" else config.cpu
        #: Why :attr:`cpu` is not the configured model (empty if it is).
        self.cpu_note = ""
        #: QEMUs that aborted at start, killed by :meth:`close` (an SSH host's supervisor
        #: removes the private directory, which the next start shares, when killed).
        self._aborted: list[HostProcess] = []
        self.version = ""
        self._qmp: Any = None

    def argv(self, qemu_path: str) -> list[str]:
        """The QEMU command line (frozen at reset, everything on unix sockets)."""
        c = self.config
        accel = "kvm" if c.accel == "kvm" else "tcg"
        h = self.host.host_path
        return [
            qemu_path,
            "-accel", accel,
            "-cpu", self.cpu,
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
            "-d", "cpu_reset", "-D", h(self.debug_log),
            *(["-plugin", c.plugin.argument(h(self.dir))] if c.plugin is not None else []),
            *c.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 20.0) -> None:
        """Start QEMU frozen; return once its QMP socket answers. Under KVM a start with
        ``-cpu host`` that aborts on IA32_ARCH_CAPABILITIES (a nested KVM) is made once
        more with ``host,-arch-capabilities`` (:attr:`cpu` says which ran). Raises
        :class:`ConfigError` if QEMU exits at start, :class:`GuestError` if QMP does not
        answer within ``timeout`` seconds."""
        qemu_path = require_program(self.host, self.config.qemu, "qemu-system-x86")
        plugin = self.config.plugin
        if plugin is not None:
            if self.host.label != "local":
                raise ConfigError(f"a QEMU TCG plugin loads on a local QEMU only, not on {self.host.label}")
            if self.config.accel != "tcg":
                raise ConfigError(f"a QEMU TCG plugin needs --accel tcg, not {self.config.accel}")
            for name, text in plugin.files:
                (self.dir / name).write_text(text)
        said = self.host.run([qemu_path, "--version"])[1]
        self.version = (said.splitlines() or [f"{qemu_path} (printed no version)"])[0]
        self.proc = self.host.spawn(self.argv(qemu_path), log=self.qemu_log)
        # the gdbstub is reached by Host.open_stream (the relay), not through a local socket
        for sock in (self.qmp_socket, self.console_socket):
            self.host.expose(sock)
        from qemu.qmp.legacy import QEMUMonitorProtocol

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                retry = kvm_cpu_retry(self.cpu, self.log_tail(20)) if self.config.accel == "kvm" else None
                if retry is None:
                    raise ConfigError(self.start_failure(qemu_path))
                self.cpu_note = f"-cpu {self.cpu} made QEMU abort setting MSR 0x10a (IA32_ARCH_CAPABILITIES)"
                self.cpu = retry
                self._aborted.append(self.proc)
                self.proc = self.host.spawn(self.argv(qemu_path), log=self.qemu_log)
                deadline = time.monotonic() + timeout
                continue
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

    def start_failure(self, qemu_path: str) -> str:
        """One line on why QEMU exited at start: its own last error line (or the
        IA32_ARCH_CAPABILITIES abort by name) and exit status."""
        assert self.proc is not None
        rc = self.proc.poll()  # it has exited: start() saw it
        status = "an unknown status" if rc is None else describe_status(rc)
        said = ARCH_CAPABILITIES_CAUSE if arch_capabilities_abort(self.log_tail(20)) else self.log_tail(1)
        how = f" with -cpu {self.cpu} ({self.cpu_note})" if self.cpu_note else ""
        if not said:
            return (
                f"QEMU ({qemu_path}) exited at start{how} with {status} and printed nothing; "
                "check --qemu (it must be qemu-system-x86_64)"
            )
        return f"QEMU exited at start{how} with {status}: {said}"

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
        said = self.log_tail(1)
        why = f"QEMU {self.proc.exit_text()}" + (f": {said}" if said else "")
        if self.triple_faulted():
            why += " after a triple fault (the guest reset; -no-reboot ends QEMU)"
        return why

    def triple_faulted(self) -> bool:
        """True if QEMU logged a triple fault (its ``-d cpu_reset`` log)."""
        try:
            return b"Triple fault" in self.host.read_tail(self.debug_log, 1 << 20)
        except OSError:
            return False

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
        # Kill first: closing QMP runs its asyncio loop, which re-raises a Ctrl-C that
        # landed inside an earlier QMP call (a KeyboardInterrupt, not an Exception).
        try:
            for proc in [self.proc, *self._aborted]:
                if proc is not None:
                    proc.kill()
        finally:
            qmp, self._qmp = self._qmp, None
            try:
                if qmp is not None:
                    with contextlib.suppress(Exception):
                        qmp.close()
            finally:
                self.host.remove_private_dir(self.dir)

    def __enter__(self) -> QemuMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The kernel's command-line buffer on x86 (COMMAND_LINE_SIZE), including the final NUL.
COMMAND_LINE_SIZE = 2048


def check_cmdline_length(cmdline: str) -> None:
    """Raise :class:`ConfigError` if the kernel would cut ``cmdline`` (it does so silently)."""
    size = len(cmdline.encode())
    if size >= COMMAND_LINE_SIZE:
        raise ConfigError(
            f"the kernel command line is {size} bytes; an x86 kernel keeps only the first "
            f"{COMMAND_LINE_SIZE - 1} (COMMAND_LINE_SIZE {COMMAND_LINE_SIZE}) and drops the rest "
            "silently: shorten --append"
        )


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
