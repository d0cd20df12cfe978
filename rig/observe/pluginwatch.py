"""Plugin watch mode: every CR3 switch of every vCPU, read inside QEMU by a TCG plugin.

The gdbstub watch mode (:mod:`rig.observe.watching`) stops the whole VM at every site hit
and pays three round trips. Here QEMU reads the same values itself: the TCG plugin
``rig/observe/cr3watch.c`` (built by :mod:`rig.supply.qemuplugin`) instruments, at
translation, every CR3 write and signal store of the entry/noinstr text
(:func:`rig.machine.sites.find_sites`), the instruction after each, and ``paranoid_entry``.
At a site it reads the vCPU's CR3, the register the instruction writes from (the value
about to be loaded or stored) and the vCPU's signal; at the vCPU's next instrumented
instruction (normally the one right after) CR3 and the signal again. The guest never
stops. Records stream over a unix socket in QEMU's private directory to this module,
which feeds the one checker of both modes, :class:`rig.observe.transitions.TransitionChecker`,
and counts per site exactly as the gdbstub mode does (:class:`WatchResult`).

Arming: the plugin is loaded at QEMU start but records nothing until :func:`watch`
connects (after boot, with the per-CPU signal addresses it learnt from the booted
kernel); it stops recording when :func:`watch` disconnects. That is the rig's rule for
breakpoints, "armed only after boot", and boot costs no records.

What it reads differently from the gdbstub mode, honestly: the signal is read with
``qemu_plugin_read_memory_vaddr`` through the *hitting* vCPU's own page tables, at that
instant. Under TCG all vCPUs share one guest memory, so that is the value every vCPU
reads from the same physical page; but a bug that maps a *different* page into another
vCPU's view (an alias) is seen only by the gdbstub mode, which reads through each other
vCPU's page tables. An extra check the plugin makes possible: after a CR3 write or a
signal store, the value read back must be the value the instruction wrote (the operand
register or immediate), so a store that went elsewhere (another CPU's copy) is caught.

Needs QEMU with TCG plugin API 4 (QEMU >= 9.2; the cached 10.0.2 from bookworm-backports),
not Debian bookworm's 7.2 (:func:`rig.supply.qemuplugin.plugin_support`).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rig.errors import ConfigError, GuestError
from rig.guest import Guest
from rig.machine.sites import Site, find_sites
from rig.machine.symbols import SymbolTable, elf_symbols
from rig.machine.x86 import X86_CR3_PCID_NOFLUSH
from rig.observe.findings import Finding, Rule
from rig.observe.transitions import CR3Sides, Hit, TransitionChecker
from rig.observe.watching import MAX_PROBLEMS, SiteTally, WatchResult
from rig.supply.qemuplugin import build_plugin, plugin_support
from rig.transport.qemu import QemuPlugin

#: The record the plugin streams (struct record in cr3watch.c), little-endian:
#: type, flags, cpu, site index, cr3 before, operand, cr3 after, signal before, signal after.
RECORD = struct.Struct("<BBHIQQQII")
REC_SITE, REC_PARANOID = 1, 2
F_SIG_BEFORE, F_SIG_AFTER, F_AT_NEXT, F_OPERAND, F_CR3_BEFORE_BAD, F_CR3_AFTER_BAD = 1, 2, 4, 8, 16, 32
#: Names of the plugin's files in QEMU's private directory.
SITES_FILE = "cr3watch-sites.txt"
SOCKET = "cr3watch.sock"
#: Seconds without any record before the watch fails as stuck.
RECORD_TIMEOUT = 10.0

_REG32 = {f"e{r}": f"r{r}" for r in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp")}
_REG32.update({f"r{n}d": f"r{n}" for n in range(8, 16)})


def operand(site: Site) -> str:
    """The plugin's operand field of ``site``: ``$<hex>`` (an immediate), a 64-bit register
    name (``rax``; the value the instruction writes is its low bits), or ``-``."""
    if site.value is not None:
        return f"${site.value:x}"
    body = site.insn.split(" ", 1)[1] if " " in site.insn else ""
    src = body.split(",", 1)[0].strip()
    if src.startswith("%"):
        name = src[1:]
        name = _REG32.get(name, name)
        if name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp") or (
            name[:1] == "r" and name[1:].isdigit() and 8 <= int(name[1:]) <= 15
        ):
            return name
    return "-"


def _operand_bits(site: Site) -> int:
    """How many low bits of the operand register the instruction writes."""
    body = site.insn.split(" ", 1)[1] if " " in site.insn else ""
    src = body.split(",", 1)[0].strip()[1:]
    return 32 if src in _REG32 or site.insn.startswith("movl") else 64


def sites_file(sites: Sequence[Site], paranoid_entry: int | None) -> str:
    """The plugin's sites file: ``<index> <addr> <next> <kind> <operand>`` per line."""
    lines = []
    for i, s in enumerate(sites):
        if not s.next_address:
            raise ConfigError(f"site {s.where} has no following instruction in the text; cannot watch it")
        kind = "cr3" if s.kind == "cr3-write" else "store"
        lines.append(f"{i} {s.address:x} {s.next_address:x} {kind} {operand(s)}")
    if paranoid_entry is not None:
        lines.append(f"{len(sites)} {paranoid_entry:x} 0 paranoid -")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PluginWatch:
    """What to boot a guest with for plugin watching (:meth:`prepare`), and the sites."""

    sites: tuple[Site, ...]
    plugin: QemuPlugin
    signal: str

    @classmethod
    def prepare(cls, vmlinux: Path, *, signal: str, qemu: str, cache_dir: Path) -> PluginWatch:
        """Find the sites in ``vmlinux``, build the plugin; ConfigError if ``qemu`` cannot load it."""
        why = plugin_support(qemu)
        if why is not None:
            raise ConfigError(why)
        symbols = SymbolTable(elf_symbols(vmlinux), f"{vmlinux}")
        sites = tuple(find_sites(vmlinux, symbols, signal))
        if not sites:
            raise ConfigError(f"{vmlinux}: no CR3 switch sites in its entry/noinstr text")
        library = build_plugin(cache_dir)
        text = sites_file(sites, symbols.get("paranoid_entry"))
        plugin = QemuPlugin(
            library,
            args=(("sites", f"{{dir}}/{SITES_FILE}"), ("sock", f"{{dir}}/{SOCKET}")),
            files=((SITES_FILE, text),),
        )
        return cls(sites, plugin, signal)


