"""Switch-site discovery (rig.machine.sites) on objdump text, and the coverage table."""

from __future__ import annotations

from rig.machine.sites import Site, parse_objdump, unreachable_reason
from rig.observe.coverage import SiteCoverage
from rig.observe.windows import Window, boundaries_of

SIGNAL = 0xFFFFFFFF819F8000

#: Shaped like `objdump -d --no-show-raw-insn` of reference-7.2 (addresses shortened).
OBJDUMP = f"""
ffffffff81000080 <entry_SYSCALL_64>:
ffffffff81000080:\tendbr64
ffffffff81000084:\tswapgs
ffffffff8100009c:\tmov    %cr3,%rsp
ffffffff810000a5:\tmovl   $0x1,%gs:0x9f7f50(%rip)        # {SIGNAL:x} <kernel_cr3_loaded>
ffffffff810000b0:\tmov    %rsp,%cr3
ffffffff810000b3:\tmov    %gs:0x9f8f4d(%rip),%rsp        # ffffffff819f9008 <cpu_current_top_of_stack>

ffffffff810016a0 <paranoid_entry>:
ffffffff81001700:\tsub    $0x10,%rsp
ffffffff81001704:\tsgdt   0x6(%rsp)
ffffffff81001709:\tmov    0x8(%rsp),%rax
ffffffff8100170e:\tadd    $0x10,%rsp
ffffffff81001712:\tmov    0x1a000(%rax),%r12d
ffffffff81001719:\tmovl   $0x1,0x1a000(%rax)
ffffffff81001723:\tmov    %cr3,%rax
ffffffff8100172b:\tmov    %rax,%cr3

ffffffff81001800 <paranoid_exit>:
ffffffff8100181b:\tmov    %r12d,%gs:0x9f67dd(%rip)        # {SIGNAL:x} <kernel_cr3_loaded>
ffffffff81001823:\tmov    %r14,%cr3
ffffffff81001830:\tmov    %r12d,%gs:0x1000                 # a zero-based per-CPU store, not the signal
"""


def test_parse_objdump_finds_cr3_writes_and_signal_stores() -> None:
    sites = parse_objdump(OBJDUMP, frozenset({SIGNAL}))
    got = [(s.where, s.kind, s.value) for s in sites]
    assert got == [
        ("entry_SYSCALL_64+0x25", "signal-store", 1),
        ("entry_SYSCALL_64+0x30", "cr3-write", None),
        ("paranoid_entry+0x79", "signal-store", 1),  # through the SGDT alias; the load is not a store
        ("paranoid_entry+0x8b", "cr3-write", None),
        ("paranoid_exit+0x1b", "signal-store", None),  # a register store (the saved value)
        ("paranoid_exit+0x23", "cr3-write", None),
    ]


def test_zero_based_gs_stores_match_by_offset() -> None:
    text = "ffffffff81000000 <f>:\nffffffff81000010:\tmovl   $0x0,%gs:0x15000\n"
    assert [s.kind for s in parse_objdump(text, frozenset({0x15000}))] == ["signal-store"]
    assert parse_objdump(text, frozenset({0x16000})) == []


def _site(where: str, kind: str = "cr3-write") -> Site:
    func, off = where.split("+")
    return Site(0xFFFFFFFF81000000 + int(off, 16) + (len(func) << 12), kind, func, where, "mov %rax,%cr3")  # type: ignore[arg-type]


def test_unreachable_reasons() -> None:
    assert unreachable_reason(_site("xen_entry+0x4"), has_signal=True)
    assert unreachable_reason(_site("native_irq_return_ldt+0x10"), has_signal=True)
    assert unreachable_reason(_site("entry_SYSCALL_compat+0x2b"), has_signal=True) is None
    assert unreachable_reason(_site("entry_SYSCALL_64+0x25", "signal-store"), has_signal=False)


def test_coverage_missing_and_recorded() -> None:
    a, b, x = _site("entry_SYSCALL_64+0x30"), _site("error_entry+0x73"), _site("xen_entry+0x4")
    cov = SiteCoverage("k", [a, b, x], has_signal=True)
    assert cov.missing() == [a, b]
    cov.record("t::one", [a.address, 0x1234])
    assert cov.missing() == [b]
    assert "NOT EXECUTED" in cov.table() and "not reachable under TCG" in cov.table()
    assert cov.rows()[1]["executed_by"] == "not covered"
    cov.pti = False
    assert cov.missing() == []


def test_window_boundaries() -> None:
    w = Window("w", "syscall-loop", ("entry_SYSCALL_64",), "entry", before=2, after=3)
    # the sample: boundary 0, the race window (2 before the store to 3 past the write), every 4th
    assert boundaries_of(w, store=8, cr3_write=9, last=20) == [0, 4, 6, 7, 8, 9, 10, 11, 12]
    assert boundaries_of(w, store=1, cr3_write=2, last=3) == [0, 1, 2, 3]
    # every boundary: the first instruction to 3 past the CR3 write
    assert boundaries_of(w, store=8, cr3_write=9, last=20, stride=0) == [0, 6, 7, 8, 9, 10, 11, 12]
    assert boundaries_of(w, store=8, cr3_write=9, last=20, every=True) == list(range(13))
    assert boundaries_of(w, store=8, cr3_write=9, last=10, every=True) == list(range(11))
