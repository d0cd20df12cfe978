"""rig.machine.storepaths and the static store-to-write rule on synthetic objdump text
(no guest, no vmlinux)."""

from __future__ import annotations

from rig.machine.sites import parse_objdump
from rig.machine.storepaths import parse_instructions, walk_store_paths
from rig.observe.checks import static_path_findings
from rig.observe.findings import Rule

SIGNAL = 0xFFFFFFFF82000000
HEAD = "ffffffff81000000 <exit_path>:\n"


def _paths(body: str):  # type: ignore[no-untyped-def]
    text = HEAD + body
    sites = parse_objdump(text, frozenset({SIGNAL}))
    return walk_store_paths(parse_instructions(text), sites)


def per_cpu(address: int) -> str | None:
    return "kernel_cr3_loaded" if address == SIGNAL else None


def test_a_store_right_before_its_cr3_write_is_one_empty_path() -> None:
    paths = _paths(
        "ffffffff81000000:\tmovl   $0x0,%gs:0x1000(%rip)        # ffffffff82000000 <kernel_cr3_loaded>\n"
        "ffffffff8100000b:\tmov    %rdi,%cr3\n"
        "ffffffff8100000e:\tsysretq\n"
    )
    assert [(p.store.address, p.cr3_write and p.cr3_write.address, p.between) for p in paths] == [
        (0xFFFFFFFF81000000, 0xFFFFFFFF8100000B, ())
    ]
    assert static_path_findings(paths, per_cpu) == []


def test_both_ways_of_a_branch_are_walked_and_an_absolute_load_on_one_is_a_finding() -> None:
    paths = _paths(
        "ffffffff81000000:\tmovl   $0x0,%gs:0x1000(%rip)        # ffffffff82000000 <kernel_cr3_loaded>\n"
        "ffffffff8100000b:\tje     ffffffff81000018 <exit_path+0x18>\n"
        "ffffffff8100000d:\tmov    0xffffffff82345678,%eax\n"
        "ffffffff81000014:\tnop\n"
        "ffffffff81000015:\tnop\n"
        "ffffffff81000016:\tnop\n"
        "ffffffff81000017:\tnop\n"
        "ffffffff81000018:\tmov    %rdi,%cr3\n"
    )
    assert sorted(len(p.between) for p in paths) == [1, 6]
    found = static_path_findings(paths, per_cpu)
    assert [f.rule for f in found] == [Rule.STORE_TO_WRITE_WINDOW]
    assert "0xffffffff82345678" in found[0].text


def test_a_call_or_an_undecodable_byte_after_a_store_is_unverifiable() -> None:
    paths = _paths(
        "ffffffff81000000:\tmovl   $0x0,%gs:0x1000(%rip)        # ffffffff82000000 <kernel_cr3_loaded>\n"
        "ffffffff8100000b:\tcall   ffffffff81234560 <foo>\n"
        "ffffffff81000010:\tmov    %rdi,%cr3\n"
    )
    assert len(paths) == 1 and paths[0].cr3_write is None and "a call" in paths[0].unverifiable
    assert [f.rule for f in static_path_findings(paths, per_cpu)] == [Rule.STORE_TO_WRITE_WINDOW]
    paths = _paths(
        "ffffffff81000000:\tmovl   $0x0,%gs:0x1000(%rip)        # ffffffff82000000 <kernel_cr3_loaded>\n"
        "ffffffff8100000b:\t(bad)\n"
        "ffffffff8100000c:\tmov    %rdi,%cr3\n"
    )
    assert paths[0].cr3_write is None and "cannot be decoded" in paths[0].unverifiable


def test_a_store_with_no_cr3_write_after_it_has_no_path() -> None:
    # the paranoid exit's store when CR3 stays the kernel's: it returns instead
    paths = _paths(
        "ffffffff81000000:\tmov    %r12d,%gs:0x1000(%rip)        # ffffffff82000000 <kernel_cr3_loaded>\n"
        "ffffffff8100000b:\tret\n"
        "ffffffff8100000c:\tmov    %rdi,%cr3\n"
    )
    assert paths == []


def test_a_far_store_is_a_finding_and_nops_do_not_count() -> None:
    body = "ffffffff81000000:\tmovl   $0x0,%gs:0x1000(%rip)        # ffffffff82000000 <kernel_cr3_loaded>\n"
    address = 0xFFFFFFFF8100000B
    for _ in range(9):
        body += f"{address:x}:\tmov    %rsp,%rdi\n"
        address += 3
    for _ in range(20):
        body += f"{address:x}:\tnop\n"
        address += 1
    body += f"{address:x}:\tmov    %rdi,%cr3\n"
    found = static_path_findings(_paths(body), per_cpu)
    assert len(found) == 1 and "9 instructions (not counting NOPs)" in found[0].text


def test_a_direct_jmp_is_walked_both_ways_the_unpatched_text_may_be_an_alternative() -> None:
    # ALTERNATIVE "jmp .Lend", "", X86_FEATURE_PTI: the running kernel has NOPs there
    paths = _paths(
        "ffffffff81000000:\tmovl   $0x0,%gs:0x1000(%rip)        # ffffffff82000000 <kernel_cr3_loaded>\n"
        "ffffffff8100000b:\tmov    0x8(%rsp),%rbx\n"
        "ffffffff81000010:\tjmp    ffffffff8100001b <exit_path+0x1b>\n"
        "ffffffff81000015:\tmov    %cr3,%r8\n"
        "ffffffff81000018:\tmov    %r8,%cr3\n"
        "ffffffff8100001b:\tsysretl\n"
    )
    assert [len(p.between) for p in paths] == [3]
    assert static_path_findings(paths, per_cpu) == []


def test_a_jump_over_another_store_is_the_gate_off_and_not_followed() -> None:
    # exit_path's store, then another store's static branch (jmp over it) before a CR3
    # write: with the gate off neither store runs, so no path joins them
    paths = _paths(
        "ffffffff81000000:\tmovl   $0x0,%gs:0x1000(%rip)        # ffffffff82000000 <kernel_cr3_loaded>\n"
        "ffffffff8100000b:\tnop\n"
        "ffffffff8100000c:\tmov    %cr3,%rdi\n"
        "ffffffff8100000f:\tjmp    ffffffff8100001a <exit_path+0x1a>\n"
        "ffffffff81000011:\tmovl   $0x1,%gs:0x1000(%rip)        # ffffffff82000000 <kernel_cr3_loaded>\n"
        "ffffffff8100001a:\tmov    %rdi,%cr3\n"
    )
    assert [(p.store.address, len(p.between)) for p in paths] == [(0xFFFFFFFF81000011, 0)]