@dataclass
class PluginWatchResult(WatchResult):
    """A :class:`WatchResult` with what only the plugin mode counts."""

    #: hits completed at an instruction other than the one after the site (an interrupt
    #: was taken in between; the values are still those right after the site)
    completed_later: int = 0
    #: signal reads that failed (not mapped through the hitting vCPU's page tables)
    unreadable_signals: int = 0
    records: int = 0
    reads: dict[str, int] = field(default_factory=dict)

    def table(self) -> str:
        head = (
            f"plugin watch (QEMU TCG plugin, the guest never stopped): {self.records} records, "
            f"{self.completed_later} hits completed after an interrupt, "
            f"{self.unreadable_signals} unreadable signal reads"
        )
        return head + "\n" + super().table()


class RecordChecker:
    """The checks of the plugin's records (pure, no guest): the transition rules, CR3-side
    continuity per vCPU, the value each instruction wrote, and fail-closed reads (a signal
    or CR3 the plugin could not read is a finding, never a pass)."""

    def __init__(self, sites: Sequence[Site], ncpus: int) -> None:
        self.sites = tuple(sites)
        self.ncpus = ncpus
        self._masks = [(1 << _operand_bits(s)) - 1 for s in self.sites]
        self._sides = CR3Sides(ncpus)

    def feed(self, rec: tuple[int, ...], result: PluginWatchResult, checker: TransitionChecker) -> None:
        """Check one record of the plugin (:data:`RECORD` unpacked) and count it in ``result``.

        Raises:
            GuestError: a malformed record (unknown type, site or vCPU).
        """
        rtype, flags, cpu, index, cr3_before, op, cr3_after, sig_before, sig_after = rec
        result.records += 1
        before = sig_before if flags & F_SIG_BEFORE else None
        sites = self.sites
        if (
            cpu >= self.ncpus
            or rtype not in (REC_SITE, REC_PARANOID)
            or (rtype == REC_SITE and index >= len(sites))
        ):
            raise GuestError(
                f"the watch plugin sent a malformed record (type {rtype}, site {index}, vCPU {cpu})"
            )
        where = "paranoid_entry" if rtype == REC_PARANOID else sites[index].where
        # fail closed: a value the plugin could not read is a finding, never a pass
        if before is None:
            result.unreadable_signals += 1
            result.problems.append(_unreadable(cpu, f"before {where}"))
        if flags & F_CR3_BEFORE_BAD:
            result.problems.append(
                Finding(
                    Rule.RIG_PREMISE,
                    f"vCPU {cpu}: CR3 could not be read before {where}",
                    cpu=cpu,
                    where=where,
                )
            )
        if rtype == REC_PARANOID:
            result.problems += self._sides.continues(cpu, cr3_before, "paranoid_entry")
            result.paranoid_entries += 1
            result.problems += checker.paranoid_entry(cpu, before)
            return
        site = sites[index]
        result.problems += self._sides.continues(cpu, cr3_before, site.where)
        self._sides.left(cpu, cr3_after)
        after = sig_after if flags & F_SIG_AFTER else None
        if after is None:
            result.unreadable_signals += 1
            result.problems.append(_unreadable(cpu, f"after {where}"))
        if flags & F_CR3_AFTER_BAD:
            result.problems.append(
                Finding(
                    Rule.RIG_PREMISE, f"vCPU {cpu}: CR3 could not be read after {where}", cpu=cpu, where=where
                )
            )
        if not flags & F_AT_NEXT:
            result.completed_later += 1
        hit = Hit(cpu, site, cr3_before, cr3_after, before, after)
        result.record(hit)
        result.problems += checker.check(hit)
        if flags & F_OPERAND:
            result.problems += _loaded_value_problems(hit, op & self._masks[index])


