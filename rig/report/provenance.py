"""What exactly ran: the kernel, QEMU and host of a guest, as ordered name/value pairs.

The same pairs go into the session report's provenance block and, as testcase
properties, into JUnit XML (``pytest --junitxml``). Before any guest boots, the pairs
are what the options say will run (:func:`planned_provenance`): the kernel as named or
resolved, its build-id and config hash when its files are at hand, the command line,
``qemu --version``, the accelerator, the CPU model and the host; a booted guest adds
the release (and the build-id it reports).
"""

from __future__ import annotations

import hashlib
import platform
import socket
import subprocess
from pathlib import Path

from rig.errors import RigError
from rig.guest import Guest, GuestConfig
from rig.machine.symbols import elf_build_id
from rig.transport.host import Host
from rig.transport.kvmprobe import KVM_CPU

#: Property names, in report order.
FIELDS = (
    "kernel_label",
    "kernel_release",
    "kernel_build_id",
    "kernel_config_sha256",
    "kernel_cmdline",
    "qemu_version",
    "accel",
    "cpu_model",
    "host",
)


def kernel_config_file(image: Path) -> Path | None:
    """The ``.config`` a kernel image was built with, if it lies where builds put it.

    Looked for beside the image (``config``: the rig's kernel cache; ``config-<release>``
    next to Debian's ``vmlinuz-<release>``) and at the top of a build tree
    (``<tree>/arch/x86/boot/bzImage`` -> ``<tree>/.config``).
    """
    candidates = [image.parent / "config", image.parent / ".config"]
    if image.name.startswith("vmlinuz-"):
        candidates.append(image.parent / ("config-" + image.name.removeprefix("vmlinuz-")))
    if len(image.parents) > 3:
        candidates.append(image.parents[3] / ".config")
    return next((c for c in candidates if c.is_file()), None)


def config_hash(image: Path) -> str:
    """SHA-256 (hex) of the kernel's ``.config``, or why there is none."""
    found = kernel_config_file(image)
    if found is None:
        return f"unknown (no .config found beside {image})"
    return hashlib.sha256(found.read_bytes()).hexdigest()


def host_description() -> str:
    """``hostname (kernel release, machine)`` of the machine running QEMU."""
    return f"{socket.gethostname()} ({platform.system()} {platform.release()}, {platform.machine()})"


def cpu_model(accel: str, cpu: str = "max") -> str:
    """The ``-cpu`` QEMU is to start with (KVM turns ``max`` into ``host``, as the rig's
    argv does). Before a boot this is the plan: where ``-cpu host`` aborts on
    IA32_ARCH_CAPABILITIES (a nested KVM) QEMU runs ``host,-arch-capabilities``, which
    :func:`guest_provenance` reports from the running machine."""
    return KVM_CPU if accel == "kvm" and cpu == "max" else cpu


def guest_provenance(guest: Guest) -> dict[str, str]:
    """The :data:`FIELDS` of a booted guest (empty strings for what it never learned)."""
    c = guest.config
    return {
        "kernel_label": c.label or str(c.kernel),
        "kernel_release": guest.release,
        "kernel_build_id": guest.build_id,
        "kernel_config_sha256": config_hash(c.kernel),
        "kernel_cmdline": c.cmdline(),
        "qemu_version": guest.machine.version,
        "accel": c.accel,
        "cpu_model": guest.machine.cpu,  # the model QEMU runs (after any fallback at start)
        "host": host_description(),
    }


def qemu_version(host: Host, qemu: str) -> str:
    """The first line of ``qemu --version`` on ``host`` (as a booted guest reports it), or why not."""
    try:
        status, said = host.run([qemu, "--version"], timeout=20.0)
    except (OSError, RigError, subprocess.SubprocessError) as exc:
        return f"unknown ({qemu} --version: {exc})"
    first = next((ln.strip() for ln in said.splitlines() if ln.strip()), "")
    return first if status == 0 and first else f"unknown ({qemu} --version exited {status}: {first})"


def file_build_id(kernel: Path, vmlinux: Path | None) -> str:
    """The GNU build-id of the kernel's ELF file (``vmlinux``, else ``kernel`` if it is an
    ELF), or why there is none."""
    for f in (vmlinux, kernel):
        if f is None or not f.is_file():
            continue
        try:
            with open(f, "rb") as fh:
                if fh.read(4) != b"\x7fELF":
                    continue
            found = elf_build_id(f)
        except Exception as exc:  # pyelftools raises its own errors on a damaged ELF
            return f"unknown ({f}: {exc})"
        if found:
            return found
    return "unknown (no vmlinux with a build-id at hand before boot)"


def planned_provenance(config: GuestConfig, version: str, *, resolved: bool) -> dict[str, str]:
    """The :data:`FIELDS` known before a boot, for a guest of ``config`` (``version``: from
    :func:`qemu_version`). ``resolved``: the kernel files are known (else ``config.label``
    is the ``--kernel`` name, to be built or fetched)."""
    have = resolved and config.kernel.is_file()
    why = "the kernel is not resolved yet: it is built or fetched on first use"
    return {
        "kernel_label": config.label or str(config.kernel),
        "kernel_release": "unknown (no guest booted yet)",
        "kernel_build_id": file_build_id(config.kernel, config.vmlinux) if have else f"unknown ({why})",
        "kernel_config_sha256": config_hash(config.kernel) if have else f"unknown ({why})",
        "kernel_cmdline": config.cmdline(),
        "qemu_version": version,
        "accel": config.accel,
        "cpu_model": cpu_model(config.accel),
        "host": host_description(),
    }
