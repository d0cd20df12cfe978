"""What exactly ran: the kernel, QEMU and host of a guest, as ordered name/value pairs.

The same pairs go into the session report's provenance block and, as testcase
properties, into JUnit XML (``pytest --junitxml``).
"""

from __future__ import annotations

import hashlib
import platform
import socket
from pathlib import Path

from rig.guest import Guest

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
        "cpu_model": guest.machine.config.cpu,
        "host": host_description(),
    }
