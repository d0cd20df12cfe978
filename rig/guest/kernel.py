"""The identity of the running kernel: release, build-id, PTI state, symbols, per-CPU offsets.

With a vmlinux, everything comes through the gdbstub (no console round trip; each costs
0.05-1 s under TCG on a loaded machine): the symbols are parsed while the kernel boots
(:meth:`KernelIdentity.start_loading`), the build-id is read from the kernel's own notes
in memory (``__start_notes``..``__stop_notes``) and must equal the vmlinux's, the release
is the one ``linux_banner`` names, and PTI is on iff :func:`rig.machine.walks.pti_active`.
Without one, the console gives release, build-id and the PTI line of dmesg, and the
symbols come from /proc/kallsyms (cached by build-id).
"""

from __future__ import annotations

import base64
import gzip
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from rig.errors import ConfigError, GuestError
from rig.guest.config import GuestConfig
from rig.guest.runcontrol import RunControl
from rig.machine.symbols import (
    Symbol,
    SymbolTable,
    cache_path,
    elf_build_id,
    elf_symbols,
    notes_build_id,
    parse_kallsyms,
    per_cpu_address,
)
from rig.machine.vcpu import Vcpu
from rig.machine.walks import kernel_reader, pti_active
from rig.transport.console import Console
from rig.transport.rsp import RspLink

__all__ = ["KernelIdentity"]


class KernelIdentity:
    """What the running kernel is. Empty until :meth:`learn`."""

    def __init__(self) -> None:
        self.symbols = SymbolTable((), "none")
        self.per_cpu_offsets: dict[int, int] = {}
        self.build_id = ""
        self.release = ""
        self.pti_enabled = False
        self._symbols_loading: Future[list[Symbol]] | None = None

    def per_cpu(self, name: str, cpu: int) -> int:
        """The address of ``name``'s copy for ``cpu``."""
        return per_cpu_address(self.symbols, self.per_cpu_offsets, name, cpu)

    def start_loading(self, vmlinux: Path) -> None:
        """Parse ``vmlinux``'s symbols on a thread of their own (while the kernel boots)."""
        self._symbols_loading = _background(elf_symbols, vmlinux)

    def loaded_symbols(self, vmlinux: Path | None, timeout: float) -> SymbolTable | None:
        """The vmlinux symbols :meth:`start_loading` is parsing, waiting up to ``timeout``
        seconds; None without a vmlinux. For a boot that failed before :meth:`learn`.

        Raises:
            TimeoutError: still parsing after ``timeout`` seconds.
            ConfigError: the vmlinux has no symbol table.
        """
        if vmlinux is None or self._symbols_loading is None:
            return None
        return SymbolTable(self._symbols_loading.result(timeout), str(vmlinux))

    def learn(self, run: RunControl, console: Console, config: GuestConfig) -> None:
        """Learn the running kernel of a booted guest (see the module doc)."""
        if config.vmlinux is not None:
            self._learn_from_vmlinux(run, config.vmlinux)
            return
        self.release = console.check("uname -r").strip()
        notes_hex = console.check("od -An -tx1 -v /sys/kernel/notes")
        self.build_id = notes_build_id(bytes.fromhex("".join(notes_hex.split()))) or ""
        dmesg = console.check("dmesg | grep -i 'page tables isolation' || true")
        self.pti_enabled = bool(re.search(r"isolation: (enabled|force enabled)", dmesg))
        self.symbols = self._load_kallsyms(console, config)
        with run.stopped(), run.link() as link:
            reader = self._reader(run, link, self.symbols.get("linux_banner"))
            self._read_per_cpu_offsets(reader, link, config.smp)
            banner = reader.read(link, self.symbols.address("linux_banner"), 64) or b""
        if not banner.startswith(b"Linux version " + self.release.encode()):
            raise ConfigError(
                f"the symbols ({self.symbols.source}) do not match the running kernel "
                f"{self.release!r}: linux_banner reads {banner[:40]!r}; pass the vmlinux of "
                "this build with --vmlinux"
            )

    def _learn_from_vmlinux(self, run: RunControl, vmlinux: Path) -> None:
        loading, self._symbols_loading = self._symbols_loading, None
        symbols = SymbolTable(loading.result() if loading is not None else elf_symbols(vmlinux), str(vmlinux))
        vid = elf_build_id(vmlinux) or ""
        needed = (
            "linux_banner",
            "__start_notes",
            "__stop_notes",
            "__per_cpu_offset",
            "entry_SYSCALL_64",
            "init_task",
        )
        missing = [n for n in needed if n not in symbols]
        if missing:
            raise ConfigError(
                f"--vmlinux {vmlinux} does not match the running kernel: it has no "
                f"{', '.join(missing)}; pass the unstripped vmlinux of this build"
            )
        start, stop = symbols.address("__start_notes"), symbols.address("__stop_notes")
        with run.stopped(), run.link() as link:
            reader = self._reader(run, link, symbols.address("linux_banner"))
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
            self._read_per_cpu_offsets(reader, link, run.smp)
            # a kernel built without PTI (no pti_init) has no user half of its PGD pair
            self.pti_enabled = "pti_init" in symbols and pti_active(
                link, reader, symbols.address("entry_SYSCALL_64"), symbols.address("init_task")
            )

    @staticmethod
    def _reader(run: RunControl, link: RspLink, banner: int | None) -> Vcpu:
        return kernel_reader(link, [run.vcpu(cpu) for cpu in range(run.smp)], banner)

    def _read_per_cpu_offsets(self, reader: Vcpu, link: RspLink, smp: int) -> None:
        base = self.symbols.address("__per_cpu_offset")
        for cpu in range(smp):
            value = reader.read_u64(link, base + 8 * cpu)
            if value is None:
                raise GuestError("cannot read __per_cpu_offset through a kernel-mode vCPU")
            self.per_cpu_offsets[cpu] = value

    def _load_kallsyms(self, console: Console, config: GuestConfig) -> SymbolTable:
        kaslr = "nokaslr" not in config.cmdline().split()
        path = cache_path(config.cache_dir, self.build_id or self.release, kaslr)
        if path.exists() and not kaslr:
            return SymbolTable.from_json(path.read_text(), f"kallsyms (cached {path.name})")
        # gzip + base64 moves ~1 MB instead of ~4 MB over the emulated UART (~6 s under TCG)
        packed = console.check("gzip -c /proc/kallsyms | base64", timeout=300)
        text = gzip.decompress(base64.b64decode("".join(packed.split()))).decode()
        table = SymbolTable(parse_kallsyms(text), "/proc/kallsyms")
        if len(table) < 1000:
            raise GuestError(f"/proc/kallsyms gave only {len(table)} symbols")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per writer: sessions share the cache
        tmp.write_text(table.to_json())
        tmp.replace(path)
        return table


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
