"""CR3 decoding and the page-table walker on synthetic tables (rig/x86.py)."""

from rig.machine.walks import pti_pair
from rig.machine.x86 import NX, PS, RW, US, G, P, decode_cr3, walk


def test_cr3_decoding_pti_bits() -> None:
    user = decode_cr3(0x5E81000)
    assert user.user_tables and user.kernel_pgd == 0x5E80000 and user.pcid is None
    kern = decode_cr3(0x5E80000)
    assert not kern.user_tables
    pcid = decode_cr3(0x5E81801, cr4=1 << 17)
    assert pcid.pcid == 0x801 and pcid.user_pcid and pcid.user_tables


def _tables(five_level: bool) -> tuple[dict[int, int], int, int]:
    """Map VA 0xffffffff81c00080 to a 4 KiB frame at 0x1234000 through fake tables."""
    va = 0xFFFFFFFF81C00080
    mem: dict[int, int] = {}
    levels = [48, 39, 30, 21, 12] if five_level else [39, 30, 21, 12]
    table = 0x10000
    for depth, shift in enumerate(levels):
        idx = (va >> shift) & 0x1FF
        last = depth == len(levels) - 1
        nxt = 0x1234000 if last else table + 0x1000
        flags = P | RW | (G if last else 0) | (NX if last else 0)
        mem[table + 8 * idx] = nxt | flags
        table = nxt
    return mem, 0x10000, va


def test_walk_4_and_5_level() -> None:
    for five in (False, True):
        mem, pgd, va = _tables(five)
        t = walk(pgd, va, mem.__getitem__, five_level=five)
        assert t.present and t.physical == 0x1234080 and t.page_size == 4096
        assert t.writable and t.nx and t.global_ and not t.user
        assert len(t.steps) == (5 if five else 4)
        assert t.flags() == "P RW NX G"


def test_walk_not_present_and_huge_page() -> None:
    mem, pgd, va = _tables(False)
    assert not walk(pgd, va + (1 << 39), lambda a: mem.get(a, 0), five_level=False).present
    # turn the PMD entry into a 2 MiB user page
    pmd_addr = next(a for a, v in mem.items() if v & ~0xFFF == 0x13000)
    mem[pmd_addr] = 0x40000000 | P | US | PS
    mem = {a: (v | US) for a, v in mem.items()}
    t = walk(pgd, va, lambda a: mem.get(a, 0), five_level=False)
    assert t.page_size == 2 << 20 and t.physical == 0x40000000 | (va & 0x1FFFFF)
    assert t.user and not t.writable


def test_may_write_cr3_decodes_mov_to_cr3_and_nothing_else() -> None:
    from rig.machine.x86 import may_write_cr3

    assert may_write_cr3(bytes.fromhex("0f22dc"))  # mov %rsp,%cr3
    assert may_write_cr3(bytes.fromhex("410f22de"))  # mov %r14,%cr3
    assert may_write_cr3(bytes.fromhex("0f22d8"))  # mov %rax,%cr3
    assert may_write_cr3(b"") and may_write_cr3(b"\x0f") and may_write_cr3(b"\x66\x41")  # cannot tell
    assert may_write_cr3(bytes.fromhex("48660f22d8"))  # a REX, then a prefix: the REX is ignored
    assert not may_write_cr3(bytes.fromhex("0f20d8"))  # mov %cr3,%rax (a read)
    assert not may_write_cr3(bytes.fromhex("65c70425000000000100"))  # movl $0x1,%gs:0x0
    assert not may_write_cr3(bytes.fromhex("4889e7"))  # mov %rsp,%rdi
    assert not may_write_cr3(bytes.fromhex("0f01f8"))  # swapgs
    assert not may_write_cr3(bytes.fromhex("48cf"))  # iretq


def test_may_leave_kernel_half_only_for_returns_indirect_and_far_transfers() -> None:
    from rig.machine.x86 import may_leave_kernel_half

    k = 0xFFFFFFFF81000000
    for hexcode in (
        "c3",  # ret
        "c20800",  # ret $8
        "48cf",  # iretq
        "480f07",  # sysretq
        "0f35",  # sysexit
        "ffe0",  # jmp *%rax
        "41ffd3",  # call *%r11
        "ff2500000000",  # jmp *0x0(%rip)
        "f30f01ca",  # eretu
        "0f05",  # syscall
        "66e9",  # jmp with an operand-size prefix: cannot tell
        "",
        "48",  # a REX prefix alone: cannot tell
        "ff",  # group 5 without its ModRM: cannot tell
        "4866c3",  # a REX, then a prefix, then ret: the REX is ignored, it is still a ret
    ):
        assert may_leave_kernel_half(bytes.fromhex(hexcode), k), hexcode
    for hexcode in (
        "4889e7",  # mov %rsp,%rdi
        "0f22dc",  # mov %rsp,%cr3
        "65c70425000000000100",  # movl $0x1,%gs:0x0
        "0f01f8",  # swapgs
        "0f01ca",  # clac
        "e800000000",  # call .+5
        "e9fbffffff",  # jmp .
        "ebfe",  # jmp .
        "7405",  # je .+7
        "0f8400010000",  # je .+0x106
        "ffc0",  # inc %eax (group 5, /0)
        "ff30",  # push (%rax) (group 5, /6)
        "cc",  # int3: to a kernel vector
        "0f0b",  # ud2
    ):
        assert not may_leave_kernel_half(bytes.fromhex(hexcode), k), hexcode
    # a relative target computed from the instruction's end: a jump from low kernel-half text
    # back across the boundary is caught, as is any instruction in the lower half
    assert may_leave_kernel_half(bytes.fromhex("e9f0ffffff"), 1 << 63)
    assert not may_leave_kernel_half(bytes.fromhex("e900000000"), 1 << 63)
    assert may_leave_kernel_half(bytes.fromhex("4889e7"), 0x401000)


def _map(mem: dict[int, int], pgd: int, virtual: int, frame: int, alloc: list[int]) -> None:
    """Map the 4 KiB page of ``virtual`` to ``frame`` under ``pgd`` (4-level), taking new
    table pages from ``alloc``."""
    table = pgd
    for shift in (39, 30, 21):
        slot = table + 8 * ((virtual >> shift) & 0x1FF)
        if not mem.get(slot, 0) & P:
            mem[slot] = alloc.pop() | P | RW
        table = mem[slot] & ~0xFFF
    mem[table + 8 * ((virtual >> 12) & 0x1FF)] = frame | P | RW


def test_pti_pair_tells_a_user_half_from_a_neighbouring_pgd() -> None:
    """PTI on: the user half maps the entry text, not kernel data. PTI off: the page
    after the PGD maps nothing (a zeroed pair), or is another process's PGD, which maps
    both (7.x allocates one page per PGD when PTI is off): neither is PTI."""
    entry, private = 0xFFFFFFFF81000040, 0xFFFFFFFF82A00000
    kernel, user = 0x100000, 0x101000

    def pair(user_maps: tuple[int, ...]) -> bool:
        mem: dict[int, int] = {}
        alloc = list(range(0x200000, 0x300000, 0x1000))
        _map(mem, kernel, entry, 0x1000000, alloc)
        _map(mem, kernel, private, 0x2A00000, alloc)
        for v in user_maps:
            _map(mem, user, v, 0x1000000 if v == entry else 0x2A00000, alloc)
        return pti_pair(kernel, user, entry, private, lambda a: mem.get(a, 0), five_level=False)

    assert pair((entry,)) is True
    assert pair(()) is False
    assert pair((entry, private)) is False
