"""Whether KVM can really run a guest on a host: flags, /dev/kvm, and a bounded test boot.

A /dev/kvm can exist and still not run guests usefully (a nested or emulated KVM that
hangs at the first VM entry), so the check ends with a real KVM boot of a 64 KiB
firmware whose reset vector writes one byte to QEMU's ``isa-debug-exit`` port: QEMU
then exits with status ``(0x31 << 1) | 1`` = 99. A hanging KVM costs at most
:data:`PROBE_SECONDS`. It proves VM entry, guest execution and VM exit, but a nested KVM
that hangs later (in a kernel's decompressor, say) passes it, so :func:`kernel_probe`
then boots the rig's own kernel and initramfs to its first user-space program
(``rdinit=/bin/true``), within :data:`KERNEL_PROBE_SECONDS`.

**Bounds.** Both boots run as every QEMU of the rig does, through :meth:`Host.spawn`
(:func:`run_bounded`), and the rig itself enforces their time: it polls the exit status
and, at the bound, kills the probe's process group (on an SSH host by closing the
supervisor's stdin). Whatever ends the rig's side ends the probe with it: on an SSH
host the supervisor kills it when the session ends (a dropped connection, the rig
killed); here ``setpriv --pdeathsig KILL`` kills it when the rig dies. (They ran under
``timeout -s KILL`` through ``Host.run`` before: a dropped connection or a dead rig left
the probe running up to its bound. ``timeout`` is not kept under ``spawn``: the death
signal would kill ``timeout`` and orphan its QEMU.) As with QEMU itself, a silent network
partition reaches the box's supervisor only when its sshd notices
(``ClientAliveInterval``/TCP keepalive).

**CPU model.** A KVM guest runs ``-cpu host`` (:data:`KVM_CPU`: the box's own CPU, with
its PCID). Some nested KVMs refuse QEMU's write of IA32_ARCH_CAPABILITIES (MSR 0x10a):
QEMU prints ``error: failed to set MSR 0x10a to 0x…`` and aborts on an assertion in
``kvm_buf_set_msrs`` before the guest runs. Both probes, and
:meth:`~rig.transport.qemu.QemuMachine.start` for every guest, then start once more with
:data:`KVM_CPU_WITHOUT_ARCH_CAPABILITIES` (:func:`kvm_cpu_retry` decides, the same way
for all three); a verdict names the model that ran when it is not ``host``, and a
guest's provenance records the model its QEMU runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from rig.errors import GuestError
from rig.transport.host import Host

#: Upper bound (s) on the probe boot.
PROBE_SECONDS = 10
#: QEMU's exit status when the probe firmware ran (isa-debug-exit: (0x31 << 1) | 1).
PROBE_EXIT = 99
#: How much of a probe's output is kept (bytes; the console's end is what is read).
PROBE_OUTPUT = 256 << 10

#: The ``-cpu`` model of a KVM guest: the box's own CPU (its PCID, which TCG lacks).
KVM_CPU = "host"
#: The model where ``-cpu host`` makes QEMU abort setting IA32_ARCH_CAPABILITIES (nested KVM).
KVM_CPU_WITHOUT_ARCH_CAPABILITIES = "host,-arch-capabilities"
#: QEMU's line before that abort (``kvm_buf_set_msrs``, QEMU 2.x to 10.x).
_ARCH_CAPABILITIES_ABORT = re.compile(r"failed to set MSR 0x0*10a\b", re.IGNORECASE)
#: The cause, as a verdict names it.
ARCH_CAPABILITIES_CAUSE = (
    "QEMU aborted setting MSR 0x10a (IA32_ARCH_CAPABILITIES; a nested KVM that refuses it)"
)


def arch_capabilities_abort(output: str) -> bool:
    """Whether QEMU's ``output`` shows it failing to set IA32_ARCH_CAPABILITIES (``error:
    failed to set MSR 0x10a to 0x…``, then an assertion in ``kvm_buf_set_msrs``)."""
    return _ARCH_CAPABILITIES_ABORT.search(output) is not None


def kvm_cpu_retry(cpu: str, output: str) -> str | None:
    """The ``-cpu`` model to start a KVM QEMU with again after one with ``cpu`` exited
    printing ``output``: :data:`KVM_CPU_WITHOUT_ARCH_CAPABILITIES` if ``cpu`` is
    :data:`KVM_CPU` and QEMU aborted on IA32_ARCH_CAPABILITIES; else None (no other
    model would help)."""
    if cpu == KVM_CPU and arch_capabilities_abort(output):
        return KVM_CPU_WITHOUT_ARCH_CAPABILITIES
    return None


# real mode at F000:FFF0: mov al,0x31; out 0xf4,al; hlt; jmp back to the hlt
_RESET_VECTOR = bytes.fromhex("b031e6f4f4ebfd")

_STATIC_CHECKS = (
    "grep -qwE 'vmx|svm' /proc/cpuinfo || { echo 'the CPU has no vmx/svm flag "
    "(a nested or emulated /dev/kvm cannot run guests)'; exit 1; }; "
    "[ -e /dev/kvm ] || { echo '/dev/kvm does not exist (kvm_intel/kvm_amd not loaded?)'; exit 1; }; "
    '[ -r /dev/kvm ] && [ -w /dev/kvm ] || { echo "/dev/kvm is not accessible to $(id -un) '
    '(add the user to the kvm group)"; exit 1; }'
)


def run_bounded(host: Host, argv: Sequence[str], seconds: float) -> tuple[int | None, str]:
    """Run ``argv`` on ``host`` through :meth:`Host.spawn` in a private directory (stdin
    /dev/null, output to a file there) for at most ``seconds``; (exit status, or None if
    it was killed at the bound; the output's last :data:`PROBE_OUTPUT` bytes). A lost SSH
    connection is a :class:`GuestError` naming it (the supervisor kills the probe)."""
    d = host.private_dir("cr3rig-kvmprobe-")
    out = d / "probe.out"
    try:
        command = " ".join(shlex.quote(a) for a in argv)
        proc = host.spawn(
            ["sh", "-c", f"exec {command} </dev/null >{shlex.quote(host.host_path(out))} 2>&1"],
            log=d / "probe.log",
        )
        try:
            status = proc.wait_exit(seconds)
            try:  # before the kill: on an SSH host the supervisor then removes the directory
                text = host.read_tail(out, PROBE_OUTPUT).decode(errors="replace")
            except OSError as exc:
                raise GuestError(f"the KVM probe on {host.label} {proc.exit_text()} ({exc})") from None
        finally:
            proc.kill()  # at the bound, or after an error; a no-op once it has exited
    finally:
        host.remove_private_dir(d)
    return status, text


def _bounded_with_fallback(
    host: Host, accel: str, argv: Callable[[str], Sequence[str]], seconds: float
) -> tuple[int | None, str, str]:
    """:func:`run_bounded` of ``argv(cpu)``; under KVM once more with
    :data:`KVM_CPU_WITHOUT_ARCH_CAPABILITIES` if ``-cpu host`` aborted on
    IA32_ARCH_CAPABILITIES. (status, output, how a verdict names the model that ran:
    empty for the first). Raises what :func:`run_bounded` raises."""
    cpu = KVM_CPU if accel == "kvm" else "max"
    status, out = run_bounded(host, argv(cpu), seconds)
    retry = kvm_cpu_retry(cpu, out) if status is not None else None
    if retry is None:
        return status, out, ""
    status, out = run_bounded(host, argv(retry), seconds)
    return status, out, f" with -cpu {retry} (-cpu host failed: {ARCH_CAPABILITIES_CAUSE})"


def _failure(out: str) -> str:
    """The line that says why a QEMU failed: the IA32_ARCH_CAPABILITIES abort by name,
    else QEMU's last line."""
    if arch_capabilities_abort(out):
        return ARCH_CAPABILITIES_CAUSE
    last = out.strip().splitlines()[-1:] or ["no output"]
    return last[0][:100]


def probe_firmware(*, halts: bool = True) -> bytes:
    """The 64 KiB probe BIOS; ``halts=False`` gives one that spins forever (to test the bound)."""
    code = _RESET_VECTOR if halts else bytes.fromhex("ebfe")  # jmp $
    image = bytearray(b"\xf4" * 0x10000)
    image[0xFFF0 : 0xFFF0 + len(code)] = code
    return bytes(image)


def probe_boot(
    host: Host, qemu: str, accel: str, firmware: bytes, seconds: int = PROBE_SECONDS
) -> str | None:
    """Boot ``firmware`` under ``accel`` on ``host`` (under KVM with the fallback CPU model
    if ``-cpu host`` aborts on IA32_ARCH_CAPABILITIES); None if it ran to its exit, else
    why not (one line naming the cause). Raises :class:`GuestError` if an SSH host's connection is lost."""
    digest = hashlib.sha256(firmware).hexdigest()[:16]
    local = Path(tempfile.gettempdir()) / f"cr3rig-kvmprobe-{digest}.bin"
    if not local.exists():
        tmp = local.with_suffix(f".{os.getpid()}.tmp")  # one per writer: xdist workers probe at once
        tmp.write_bytes(firmware)
        tmp.replace(local)
    bios = host.stage(local)

    def argv(cpu: str) -> list[str]:
        return [
            qemu, "-accel", accel, "-cpu", cpu, "-m", "16", "-nodefaults", "-display", "none",
            "-no-reboot", "-bios", bios, "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01",
        ]  # fmt: skip

    status, out, how = _bounded_with_fallback(host, accel, argv, seconds)
    what = f"a {accel.upper()} test boot{how}"
    if status == PROBE_EXIT:
        return None
    if status is None:
        return f"{what} did not finish within {seconds} s (a nested KVM that hangs?)"
    return f"{what} failed with status {status}: {_failure(out)}"


#: Upper bound (s) on the kernel probe boot (a kernel reaches init in ~1 s under KVM).
KERNEL_PROBE_SECONDS = 60


def kernel_probe(
    host: Host, qemu: str, accel: str, kernel: Path, initrd: Path, seconds: int = KERNEL_PROBE_SECONDS
) -> str | None:
    """Boot ``kernel`` under ``accel`` on ``host`` until its first user-space program
    (``/bin/true``) has run and init exited (under KVM with the fallback CPU model if
    ``-cpu host`` aborts on IA32_ARCH_CAPABILITIES); None if it did, else why not (one
    line naming the cause). Each start is bounded by ``seconds``. Raises
    :class:`GuestError` if an SSH host's connection is lost."""
    kernel_path, initrd_path = host.stage(kernel), host.stage(initrd)

    def argv(cpu: str) -> list[str]:
        return [
            qemu, "-accel", accel, "-cpu", cpu, "-smp", "2", "-m", "256", "-nodefaults",
            "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", kernel_path, "-initrd", initrd_path,
            "-append", "console=ttyS0 la57=off panic=-1 rdinit=/bin/true",
        ]  # fmt: skip

    status, out, how = _bounded_with_fallback(host, accel, argv, seconds)
    what = f"a {accel.upper()} boot of {kernel.name}{how}"
    if status == 0 and "Attempted to kill init" in out:
        return None
    if status is None:
        tail = [ln for ln in out.replace("\r", "").splitlines() if ln.strip()][-1:] or ["no console output"]
        return (
            f"{what} did not reach user space within {seconds} s (a nested KVM that hangs?); "
            f"last console line: {tail[0][:100]}"
        )
    return f"{what} failed with status {status}: {_failure(out)}"


def kvm_problem(host: Host, qemu: str = "qemu-system-x86_64") -> str | None:
    """None if KVM runs guests on ``host``, else why not (one line)."""
    status, out = host.run(["sh", "-c", _STATIC_CHECKS])
    if status != 0:
        return out.strip().splitlines()[-1] if out.strip() else f"the KVM checks failed ({status})"
    return probe_boot(host, qemu, "kvm", probe_firmware())
