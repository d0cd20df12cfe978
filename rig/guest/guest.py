"""A booted guest: QEMU, GDB through the relay, the console and the kernel, as one object.

:meth:`Guest.boot` validates the input in seconds (before anything starts), starts QEMU
frozen, attaches GDB through the relay, lets the kernel boot to the initramfs's
readiness marker, then learns the kernel (build-id, release, symbols, per-CPU offsets).
Anything that fails on the way closes what was started: no QEMU or GDB outlives it.

A :class:`Guest` is the composition of its parts, each in a module of its own:

* :class:`~rig.guest.runcontrol.RunControl` (``guest.run``): every vCPU runs or stops,
  the raw RSP link, breakpoints;
* :class:`~rig.guest.kernel.KernelIdentity` (``guest.kernel``): release, build-id, PTI,
  symbols, per-CPU offsets;
* :class:`~rig.guest.userspace.Userspace` (``guest.userspace``): the shell, the
  workloads, a quiet console;
* page-table walks (:mod:`rig.machine.walks`) and the Stepper (:mod:`rig.machine.stepper`).

Its methods and attributes of old (``guest.resume()``, ``guest.symbols``,
``guest.start_workload()``...) delegate to those parts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rig.errors import BootEnd, ConfigError, GuestError, RigError
from rig.guest.config import GuestConfig
from rig.guest.hang import HungBoot, sample_hung_boot
from rig.guest.kernel import KernelIdentity
from rig.guest.runcontrol import RunControl
from rig.guest.userspace import Userspace
from rig.machine.disasm import disassemble
from rig.machine.stepper import Stepper
from rig.machine.stops import StopCondition
from rig.machine.symbols import SymbolTable
from rig.machine.trace import Trace, WatchedWord
from rig.machine.vcpu import REPORT_REGISTERS, RegisterMap, Vcpu, thread_id
from rig.machine.walks import translate
from rig.machine.x86 import Translation
from rig.transport.console import Console, ConsoleTimeout
from rig.transport.gdbmi import GdbMi
from rig.transport.gdbproxy import GdbRelay
from rig.transport.host import Host
from rig.transport.local import LocalHost
from rig.transport.qemu import QemuConfig, QemuMachine
from rig.transport.rsp import RspLink

__all__ = ["Effort", "Guest"]


#: Seconds a kernel seen crashing during boot gets to finish its oops before the guest closes.
CRASH_GRACE = 10.0


@dataclass
class Effort:
    """What the current test cost: breakpoint hits taken, steps of each stepped trace, and
    each try the testcase discarded with its reason (every discarded try was judged first)."""

    breaks: int = 0
    steps: list[int] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)


class Guest:
    """A booted guest kernel. Create with :meth:`boot`; always :meth:`close`."""

    def __init__(self, host: Host, config: GuestConfig) -> None:
        self.host = host
        self.config = config
        self.machine = QemuMachine(
            host,
            QemuConfig(
                kernel=config.kernel,
                initrd=config.initrd,
                append=config.cmdline(),
                smp=config.smp,
                accel=config.accel,
                qemu=config.qemu,
                plugin=config.plugin,
            ),
        )
        self.run = RunControl(self.machine, config.smp)
        self.kernel = KernelIdentity()
        self.userspace = Userspace(
            self.run.resume, lambda: self.machine.alive and not self.closed, config.isolated
        )
        self.boot_seconds = 0.0
        #: the boot ran out of its timeout waiting for the readiness marker
        self.boot_timed_out = False
        self.started_at = 0.0
        #: Seconds since :attr:`started_at` at which each boot phase ended, in order.
        self.boot_phases: dict[str, float] = {}
        self.closed = False
        self.traces: list[Trace] = []
        self.effort = Effort()

    # -- the parts' state, as it was named before they had their own modules ----------
    @property
    def gdb(self) -> GdbMi | None:
        return self.run.gdb

    @property
    def relay(self) -> GdbRelay | None:
        return self.run.relay

    @property
    def regmap(self) -> RegisterMap:
        return self.run.regmap

    @property
    def running(self) -> bool:
        return self.run.running

    @property
    def console(self) -> Console | None:
        return self.userspace.console

    @property
    def symbols(self) -> SymbolTable:
        return self.kernel.symbols

    @property
    def per_cpu_offsets(self) -> dict[int, int]:
        return self.kernel.per_cpu_offsets

    @property
    def build_id(self) -> str:
        return self.kernel.build_id

    @property
    def release(self) -> str:
        return self.kernel.release

    @property
    def pti_enabled(self) -> bool:
        return self.kernel.pti_enabled

    # -- life cycle --------------------------------------------------------------
    @classmethod
    def boot(cls, config: GuestConfig, host: Host | None = None) -> Guest:
        host = host or LocalHost()
        config.validate(host)
        guest = cls(host, config)
        try:
            guest._boot()
        except BaseException as exc:
            end = guest._boot_end(exc)
            guest.close()
            if isinstance(exc, RigError) and not isinstance(exc, ConfigError):
                err = type(exc)(f"{exc}; console tail:\n{end.tail(15)}")
                err.boot_end = end
                raise err from exc
            raise
        return guest

    def _boot_end(self, exc: BaseException) -> BootEnd:
        """How the boot that raised ``exc`` ended, read before the guest is closed. A kernel
        seen crashing is given :data:`CRASH_GRACE` seconds to print the rest of its oops
        (its RIP comes after the line that ended the wait for the readiness marker) and,
        with ``panic=-1``, to end QEMU by itself."""
        machine = self.machine
        crashed = isinstance(exc, GuestError) and "crashed during boot" in str(exc)
        if crashed and machine.proc is not None and machine.alive:
            # read the console meanwhile: unread, it stalls the guest mid-oops
            if self.console is not None and self.console.read_until_closed(CRASH_GRACE):
                machine.proc.wait_exit(1.0)
            else:
                machine.proc.wait_exit(0.1)
        ended = machine.proc is not None and not machine.alive
        hung = self._sample_hang() if self.boot_timed_out and not ended else None
        return BootEnd(
            qemu_exit=machine.exit_reason() if ended else None,
            triple_fault=machine.triple_faulted(),
            console=machine.console_tail(BootEnd.LINES),
            hang_state=hung.state() if hung is not None else "",
            hang_where=hung.where() if hung is not None else "",
            hung_before_init=hung is not None and hung.before_init,
        )

    def _sample_hang(self) -> HungBoot | None:
        """Where a boot that timed out was (:mod:`rig.guest.hang`); None if GDB or QEMU
        could not tell (the hang is then reported as it was)."""
        try:
            symbols = self.kernel.loaded_symbols(self.config.vmlinux, timeout=10.0)
            return sample_hung_boot(self.run, symbols, self.config.smp)
        except (RigError, OSError, TimeoutError):
            return None

    def _boot(self) -> None:
        """Start QEMU and GDB side by side, let the kernel boot while GDB attaches.

        Where the time goes (reference-7.2, README "Performance"): GDB's own start-up
        (~0.25 s) and the vmlinux symbols are overlapped with the kernel's boot; QEMU
        starts frozen (``-S``) only until the console is connected, then runs (QMP
        ``cont``) while GDB starts. GDB's attach stops the VM for a moment (QEMU's
        gdbstub stops it when a client connects) and GDB continues it. No breakpoint is
        armed before the readiness marker.
        """
        self.started_at = time.monotonic()
        # GDB is spawned first; its first command (below) reports a broken --gdb
        self.run.start_gdb(self.config.gdb)
        if self.config.vmlinux is not None:
            self.kernel.start_loading(self.config.vmlinux)
        self.machine.start()
        self.userspace.console = Console(self.machine.console_socket, self.machine.console_log)
        self.machine.qmp("cont")  # the kernel boots while GDB starts and attaches
        self._phase("qemu started")
        self.run.configure_gdb()
        self._phase("gdb started")
        self.run.attach()
        self._phase("gdb attached")
        self._wait_ready()
        self.boot_seconds = time.monotonic() - self.started_at
        self._phase("ready marker")
        assert self.console is not None
        self.kernel.learn(self.run, self.console, self.config)
        self._phase("kernel learnt")

    def _phase(self, name: str) -> None:
        self.boot_phases[name] = time.monotonic() - self.started_at

    def _wait_ready(self) -> None:
        assert self.console is not None
        try:
            self.console.wait_ready(self.config.boot_timeout)
        except GuestError as exc:
            self.boot_timed_out = isinstance(exc, ConsoleTimeout)
            raise GuestError(f"{self.config.kernel} did not boot: {exc}") from None

    def close(self) -> None:
        """Kill GDB and QEMU, close sockets, remove the private directory. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            for part in (self.console, self.gdb, self.relay):
                if part is not None:
                    with contextlib.suppress(Exception):
                        part.close()
        finally:
            self.machine.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def usable(self) -> bool:
        """True while QEMU, GDB and the console all still work (a test may reuse it)."""
        return (
            not self.closed
            and self.machine.alive
            and self.gdb is not None
            and self.gdb.alive
            and self.console is not None
            and self.console.closed_during is None
        )

    # -- run control (rig.guest.runcontrol) -----------------------------------------
    def resume(self) -> None:
        """Let every vCPU run."""
        self.run.resume()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every vCPU (all-stop) and wait until GDB reports it."""
        self.run.stop(timeout)

    def stopped(self) -> contextlib.AbstractContextManager[None]:
        """Stop the guest for the block; resume after if it was running."""
        return self.run.stopped()

    def link(self) -> contextlib.AbstractContextManager[RspLink]:
        """The raw RSP link to QEMU, borrowed from GDB; the guest must be stopped."""
        return self.run.link()

    def vcpu(self, index: int) -> Vcpu:
        """vCPU ``index`` (GDB thread ``index + 1``)."""
        return self.run.vcpu(index)

    def break_on(
        self,
        address: int | Sequence[int],
        cpu: int,
        timeout: float = 60.0,
        trigger: Callable[[], None] | None = None,
    ) -> int:
        """Run until vCPU ``cpu`` executes ``address`` (or any of several); return the one hit
        (:meth:`RunControl.break_on`; each hit counts in :attr:`effort`)."""
        addresses = [address] if isinstance(address, int) else list(address)
        what = " or ".join(self.symbols.describe(a) for a in addresses)
        hit = self.run.break_on(addresses, cpu, timeout, trigger, what)
        self.effort.breaks += 1
        return hit

    # -- the kernel (rig.guest.kernel) and its page tables (rig.machine.walks) -------
    def per_cpu(self, name: str, cpu: int) -> int:
        """The address of ``name``'s copy for ``cpu``."""
        return self.kernel.per_cpu(name, cpu)

    def translate(self, virtual: int, *, user_tables: bool, cpu: int = 0) -> Translation:
        """Walk ``virtual`` through vCPU ``cpu``'s kernel or PTI user page tables (physically)."""
        with self.stopped(), self.link() as link:
            return translate(link, self.vcpu(cpu), virtual, user_tables=user_tables)

    # -- guest userspace (rig.guest.userspace) ---------------------------------------
    def start_workload(self, name: str, cpu: int | None = None) -> int:
        """Start ``/bin/<name> <cpu>`` in the background; return its pid once it runs."""
        return self.userspace.start_workload(name, cpu)

    def shell(self, command: str, timeout: float = 30.0) -> tuple[str, int]:
        """Run ``command`` in the guest shell (resuming the guest first); (output, status)."""
        return self.userspace.shell(command, timeout)

    def stop_workload(self, pid: int) -> None:
        """Kill a workload started with :meth:`start_workload`."""
        self.userspace.stop_workload(pid)

    def kill_workloads(self) -> None:
        """Kill every workload still running (between tests)."""
        self.userspace.kill_workloads()

    # -- stepping (rig.machine.stepper) ------------------------------------------------
    def step(
        self,
        cpu: int,
        *,
        words: tuple[WatchedWord, ...] | list[WatchedWord] = (),
        max_steps: int,
        stop: StopCondition | None = None,
    ) -> Trace:
        """Single-step vCPU ``cpu`` (others frozen) from where it stopped; keep the trace.

        ``words`` are read at every boundary through every vCPU. Each snapshot gets its
        instruction text and ``symbol+offset``; the trace is kept in :attr:`traces` for
        the failure report.
        """
        if self.running:
            raise GuestError("stop the guest (e.g. with break_on) before stepping")
        stepper = Stepper(self.regmap, self.config.smp, cpu, words)
        with self.link() as link:
            trace = stepper.run(link, max_steps=max_steps, stop=stop)
        self.traces.append(trace)
        self.effort.steps.append(len(trace.snapshots) - 1)
        text = disassemble(trace.code)
        for snap in trace.snapshots:
            snap.insn = text.get(snap.pc, "?")
            snap.where = self.symbols.describe(snap.pc)
        return trace

    # -- reports ---------------------------------------------------------------------
    def describe(self) -> str:
        """The exact kernel and QEMU of this guest, one line each."""
        return "\n".join(
            [
                f"kernel: {self.config.label or self.config.kernel} ({self.config.kernel})",
                f"kernel release: {self.release} build-id: {self.build_id}",
                f"symbols: {self.symbols.source}",
                f"qemu: {self.machine.version} accel={self.config.accel} smp={self.config.smp}",
                f"cmdline: {self.config.cmdline()}",
            ]
        )

    def registers_report(self) -> str:
        """Every vCPU's registers (stops the guest if it runs); a reason if unreadable."""
        try:
            if not self.machine.alive:
                return f"(no registers: {self.machine.exit_reason()})"
            self.stop()
            lines = []
            with self.link() as link:
                for cpu in range(self.config.smp):
                    regs = self.vcpu(cpu).registers(link, REPORT_REGISTERS)
                    where = self.symbols.describe(regs.get("rip", 0))
                    body = " ".join(f"{k}={v:#x}" for k, v in regs.items())
                    lines.append(f"vCPU {cpu} ({thread_id(cpu)}) at {where}: {body}")
            return "\n".join(lines)
        except Exception as exc:
            return f"(no registers: {exc})"
