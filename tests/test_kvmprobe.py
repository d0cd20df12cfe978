"""KVM's CPU model on nested hosts: ``-cpu host`` aborting on IA32_ARCH_CAPABILITIES.

QEMU on some nested KVMs prints ``error: failed to set MSR 0x10a to 0x…`` and aborts (an
assertion in ``kvm_buf_set_msrs``) before the guest runs; ``-cpu host,-arch-capabilities``
then starts. The decision is tested on QEMU's own words. The restart itself is tested
with a stand-in for the one part that cannot be made to fail on demand (whether a
machine's KVM aborts that way depends on the machine): a script that aborts with QEMU's
message when given ``-cpu host`` and otherwise runs the real QEMU, under TCG.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from rig.errors import ConfigError
from rig.guest import Guest, GuestConfig
from rig.report.provenance import guest_provenance
from rig.transport.kvmprobe import (
    ARCH_CAPABILITIES_CAUSE,
    KVM_CPU,
    KVM_CPU_WITHOUT_ARCH_CAPABILITIES,
    arch_capabilities_abort,
    kvm_cpu_retry,
    probe_boot,
    probe_firmware,
)
from rig.transport.local import LocalHost
from rig.transport.qemu import QemuConfig, QemuMachine

#: What QEMU 7.2 prints before it aborts (the value and the source line vary).
MSR_ABORT = (
    "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x2000c04\n"
    "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3135: kvm_buf_set_msrs: "
    "Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.\n"
)

#: A QEMU whose KVM refuses IA32_ARCH_CAPABILITIES: ``-cpu host`` aborts as QEMU does;
#: any other command line runs the real QEMU with KVM's models turned into TCG's.
STAND_IN = r"""#!/bin/sh
n=$#
for a in "$@"; do
  case $a in
    host) printf '%s' "$CR3RIG_MSR_ABORT" >&2; kill -ABRT $$ ;;
    kvm) a=tcg ;;
    host,-arch-capabilities) a=max ;;
  esac
  set -- "$@" "$a"
done
shift "$n"
exec qemu-system-x86_64 "$@"
"""


@pytest.fixture
def nested_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """:data:`STAND_IN` as an executable; the message it prints is in its environment."""
    script = tmp_path / "qemu-nested-kvm"
    script.write_text(STAND_IN)
    script.chmod(0o755)
    monkeypatch.setenv("CR3RIG_MSR_ABORT", MSR_ABORT)
    yield str(script)


def test_the_msr_abort_moves_kvm_to_host_without_arch_capabilities() -> None:
    assert arch_capabilities_abort(MSR_ABORT)
    assert kvm_cpu_retry(KVM_CPU, MSR_ABORT) == KVM_CPU_WITHOUT_ARCH_CAPABILITIES == "host,-arch-capabilities"
    # QEMU's log as the rig reads it: lines joined, other output around it
    assert kvm_cpu_retry("host", "boot | " + MSR_ABORT.replace("\n", " | ")) == "host,-arch-capabilities"
    # once only, and only from -cpu host (a model the user chose is not changed)
    assert kvm_cpu_retry(KVM_CPU_WITHOUT_ARCH_CAPABILITIES, MSR_ABORT) is None
    assert kvm_cpu_retry("max", MSR_ABORT) is None
    assert kvm_cpu_retry("host,+pcid", MSR_ABORT) is None
    # another MSR, or another failure: no model helps
    other = MSR_ABORT.replace("0x10a", "0x48e")
    assert not arch_capabilities_abort(other) and kvm_cpu_retry("host", other) is None
    assert kvm_cpu_retry("host", "failed to set MSR 0x10ab to 0x0") is None
    assert kvm_cpu_retry("host", "qemu-system-x86_64: could not load kernel 'k'") is None
    assert kvm_cpu_retry("host", "") is None


def test_probe_starts_again_without_arch_capabilities(nested_qemu: str) -> None:
    """The firmware probe: -cpu host aborts, the second start runs to the firmware's exit;
    one that does not finish is a one-line verdict naming both the model and why."""
    assert probe_boot(LocalHost(), nested_qemu, "kvm", probe_firmware()) is None
    why = probe_boot(LocalHost(), nested_qemu, "kvm", probe_firmware(halts=False), seconds=2)
    assert why is not None and "\n" not in why
    assert why == (
        "a KVM test boot with -cpu host,-arch-capabilities "
        f"(-cpu host failed: {ARCH_CAPABILITIES_CAUSE}) "
        "did not finish within 2 s (a nested KVM that hangs?)"
    )


@pytest.fixture
def aborting_qemu(tmp_path: Path, nested_qemu: str) -> str:
    """A QEMU that aborts on the MSR under every model (``--version`` answers); the
    message comes from :func:`nested_qemu`'s environment."""
    script = tmp_path / "qemu-always-aborts"
    script.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && exec qemu-system-x86_64 --version\n'
        'printf "%s" "$CR3RIG_MSR_ABORT" >&2\nkill -ABRT $$\n'
    )
    script.chmod(0o755)
    return str(script)


