"""A booted guest: QEMU, the GDB relay, a GDB/MI session, the console and the symbols.

:meth:`Guest.boot` validates the input in seconds (before anything starts), starts QEMU
frozen, attaches GDB through the relay, lets the kernel boot to the initramfs's
readiness marker, then learns the kernel (build-id, release, symbols, per-CPU offsets).
Anything that fails on the way closes what was started: no QEMU or GDB outlives it.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from rig.errors import ConfigError, GdbError, GuestError, RigError
from rig.machine.disasm import disassemble
from rig.machine.symbols import (
    Symbol,
    SymbolTable,
    cache_path,
    elf_build_id,
    elf_symbols,
    notes_build_id,
    parse_kallsyms,
    per_cpu_address,
    vmlinux_problem,
)
from rig.machine.vcpu import REPORT_REGISTERS, RegisterMap, Vcpu, read_physical, thread_id
from rig.machine.x86 import PTI_USER_PGTABLE_BIT, X86_CR4_LA57, Translation, decode_cr3, walk
from rig.observe.stepping import Stepper, StopCondition, Trace, Watch
from rig.supply.cache import default_cache_dir
from rig.supply.initramfs import WORKLOAD_MARKER
from rig.transport.console import Console
from rig.transport.gdbmi import GdbMi
from rig.transport.gdbproxy import GdbRelay
from rig.transport.host import Host, LocalHost, require_program
from rig.transport.qemu import (
    QemuConfig,
    QemuMachine,
    QemuPlugin,
    check_accel,
    check_cmdline_length,
    is_kernel_image,
)
from rig.transport.rsp import RspLink

#: Parameters every boot gets unless the user's ``--append`` sets them otherwise.
BASE_CMDLINE = ("console=ttyS0", "la57=off", "nokaslr", "panic=-1", "quiet")


@dataclass(frozen=True)
class GuestConfig:
    """Everything that decides one boot. Guests with equal configs are interchangeable."""

    kernel: Path
    initrd: Path
    vmlinux: Path | None = None
    smp: int = 2
    isolated_cpu: int | None = None
    append: str = ""
    accel: str = "tcg"
    qemu: str = "qemu-system-x86_64"
    gdb: str = "gdb"
    boot_timeout: float = 180.0
    isolate: bool = True
    label: str = ""
    cache_dir: Path = field(default_factory=default_cache_dir)
    #: a TCG plugin QEMU loads (rig.observe.pluginwatch); None: none
    plugin: QemuPlugin | None = None

    @property
    def isolated(self) -> int:
        """The isolated vCPU (default: the last one)."""
        return self.smp - 1 if self.isolated_cpu is None else self.isolated_cpu

    def cmdline(self) -> str:
        """The kernel command line: base + PTI + isolation, then the user's ``append``."""
        extra = self.append.split()
        keys = {p.split("=", 1)[0] for p in extra}
        parts = list(BASE_CMDLINE)
        if not keys & {"pti", "nopti", "mitigations"}:
            parts.append("pti=on")
        if self.isolate and not keys & {"nohz_full", "isolcpus"}:
            parts += [f"nohz_full={self.isolated}", f"isolcpus=nohz,domain,{self.isolated}"]
        return " ".join(parts + extra)

    def validate(self, host: Host) -> None:
        """Raise :class:`ConfigError` for bad input, before anything is started."""
        check_inputs(host, self.kernel, self.vmlinux, self.initrd, self.smp, self.isolated, self.accel)
        if not self.boot_timeout > 0:
            raise ConfigError(
                f"--boot-timeout {self.boot_timeout:g}: must be more than 0 seconds (default 180)"
            )
        check_cmdline_length(self.cmdline())
        require_program(host, self.qemu, "qemu-system-x86")
        require_program(LocalHost(), self.gdb, "gdb")  # GDB runs here, QEMU on ``host``


