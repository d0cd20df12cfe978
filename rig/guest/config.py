"""What decides one boot: :class:`GuestConfig`, and the static checks of its inputs.

:meth:`GuestConfig.validate` and :func:`check_inputs` run in seconds, before anything is
started: a bad option is a one-line :class:`~rig.errors.ConfigError` naming the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rig.errors import ConfigError
from rig.supply.cache import default_cache_dir
from rig.supply.images import is_kernel_image, vmlinux_problem
from rig.transport.host import Host, require_program
from rig.transport.local import LocalHost
from rig.transport.qemu import QemuPlugin, check_accel, check_cmdline_length

__all__ = ["BASE_CMDLINE", "GuestConfig", "check_inputs"]

#: Parameters every boot gets unless the user's ``--append`` sets them otherwise.
#:
#: ``tsc=reliable``: QEMU's clocks run on through the rig's stops and single steps, and
#: the kernel's clocksource watchdog, comparing the TSC with HPET across them (its read
#: of a stopped vCPU times out), marked the TSC unstable in some runs. That clears
#: ``sched_clock_stable``, which sets a tick dependency on every CPU
#: (``TICK_DEP_BIT_CLOCK_UNSTABLE``): the isolated vCPU's tick never stopped again, and
#: under watch mode each tick from user mode costs four stops, about the tick's period
#: (a selftest on the isolated vCPU: 1,592 transitions instead of 318). The TSC of a TCG
#: guest is one counter for every vCPU, derived from the same clock as HPET.
BASE_CMDLINE = ("console=ttyS0", "la57=off", "nokaslr", "panic=-1", "quiet", "tsc=reliable")


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