def test_probe_names_the_msr_abort_when_nothing_can_follow(aborting_qemu: str) -> None:
    """The fallback aborts too: the verdict names the abort, not the assertion line QEMU
    printed last."""
    why = probe_boot(LocalHost(), aborting_qemu, "kvm", probe_firmware())
    assert why is not None and "\n" not in why
    assert re.fullmatch(
        r"a KVM test boot with -cpu host,-arch-capabilities \(-cpu host failed: .*\) "
        rf"failed with status -?\d+: {re.escape(ARCH_CAPABILITIES_CAUSE)}",
        why,
    ), why


def test_guest_qemu_starts_again_and_provenance_says_so(nested_qemu: str, base_config: GuestConfig) -> None:
    """A guest's QEMU under --accel kvm: the aborted -cpu host start is followed by one with
    host,-arch-capabilities, which the guest's provenance records; close() leaves nothing."""
    config = GuestConfig(base_config.kernel, base_config.initrd, accel="kvm", qemu=nested_qemu)
    guest = Guest(LocalHost(), config)
    m = guest.machine
    assert m.cpu == "host"
    try:
        m.start()
        assert m.alive and m.status() in ("prelaunch", "paused")
        assert m.cpu == "host,-arch-capabilities" and "MSR 0x10a" in m.cpu_note
        argv = m.argv(nested_qemu)
        assert argv[argv.index("-cpu") + 1] == "host,-arch-capabilities"
        assert guest_provenance(guest)["cpu_model"] == "host,-arch-capabilities"
    finally:
        guest.close()
    assert not m.alive and not m.dir.exists()


def test_a_guest_start_names_the_msr_abort_when_nothing_can_follow(
    aborting_qemu: str, tmp_path: Path
) -> None:
    m = QemuMachine(
        LocalHost(), QemuConfig(tmp_path / "k", tmp_path / "i", "", accel="kvm", qemu=aborting_qemu)
    )
    try:
        with pytest.raises(ConfigError) as err:
            m.start()
    finally:
        m.close()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("QEMU exited at start with -cpu host,-arch-capabilities ("), msg
    assert msg.endswith(f": {ARCH_CAPABILITIES_CAUSE}"), msg


def test_a_failed_second_start_names_the_model_and_is_the_last(tmp_path: Path, nested_qemu: str) -> None:
    """The second start fails too (here on a file that is no kernel): QEMU is started no
    third time, and the one-line error names the model that ran and why."""
    kernel = tmp_path / "not-a-kernel"
    kernel.write_bytes(os.urandom(4096))
    m = QemuMachine(LocalHost(), QemuConfig(kernel, kernel, "", accel="kvm", qemu=nested_qemu))
    try:
        with pytest.raises(ConfigError) as err:
            m.start()
    finally:
        m.close()
    msg = str(err.value)
    assert "\n" not in msg and m.cpu == "host,-arch-capabilities", msg
    assert msg.startswith(
        "QEMU exited at start with -cpu host,-arch-capabilities (-cpu host made QEMU abort setting "
        "MSR 0x10a (IA32_ARCH_CAPABILITIES)) with "
    ), msg
