"""What the PTI user page tables map: entry text and cpu_entry_area, not kernel data.

Walks are done on guest-physical memory from the user PGD (kernel PGD + 4 KiB), so they
show what the MMU would see on the user CR3, whatever the vCPUs have loaded now.
"""

from __future__ import annotations

import pytest

from rig.guest import Guest

#: CPU_ENTRY_AREA_BASE with 4-level paging (arch/x86/include/asm/pgtable_64_types.h).
CPU_ENTRY_AREA_BASE = 0xFFFF_FE00_0000_0000

ENTRY_TEXT = ("entry_SYSCALL_64", "asm_exc_page_fault", "swapgs_restore_regs_and_return_to_usermode")
KERNEL_DATA = ("__per_cpu_offset", "linux_banner", "init_task")


@pytest.mark.parametrize("symbol", ENTRY_TEXT)
def test_user_tables_map_entry_text(pti_guest: Guest, symbol: str) -> None:
    addr = pti_guest.symbols.address(symbol)
    user = pti_guest.translate(addr, user_tables=True)
    kernel = pti_guest.translate(addr, user_tables=False)
    assert user.present, f"{symbol} ({addr:#x}) is not mapped in the PTI user tables"
    assert user.physical == kernel.physical, "user and kernel tables map it to different frames"
    assert not user.nx, f"{symbol} is mapped NX in the user tables: {user.flags()}"
    assert not user.user, f"{symbol} is user-accessible in the user tables: {user.flags()}"


def test_user_tables_map_cpu_entry_area(pti_guest: Guest) -> None:
    t = pti_guest.translate(CPU_ENTRY_AREA_BASE, user_tables=True)
    assert t.present, "cpu_entry_area (IDT page) is not mapped in the PTI user tables"
    assert not t.user, f"cpu_entry_area is user-accessible: {t.flags()}"


@pytest.mark.parametrize("symbol", KERNEL_DATA)
def test_user_tables_do_not_map_kernel_data(pti_guest: Guest, symbol: str) -> None:
    addr = pti_guest.symbols.address(symbol)
    kernel = pti_guest.translate(addr, user_tables=False)
    assert kernel.present, f"{symbol} is not even mapped in the kernel tables (bad symbol?)"
    user = pti_guest.translate(addr, user_tables=True)
    assert not user.present, (
        f"{symbol} ({addr:#x}) is mapped in the PTI user tables: {user.flags()} "
        f"via {[f'{s.level}[{s.index}]={s.entry:#x}' for s in user.steps]}"
    )