def check_inputs(
    host: Host,
    kernel: Path | None,
    vmlinux: Path | None,
    initrd: Path | None,
    smp: int,
    isolated: int,
    accel: str,
) -> None:
    """The static input checks (files, CPU numbers, accelerator): a one-line
    :class:`ConfigError` naming the option and the fix. ``None`` skips a file check."""
    if kernel is not None:
        if not kernel.exists():
            raise ConfigError(f"--kernel {kernel}: no such file; pass a bzImage or vmlinux")
        why = is_kernel_image(kernel)
        if why is not None:
            raise ConfigError(f"--kernel {kernel}: {why}; pass a bzImage or vmlinux")
    if vmlinux is not None:
        if not vmlinux.exists():
            raise ConfigError(f"--vmlinux {vmlinux}: no such file")
        why = vmlinux_problem(vmlinux)
        if why is not None:
            raise ConfigError(f"--vmlinux {vmlinux}: {why}; pass the unstripped vmlinux of this kernel build")
    if initrd is not None and not initrd.exists():
        raise ConfigError(f"--initrd {initrd}: no such file")
    if smp < 2:
        raise ConfigError(f"--smp {smp}: the rig needs at least 2 vCPUs (one steps, one watches)")
    if not 0 <= isolated < smp:
        raise ConfigError(f"--isolated-cpu {isolated} is outside --smp {smp} (valid: 0..{smp - 1})")
    check_accel(host, accel)


#: Seconds a kernel seen crashing during boot gets to finish its oops before the guest closes.
CRASH_GRACE = 3.0


