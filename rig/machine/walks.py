"""Page-table walks of a running guest: through a vCPU's CR3 pair, read physically.

The walker (:func:`rig.machine.x86.walk`) reads the tables through QEMU's physical memory
mode on a borrowed RSP link, so it sees them as the MMU does, whichever half of the PTI
pair the vCPU has loaded: the user PGD is the kernel PGD + 4 KiB (CR3 bit 12).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rig.errors import GuestError
from rig.machine.vcpu import Vcpu, read_physical
from rig.machine.x86 import X86_CR4_LA57, Translation, decode_cr3, user_cr3, walk
from rig.transport.rsp import RspLink

__all__ = ["kernel_reader", "pti_active", "pti_pair", "translate"]


def _physical_u64(link: RspLink) -> Callable[[int], int]:
    """Reads one little-endian 64-bit word of physical memory over ``link``."""

    def read_u64(addr: int) -> int:
        return int.from_bytes(read_physical(link, addr, 8), "little")

    return read_u64


def translate(link: RspLink, vcpu: Vcpu, virtual: int, *, user_tables: bool) -> Translation:
    """Walk ``virtual`` through ``vcpu``'s kernel or PTI user page tables (physically).

    The pair is found from the vCPU's CR3 whichever half it has loaded.
    """
    regs = vcpu.registers(link, ("cr3", "cr4"))
    cr3 = decode_cr3(regs["cr3"], regs["cr4"])
    pgd = cr3.user_pgd if user_tables else cr3.kernel_pgd
    return walk(pgd, virtual, _physical_u64(link), five_level=bool(regs["cr4"] & X86_CR4_LA57))


def pti_active(link: RspLink, reader: Vcpu, entry: int, private: int) -> bool:
    """True iff the kernel runs with page table isolation (``entry``: the address of
    ``entry_SYSCALL_64``; ``private``: kernel data PTI never maps for user mode, such as
    ``init_task``; ``reader``: a vCPU on the kernel tables, :func:`kernel_reader`).

    PTI's defining property: the entry code is mapped in the user half of the PGD pair
    (kernel PGD + 4 KiB, CR3 bit 12), and kernel data is not (:func:`pti_pair`). The same
    answer as dmesg's "page tables isolation: enabled" line, without a console round
    trip (tests/test_nopti.py boots ``nopti``). A kernel built without PTI (no
    ``pti_init``) has no such page: the caller does not ask.
    """
    regs = reader.registers(link, ("cr3", "cr4"))
    cr3 = decode_cr3(regs["cr3"], regs["cr4"])
    five = bool(regs["cr4"] & X86_CR4_LA57)
    return pti_pair(cr3.kernel_pgd, cr3.user_pgd, entry, private, _physical_u64(link), five_level=five)


def pti_pair(
    kernel_pgd: int,
    user_pgd: int,
    entry: int,
    private: int,
    read_u64: Callable[[int], int],
    *,
    five_level: bool,
) -> bool:
    """True iff ``user_pgd`` is the PTI user half of ``kernel_pgd``: both walks reach the
    same physical byte of ``entry``, and the user half does not map ``private``.

    Without PTI at run time the page after a PGD is not its user half. On kernels that
    allocate a PGD pair whatever PTI does, it is zeroed (``pgd_alloc``'s ``__GFP_ZERO``)
    and maps nothing. Kernels that allocate a single page when PTI is off (7.x) may have
    another process's PGD there, which maps the entry code too, and all kernel data: a
    soak run took one such boot of ``nopti`` for a PTI one.
    """
    kernel = walk(kernel_pgd, entry, read_u64, five_level=five_level)
    user = walk(user_pgd, entry, read_u64, five_level=five_level)
    if not kernel.present or user.physical != kernel.physical:
        return False
    return walk(user_pgd, private, read_u64, five_level=five_level).physical is None


def kernel_reader(link: RspLink, vcpus: Sequence[Vcpu], banner: int | None) -> Vcpu:
    """A vCPU through whose page tables kernel data reads (to learn the kernel).

    Under PTI that is a vCPU whose CR3 has bit 12 clear (the kernel half of the PGD
    pair). Without PTI (``nopti``) every CR3 maps the kernel, but a PGD is only 4 KiB
    aligned, so bit 12 says nothing: then the first vCPU through which
    ``linux_banner`` (at ``banner``) reads as a banner serves."""
    for vcpu in vcpus:
        regs = vcpu.registers(link, ("cr3",))
        if not user_cr3(regs.get("cr3", 0)):
            return vcpu
    if banner is not None:
        for vcpu in vcpus:
            if (vcpu.read(link, banner, 14) or b"").startswith(b"Linux version "):
                return vcpu
    raise GuestError("no vCPU has the kernel page tables loaded right now")
