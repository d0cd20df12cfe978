"""rig.observe.exploration: what a window's result counts as explored (no guest needed)."""

from __future__ import annotations

from rig.observe.exploration import BoundaryRun, Exploration, Window
from rig.observe.stepping import Trace

WINDOW = Window("syscall-entry", "syscall-loop", ("entry_SYSCALL_64",), "entry")


def _result(explored: list[int], store: int = 5, cr3_write: int = 7) -> Exploration:
    ex = Exploration(WINDOW, 0, Trace(0, 2), store, cr3_write)
    ex.runs = [
        BoundaryRun(k, "entry_SYSCALL_64+0x0", "nop", 0x1000, 1, "NMI", "non-paranoid") for k in explored
    ]
    return ex


def test_a_window_whose_race_boundaries_all_ran_has_no_problem() -> None:
    assert _result([0, 3, 4, 5, 6, 7, 8, 9, 10]).problems() == []


def test_a_race_boundary_without_a_run_is_a_problem() -> None:
    ex = _result([0, 3, 4, 5, 7, 8])
    assert ex.unexplored() == [6]
    assert ex.problems() == [
        "syscall-entry: boundaries [6] between the signal store (5) and its CR3 write (7) were not explored"
    ]


def test_a_store_after_its_cr3_write_leaves_no_window_to_require() -> None:
    assert _result([0, 1, 2], store=9, cr3_write=4).unexplored() == []