@dataclass(frozen=True)
class BootEnd:
    """How a boot that never reached the readiness marker ended, seen before its guest
    was closed (``RigError.boot_end`` of the error :meth:`Guest.boot` raised)."""

    #: Console lines kept (an oops with its call trace is 40-80 lines).
    LINES = 80

    #: QEMU's exit (status, last stderr line, triple fault) if it ended by itself, else None
    qemu_exit: str | None
    #: QEMU logged a triple fault (``-d cpu_reset``)
    triple_fault: bool
    #: the last :attr:`LINES` lines of the serial console
    console: str

    def tail(self, lines: int) -> str:
        """The last ``lines`` lines of :attr:`console`."""
        return "\n".join(self.console.splitlines()[-lines:])


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
        self.relay: GdbRelay | None = None
        self.gdb: GdbMi | None = None
        self.console: Console | None = None
        self.regmap = RegisterMap({})
        self.symbols = SymbolTable((), "none")
        self.per_cpu_offsets: dict[int, int] = {}
        self.build_id = ""
        self.release = ""
        self.pti_enabled = False
        self.running = False
        self.boot_seconds = 0.0
        self.started_at = 0.0
        #: Seconds since :attr:`started_at` at which each boot phase ended, in order.
        self.boot_phases: dict[str, float] = {}
        self.closed = False
        self.traces: list[Trace] = []
        self.effort = Effort()
        self.workloads: dict[int, str] = {}
        self._symbols_loading: Future[list[Symbol]] | None = None

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
        return BootEnd(
            qemu_exit=machine.exit_reason() if ended else None,
            triple_fault=machine.triple_faulted(),
            console=machine.console_tail(BootEnd.LINES),
        )

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
        self.gdb = GdbMi(self.config.gdb, cwd=self.machine.dir)
        if self.config.vmlinux is not None:
            self._symbols_loading = _background(elf_symbols, self.config.vmlinux)
        self.machine.start()
        self.console = Console(self.machine.console_socket, self.machine.console_log)
        self.machine.qmp("cont")  # the kernel boots while GDB starts and attaches
        self._phase("qemu started")
        for setting in ("mi-async on", "pagination off", "confirm off"):
            self.gdb.command(f"-gdb-set {setting}")
        self._phase("gdb started")
        machine = self.machine
        stub = machine.gdb_socket
        self.relay = GdbRelay(lambda: machine.host.open_stream(stub), machine.dir / "gdb-relay.sock")
        self.gdb.command(f"-target-select remote {self.relay.listen_path}")
        self.gdb.wait_stopped(10)
        self.gdb.command("-gdb-set scheduler-locking step")
        self.regmap = RegisterMap.from_gdb_table(self.gdb.cli("maint print remote-registers"))
        self.resume()
        self._phase("gdb attached")
        self._wait_ready()
        self.boot_seconds = time.monotonic() - self.started_at
        self._phase("ready marker")
        self._learn_kernel()
        self._phase("kernel learnt")

    def _phase(self, name: str) -> None:
        self.boot_phases[name] = time.monotonic() - self.started_at

    def _wait_ready(self) -> None:
        assert self.console is not None
        try:
            self.console.wait_ready(self.config.boot_timeout)
        except GuestError as exc:
            raise GuestError(f"{self.config.kernel} did not boot: {exc}") from None

    def _learn_kernel(self) -> None:
        """Release, build-id, PTI state, symbols and per-CPU offsets of the running kernel.

        With a vmlinux, everything comes through the gdbstub (no console round trip; each
        costs 0.05-1 s under TCG on a loaded machine): the symbols were parsed while the
        kernel booted, the build-id is read from the kernel's own notes in memory
        (``__start_notes``..``__stop_notes``) and must equal the vmlinux's, the release
        is the one ``linux_banner`` names, and PTI is on iff :meth:`_pti_active`.
        Without one, the console gives release, build-id and the PTI line of dmesg, and
        the symbols come from /proc/kallsyms (cached by build-id).
        """
        assert self.console is not None
        if self.config.vmlinux is not None:
            self._learn_from_vmlinux(self.config.vmlinux)
            return
        self.release = self.console.check("uname -r").strip()
        notes_hex = self.console.check("od -An -tx1 -v /sys/kernel/notes")
        self.build_id = notes_build_id(bytes.fromhex("".join(notes_hex.split()))) or ""
        dmesg = self.console.check("dmesg | grep -i 'page tables isolation' || true")
        self.pti_enabled = bool(re.search(r"isolation: (enabled|force enabled)", dmesg))
        self.symbols = self._load_kallsyms()
        with self.stopped(), self.link() as link:
            reader = self._kernel_reader(link, self.symbols.get("linux_banner"))
            self._read_per_cpu_offsets(reader, link)
            banner = reader.read(link, self.symbols.address("linux_banner"), 64) or b""
        if not banner.startswith(b"Linux version " + self.release.encode()):
            raise ConfigError(
                f"the symbols ({self.symbols.source}) do not match the running kernel "
                f"{self.release!r}: linux_banner reads {banner[:40]!r}; pass the vmlinux of "
                "this build with --vmlinux"
            )

    def _learn_from_vmlinux(self, vmlinux: Path) -> None:
        loading, self._symbols_loading = self._symbols_loading, None
        symbols = SymbolTable(loading.result() if loading is not None else elf_symbols(vmlinux), str(vmlinux))
        vid = elf_build_id(vmlinux) or ""
        needed = ("linux_banner", "__start_notes", "__stop_notes", "__per_cpu_offset", "entry_SYSCALL_64")
        missing = [n for n in needed if n not in symbols]
        if missing:
            raise ConfigError(
                f"--vmlinux {vmlinux} does not match the running kernel: it has no "
                f"{', '.join(missing)}; pass the unstripped vmlinux of this build"
            )
        start, stop = symbols.address("__start_notes"), symbols.address("__stop_notes")
        with self.stopped(), self.link() as link:
            reader = self._kernel_reader(link, symbols.address("linux_banner"))
            notes = reader.read(link, start, stop - start) if 0 < stop - start <= 4096 else None
            banner = reader.read(link, symbols.address("linux_banner"), 256) or b""
            self.build_id = notes_build_id(notes or b"") or ""
            if vid and vid != self.build_id:
                running = self.build_id[:12] or "unreadable at the vmlinux's __start_notes"
                raise ConfigError(
                    f"--vmlinux {vmlinux} (build-id {vid[:12]}) does not match the running "
                    f"kernel (build-id {running}); pass the vmlinux of that build"
                )
            m = re.match(rb"Linux version (\S+) ", banner)
            if m is None:
                raise ConfigError(
                    f"--vmlinux {vmlinux} does not match the running kernel: linux_banner reads "
                    f"{banner[:40]!r}; pass the vmlinux of this build"
                )
            self.release = m.group(1).decode(errors="replace")
            self.symbols = symbols
            self._read_per_cpu_offsets(reader, link)
            self.pti_enabled = self._pti_active(reader, link)

    def _read_per_cpu_offsets(self, reader: Vcpu, link: RspLink) -> None:
        base = self.symbols.address("__per_cpu_offset")
        for cpu in range(self.config.smp):
            value = reader.read_u64(link, base + 8 * cpu)
            if value is None:
                raise GuestError("cannot read __per_cpu_offset through a kernel-mode vCPU")
            self.per_cpu_offsets[cpu] = value

    def _pti_active(self, reader: Vcpu, link: RspLink) -> bool:
        """True iff the kernel runs with page table isolation.

        PTI's defining property: the entry code is mapped in the user half of the PGD
        pair (kernel PGD + 4 KiB, CR3 bit 12). Without PTI at run time that page is
        zeroed (``pgd_alloc``'s ``__GFP_ZERO``) and nothing is mapped through it; a
        kernel built without PTI (no ``pti_init``) has no such page, so it is not
        walked. Both walks must reach the same physical byte of ``entry_SYSCALL_64``.
        The same answer as dmesg's "page tables isolation: enabled" line, without a
        console round trip (tests/test_nopti.py boots ``nopti``).
        """
        if "pti_init" not in self.symbols:
            return False
        regs = reader.registers(link, ("cr3", "cr4"))
        cr3 = decode_cr3(regs["cr3"], regs["cr4"])
        entry = self.symbols.address("entry_SYSCALL_64")
        five = bool(regs["cr4"] & X86_CR4_LA57)

        def read_u64(addr: int) -> int:
            return int.from_bytes(read_physical(link, addr, 8), "little")

        kernel = walk(cr3.kernel_pgd, entry, read_u64, five_level=five)
        user = walk(cr3.kernel_pgd | (1 << PTI_USER_PGTABLE_BIT), entry, read_u64, five_level=five)
        return kernel.present and user.physical == kernel.physical

    def _load_kallsyms(self) -> SymbolTable:
        assert self.console is not None
        kaslr = "nokaslr" not in self.config.cmdline().split()
        path = cache_path(self.config.cache_dir, self.build_id or self.release, kaslr)
        if path.exists() and not kaslr:
            return SymbolTable.from_json(path.read_text(), f"kallsyms (cached {path.name})")
        # gzip + base64 moves ~1 MB instead of ~4 MB over the emulated UART (~6 s under TCG)
        packed = self.console.check("gzip -c /proc/kallsyms | base64", timeout=300)
        text = gzip.decompress(base64.b64decode("".join(packed.split()))).decode()
        table = SymbolTable(parse_kallsyms(text), "/proc/kallsyms")
        if len(table) < 1000:
            raise GuestError(f"/proc/kallsyms gave only {len(table)} symbols")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per writer: sessions share the cache
        tmp.write_text(table.to_json())
        tmp.replace(path)
        return table

    def _kernel_reader(self, link: RspLink, banner: int | None) -> Vcpu:
        """A vCPU through whose page tables kernel data reads (to learn the kernel).

        Under PTI that is a vCPU whose CR3 has bit 12 clear (the kernel half of the PGD
        pair). Without PTI (``nopti``) every CR3 maps the kernel, but a PGD is only 4 KiB
        aligned, so bit 12 says nothing: then the first vCPU through which
        ``linux_banner`` (at ``banner``) reads as a banner serves."""
        cpus = range(self.config.smp)
        for cpu in cpus:
            regs = self.vcpu(cpu).registers(link, ("cr3",))
            if not regs.get("cr3", 0) & (1 << 12):
                return self.vcpu(cpu)
        if banner is not None:
            for cpu in cpus:
                if (self.vcpu(cpu).read(link, banner, 14) or b"").startswith(b"Linux version "):
                    return self.vcpu(cpu)
        raise GuestError("no vCPU has the kernel page tables loaded right now")

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

    # -- run control ---------------------------------------------------------------
    def _gdb(self) -> GdbMi:
        if self.gdb is None:
            raise GuestError("GDB is not attached")
        return self.gdb

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

    def _check_alive(self) -> None:
        if not self.machine.alive:
            raise GuestError(f"QEMU is gone: {self.machine.exit_reason()}")

    @contextlib.contextmanager
    def _qemu_gone_is_the_error(self) -> Iterator[None]:
        """A GDB error caused by QEMU (or the host's connection) going away says so."""
        try:
            yield
        except GdbError:
            self._check_alive()
            raise

    def resume(self) -> None:
        """Let every vCPU run."""
        if not self.running:
            self._check_alive()
            with self._qemu_gone_is_the_error():
                self._gdb().drain_stopped()
                self._gdb().command("-exec-continue")
            self.running = True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every vCPU (all-stop) and wait until GDB reports it."""
        if self.running:
            self._check_alive()
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
        self._check_alive()
        with self.relay.borrow() as link:
            yield link
        self._gdb().cli("maintenance flush register-cache")

    def vcpu(self, index: int) -> Vcpu:
        """vCPU ``index`` (GDB thread ``index + 1``)."""
        if not 0 <= index < self.config.smp:
            raise GuestError(f"vCPU {index} does not exist (smp={self.config.smp})")
        return Vcpu(index, self.regmap)

    def per_cpu(self, name: str, cpu: int) -> int:
        """The address of ``name``'s copy for ``cpu``."""
        return per_cpu_address(self.symbols, self.per_cpu_offsets, name, cpu)

    def translate(self, virtual: int, *, user_tables: bool, cpu: int = 0) -> Translation:
        """Walk ``virtual`` through vCPU ``cpu``'s kernel or PTI user page tables (physically).

        The pair is found from the vCPU's CR3 whichever half it has loaded: the user PGD
        is the kernel PGD + 4 KiB (CR3 bit 12).
        """
        with self.stopped(), self.link() as link:
            regs = self.vcpu(cpu).registers(link, ("cr3", "cr4"))
            cr3 = decode_cr3(regs["cr3"], regs["cr4"])
            pgd = cr3.kernel_pgd | ((1 << PTI_USER_PGTABLE_BIT) if user_tables else 0)

            def read_u64(addr: int) -> int:
                return int.from_bytes(read_physical(link, addr, 8), "little")

            return walk(pgd, virtual, read_u64, five_level=bool(regs["cr4"] & X86_CR4_LA57))

    def break_on(
        self,
        address: int | Sequence[int],
        cpu: int,
        timeout: float = 60.0,
        trigger: Callable[[], None] | None = None,
    ) -> int:
        """Run until vCPU ``cpu`` executes ``address`` (or any of several); return the one hit.

        Hits on other vCPUs are filtered by GDB (thread-specific breakpoints). The
        breakpoints exist only while waiting (armed after boot, deleted at the stop).
        ``trigger`` runs right after the guest is resumed (e.g. to inject an NMI).
        """
        addresses = [address] if isinstance(address, int) else list(address)
        what = " or ".join(self.symbols.describe(a) for a in addresses)
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
                    self.effort.breaks += 1
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

    # -- guest userspace -------------------------------------------------------------
    def start_workload(self, name: str, cpu: int | None = None) -> int:
        """Start ``/bin/<name> <cpu>`` in the background; return its pid once it runs."""
        assert self.console is not None
        cpu = self.config.isolated if cpu is None else cpu
        self.resume()
        line = self.console.start_background(
            f"/bin/{name} {cpu}", re.escape(f"{WORKLOAD_MARKER} {name} cpu={cpu}")
        )
        m = re.search(r"pid=(\d+)", line)
        if m is None:
            raise GuestError(f"workload {name} printed no pid: {line!r}")
        self.workloads[int(m.group(1))] = name
        return int(m.group(1))

    def shell(self, command: str, timeout: float = 30.0) -> tuple[str, int]:
        """Run ``command`` in the guest shell (resuming the guest first); (output, status)."""
        assert self.console is not None
        self.resume()
        return self.console.run(command, timeout)

    def stop_workload(self, pid: int) -> None:
        """Kill a workload started with :meth:`start_workload`."""
        assert self.console is not None
        self.resume()
        self.console.run(f"kill -9 {pid}; wait {pid} 2>/dev/null")
        self.workloads.pop(pid, None)

    def kill_workloads(self) -> None:
        """Kill every workload still running (between tests)."""
        for pid in list(self.workloads):
            self.stop_workload(pid)

    # -- stepping --------------------------------------------------------------------
    def step(
        self,
        cpu: int,
        *,
        watches: tuple[Watch, ...] | list[Watch] = (),
        max_steps: int,
        stop: StopCondition | None = None,
    ) -> Trace:
        """Single-step vCPU ``cpu`` (others frozen) from where it stopped; keep the trace.

        Each snapshot gets its instruction text and ``symbol+offset``; the trace is kept
        in :attr:`traces` for the failure report.
        """
        if self.running:
            raise GuestError("stop the guest (e.g. with break_on) before stepping")
        stepper = Stepper(self.regmap, self.config.smp, cpu, watches)
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


def _background(fn: Callable[[Path], list[Symbol]], arg: Path) -> Future[list[Symbol]]:
    """Run ``fn(arg)`` on a daemon thread (it never blocks an exit); its result or error
    comes out of the returned future."""
    fut: Future[list[Symbol]] = Future()

    def run() -> None:
        try:
            fut.set_result(fn(arg))
        except BaseException as exc:  # handed to whoever asks for the result
            fut.set_exception(exc)

    threading.Thread(target=run, name="vmlinux-symbols", daemon=True).start()
    return fut
