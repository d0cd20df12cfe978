"""rig.machine.stepper.CodeLines: the Stepper's per-run code cache (no guest needed)."""

from __future__ import annotations

from rig.machine.stepper import CODE_LINE, MAX_INSN, CodeLines
from rig.machine.trace import Snapshot


def _reply(start: int, size: int) -> str:
    """A read's reply whose byte at address a is a & 0xff (so slices are checkable)."""
    return bytes((start + i) & 0xFF for i in range(size)).hex()


def test_a_read_serves_the_instructions_that_follow() -> None:
    lines = CodeLines()
    pc = 0xFFFFFFFF81000010
    assert lines.at(pc) is None
    start, size = lines.span(pc)
    assert (start, size) == (pc & -CODE_LINE, 2 * CODE_LINE)
    assert lines.store(pc, _reply(start, size)) == bytes((pc + i) & 0xFF for i in range(MAX_INSN))
    later = pc + 70  # in the second line, its instruction crossing into a third (not read)
    assert lines.at(pc + 40) == bytes((pc + 40 + i) & 0xFF for i in range(MAX_INSN))
    assert lines.at(start + 2 * CODE_LINE - MAX_INSN) is not None
    assert lines.at(start + 2 * CODE_LINE - MAX_INSN + 1) is None, "its last bytes were not read"
    assert lines.at(later) is not None


def test_a_read_stops_at_the_page_end_unless_the_instruction_crosses_it() -> None:
    lines = CodeLines()
    pc = 0xFFFFFFFF81000FD0  # 48 bytes before the page end
    start, size = lines.span(pc)
    assert start + size == 0xFFFFFFFF81001000, "the next page may not be mapped"
    pc = 0xFFFFFFFF81000FF8  # an instruction here may cross into the next page
    start, size = lines.span(pc)
    assert start + size == pc + MAX_INSN
    lines.store(pc, _reply(start, size))
    assert lines.at(0xFFFFFFFF81001000) is None, "no line of the next page is kept"
    assert lines.at(0xFFFFFFFF81000FC0) is not None


def test_a_failed_read_keeps_nothing() -> None:
    lines = CodeLines()
    pc = 0x401000
    assert lines.store(pc, "E14") == b""
    assert lines.at(pc) is None


def test_the_library_conditions_foresee_only_what_can_make_them_hold() -> None:
    from rig.machine.stops import ForeseeingStop, in_user_mode, on_kernel_tables, on_user_tables

    k = 0xFFFFFFFF81000000
    mov, ret, cr3_write = bytes.fromhex("4889e7"), bytes.fromhex("c3"), bytes.fromhex("0f22dc")
    user = in_user_mode(1)
    assert isinstance(user, ForeseeingStop) and not isinstance(lambda s: False, ForeseeingStop)
    assert not user.may_hold_after(1, k, mov) and user.may_hold_after(1, k, ret)
    assert not user.may_hold_after(0, k, ret), "another vCPU's rip does not move"
    assert user.may_hold_after(1, 0x401000, mov), "in user code the next rip is in user code"
    for cond in (on_kernel_tables(1), on_user_tables(1)):
        assert not cond.may_hold_after(1, k, mov) and not cond.may_hold_after(1, k, ret)
        assert cond.may_hold_after(1, k, cr3_write) and cond.may_hold_after(1, k, b"")
        assert not cond.may_hold_after(0, k, cr3_write)


def _at(step: int, rip: int) -> Snapshot:
    return Snapshot(step, 1, [0, rip], [0, 0x2000], {})


def test_spinning_holds_at_a_window_end_with_few_rips_and_foresees_the_rest() -> None:
    from rig.machine.stops import AnyOf, ForeseeingStop, Spinning, in_user_mode

    k = 0xFFFFFFFF81000000
    spin = Spinning(1, window=100, distinct=4)
    walk = [spin(_at(i, k + 3 * i)) for i in range(1, 101)]  # a path: 100 distinct rips
    assert not any(walk) and spin.spun_at is None
    held = [spin(_at(i, k + 3 * (i % 3))) for i in range(101, 201)]  # a loop of 3 rips
    assert held == [False] * 99 + [True] and spin.spun_at is not None and spin.spun_at.step == 200
    assert spin.may_hold_after(1, k, b"") is False, "boundary 201 is not a window end"
    spin(_at(299, k))
    assert spin.may_hold_after(1, k, b""), "boundary 300 is"
    both = AnyOf((in_user_mode(1), Spinning(1, window=100)))
    assert isinstance(both, ForeseeingStop)
    assert not both.may_hold_after(1, k, bytes.fromhex("4889e7"))
    assert both.may_hold_after(1, k, bytes.fromhex("c3")), "a ret may reach user mode"
    assert AnyOf((in_user_mode(1), lambda s: False)).may_hold_after(1, k, bytes.fromhex("4889e7")), (
        "an opaque member foresees nothing"
    )