class PluginWatcher:
    """Consumes the plugin's records of one booted ``guest`` and checks them."""

    def __init__(self, guest: Guest, watch: PluginWatch) -> None:
        if guest.config.plugin != watch.plugin:
            raise GuestError("the guest was not booted with this PluginWatch's plugin (GuestConfig.plugin)")
        if guest.config.smp > 64:
            raise ConfigError(f"plugin watch handles at most 64 vCPUs, not {guest.config.smp}")
        self.guest = guest
        self.watch = watch
        self.ncpus = guest.config.smp
        self.signal_addresses = [guest.per_cpu(watch.signal, n) for n in range(self.ncpus)]
        self.records = RecordChecker(watch.sites, self.ncpus)

    def _connect(self) -> socket.socket:
        path = self.guest.machine.dir / SOCKET
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(RECORD_TIMEOUT)
            sock.connect(str(path))
            sock.sendall(struct.pack(f"<I{self.ncpus}Q", self.ncpus, *self.signal_addresses))
            line = b""
            while not line.endswith(b"\n"):
                chunk = sock.recv(1)
                if not chunk:
                    raise GuestError(f"the watch plugin closed {path} without answering")
                line += chunk
            said = line.decode(errors="replace").strip()
            if said != "OK":
                raise GuestError(f"the watch plugin refused the watch: {said}")
        except OSError as exc:
            sock.close()
            why = self.guest.machine.exit_reason()
            raise GuestError(f"cannot reach the watch plugin at {path}: {exc} ({why})") from exc
        except BaseException:
            sock.close()
            raise
        return sock

    def run(
        self, transitions: int, *, nmi_every: int = 0, max_seconds: float = 120.0, min_per_cpu: int = 0
    ) -> PluginWatchResult:
        """Check until ``transitions`` CR3 side changes were seen and every vCPU hit a site
        at least ``min_per_cpu`` times (or ``max_seconds``: then GuestError).

        ``nmi_every``: inject an NMI (QMP; it reaches every vCPU) every ``nmi_every``
        site hits, while the guest runs. ``min_per_cpu`` makes "every vCPU was watched"
        independent of timing: a few thousand transitions of a fast loop on one vCPU can
        take less time than one pass of a slower workload on another.
        """
        g = self.guest
        result = PluginWatchResult(
            f"{g.release} ({g.config.label})" if g.config.label else g.release,
            self.ncpus,
            {s.address: SiteTally(s) for s in self.watch.sites},
        )
        checker = TransitionChecker(self.ncpus, self.watch.sites)
        size = RECORD.size
        pending = b""
        next_nmi = nmi_every
        t0 = time.monotonic()
        sock = self._connect()
        try:
            while (
                result.transitions < transitions
                or any(result.hits_by_cpu.get(c, 0) < min_per_cpu for c in range(self.ncpus))
            ) and len(result.problems) < MAX_PROBLEMS:
                if time.monotonic() - t0 > max_seconds:
                    result.seconds = time.monotonic() - t0
                    hits = result.hits_by_cpu
                    per_cpu = ", ".join(f"vCPU {c}: {hits.get(c, 0)}" for c in range(self.ncpus))
                    raise GuestError(
                        f"plugin watch checked only {result.transitions} of {transitions} transitions "
                        f"(site hits {per_cpu}; at least {min_per_cpu} each wanted) in {max_seconds:.0f} s "
                        f"(are the workloads running?)\n{result.table()}"
                    )
                try:
                    chunk = sock.recv(1 << 16)
                except TimeoutError:
                    raise GuestError(
                        f"no CR3 switch site ran on any vCPU for {RECORD_TIMEOUT:.0f} s "
                        f"({g.machine.exit_reason()}; are the workloads running?)"
                    ) from None
                if not chunk:
                    raise GuestError(f"the watch plugin closed its stream ({g.machine.exit_reason()})")
                data = pending + chunk
                whole = len(data) - len(data) % size
                pending = data[whole:]
                for rec in RECORD.iter_unpack(data[:whole]):
                    self.records.feed(rec, result, checker)
                if nmi_every and result.hits >= next_nmi:
                    g.machine.inject_nmi()
                    result.nmis += 1
                    next_nmi = result.hits + nmi_every
        finally:
            sock.close()  # the plugin stops recording
            result.seconds = result.running_seconds = time.monotonic() - t0
            result.unverified_restores = checker.unverified_restores
        return result


