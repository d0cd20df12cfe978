"""Run control of a booted guest: every vCPU runs or stops through GDB; the raw link; breakpoints.

GDB runs all-stop (``scheduler-locking step``) over the relay (:mod:`rig.transport.gdbproxy`),
which also lends the raw RSP link to QEMU's gdbstub while the guest is stopped (the
Stepper's and the watch modes' hot path). A GDB error caused by QEMU (or the host's
connection) going away says so.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

from rig.errors import GdbError, GuestError, RigError
from rig.machine.vcpu import RegisterMap, Vcpu
from rig.transport.gdbmi import GdbMi
from rig.transport.gdbproxy import GdbRelay
from rig.transport.qemu import QemuMachine
from rig.transport.rsp import RspLink

__all__ = ["RunControl"]


class RunControl:
    """The vCPUs of ``machine`` (``smp`` of them) through GDB and the relay.

    :meth:`start_gdb` spawns GDB (before QEMU starts: its first command reports a broken
    ``--gdb``), :meth:`attach` connects it through the relay once QEMU runs.
    """

    def __init__(self, machine: QemuMachine, smp: int) -> None:
        self.machine = machine
        self.smp = smp
        self.gdb: GdbMi | None = None
        self.relay: GdbRelay | None = None
        self.regmap = RegisterMap({})
        #: True while every vCPU runs (GDB continued them), False while all are stopped.
        self.running = False

    def start_gdb(self, program: str) -> None:
        """Spawn GDB and set it up (asynchronous MI, no pager, no questions)."""
        self.gdb = GdbMi(program, cwd=self.machine.dir)

    def configure_gdb(self) -> None:
        """GDB's settings: its first commands, which report a GDB that does not work."""
        for setting in ("mi-async on", "pagination off", "confirm off"):
            self._gdb().command(f"-gdb-set {setting}")

    def attach(self) -> None:
        """Attach GDB to QEMU's gdbstub through a new relay, learn the register numbers,
        and let the vCPUs run again (QEMU's gdbstub stops them when a client connects)."""
        gdb = self._gdb()
        machine = self.machine
        stub = machine.gdb_socket
        self.relay = GdbRelay(lambda: machine.host.open_stream(stub), machine.dir / "gdb-relay.sock")
        gdb.command(f"-target-select remote {self.relay.listen_path}")
        gdb.wait_stopped(10)
        gdb.command("-gdb-set scheduler-locking step")
        self.regmap = RegisterMap.from_gdb_table(gdb.cli("maint print remote-registers"))
        self.resume()

    def _gdb(self) -> GdbMi:
        if self.gdb is None:
            raise GuestError("GDB is not attached")
        return self.gdb

    def check_alive(self) -> None:
        """Raise :class:`GuestError` naming how QEMU ended if it is gone."""
        if not self.machine.alive:
            raise GuestError(f"QEMU is gone: {self.machine.exit_reason()}")

    @contextlib.contextmanager
    def _qemu_gone_is_the_error(self) -> Iterator[None]:
        """A GDB error caused by QEMU (or the host's connection) going away says so."""
        try:
            yield
        except GdbError:
            self.check_alive()
            raise

    def resume(self) -> None:
        """Let every vCPU run."""
        if not self.running:
            self.check_alive()
            with self._qemu_gone_is_the_error():
                self._gdb().drain_stopped()
                self._gdb().command("-exec-continue")
            self.running = True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every vCPU (all-stop) and wait until GDB reports it."""
        if self.running:
            self.check_alive()
            with self._qemu_gone_is_the_error():
                self._gdb().command("-exec-interrupt")
                self._gdb().wait_stopped(timeout)
            self.running = False

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """Stop the guest for the block; resume after if it was running."""
        was_running = self.running
        self.stop()
        try:
            yield
        finally:
            if was_running and self.machine.alive:
                self.resume()

    @contextlib.contextmanager
    def link(self) -> Iterator[RspLink]:
        """The raw RSP link to QEMU, borrowed from GDB; the guest must be stopped."""
        if self.running:
            raise GuestError("the guest must be stopped to use the raw link")
        if self.relay is None:
            raise GuestError("GDB is not attached")
        self.check_alive()
        with self.relay.borrow() as link:
            yield link
        self._gdb().cli("maintenance flush register-cache")

    def vcpu(self, index: int) -> Vcpu:
        """vCPU ``index`` (GDB thread ``index + 1``)."""
        if not 0 <= index < self.smp:
            raise GuestError(f"vCPU {index} does not exist (smp={self.smp})")
        return Vcpu(index, self.regmap)

    def break_on(
        self,
        addresses: Sequence[int],
        cpu: int,
        timeout: float,
        trigger: Callable[[], None] | None,
        what: str,
    ) -> int:
        """Run until vCPU ``cpu`` executes one of ``addresses`` (``what`` names them in an
        error); return the one hit.

        Hits on other vCPUs are filtered by GDB (thread-specific breakpoints). The
        breakpoints exist only while waiting (armed after boot, deleted at the stop).
        ``trigger`` runs right after the guest is resumed (e.g. to inject an NMI).
        """
        gdb = self._gdb()
        self.stop()
        for a in addresses:
            gdb.cli(f"break *{a:#x} thread {cpu + 1}")
        try:
            self.resume()
            if trigger is not None:
                trigger()
            deadline = time.monotonic() + timeout
            while True:
                stop = gdb.wait_stopped(max(0.1, deadline - time.monotonic()))
                self.running = False
                tid = str(stop.get("thread-id", ""))
                if tid == str(cpu + 1) and stop.get("reason") == "breakpoint-hit":
                    return int(stop.get("frame", {}).get("addr", "0"), 16)
                if time.monotonic() > deadline:
                    raise GuestError("timeout")
                self.resume()
        except RigError as exc:
            raise GuestError(f"vCPU {cpu} did not reach {what} within {timeout:.0f} s ({exc})") from None
        finally:
            if self.running:
                self.stop()
            gdb.command("-break-delete")