def _unreadable(cpu: int, when: str) -> Finding:
    """A signal read that failed: the signal is not mapped through that vCPU's CR3 there."""
    return Finding(
        Rule.SIGNAL_UNREADABLE,
        f"vCPU {cpu}: its signal could not be read {when} (not mapped through its CR3 there?)",
        cpu=cpu,
    )


def _loaded_value_problems(hit: Hit, written: int) -> list[Finding]:
    """The value read back after the instruction is the value it wrote."""
    where = f"vCPU {hit.cpu} at {hit.site.where}"
    if hit.site.kind == "cr3-write":
        if hit.cr3_after != written & ~X86_CR3_PCID_NOFLUSH:
            text = f"{where}: the CR3 write wrote {written:#x} but CR3 reads {hit.cr3_after:#x} after it"
            return [Finding(Rule.UNLISTED_CR3_WRITE, text, cpu=hit.cpu, where=hit.site.where)]
        return []
    if hit.signal_after is not None and hit.signal_after != written:
        text = (
            f"{where}: the signal store wrote {written} but the vCPU's signal reads {hit.signal_after} "
            "after it (the store went elsewhere)"
        )
        return [Finding(Rule.UNLISTED_STORE, text, cpu=hit.cpu, where=hit.site.where)]
    return []


def watch(
    guest: Guest,
    plugin_watch: PluginWatch,
    *,
    transitions: int,
    nmi_every: int = 0,
    max_seconds: float = 120.0,
    min_per_cpu: int = 0,
) -> PluginWatchResult:
    """Check ``transitions`` CR3 side changes of every vCPU of ``guest`` (booted with
    ``plugin_watch.plugin``) while it runs, and at least ``min_per_cpu`` site hits of
    each vCPU; see the module doc.

    The workloads must already run. Kernel messages are kept off the serial console
    meanwhile; the guest runs on afterwards, the plugin no longer recording.
    """
    watcher = PluginWatcher(guest, plugin_watch)
    with guest.userspace.quiet_console():
        guest.resume()
        return watcher.run(transitions, nmi_every=nmi_every, max_seconds=max_seconds, min_per_cpu=min_per_cpu)
