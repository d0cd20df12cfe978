"""The transition rules over a stream of hits (rig/observe/transitions.py) and watch mode's
tallies (rig/observe/watching.py), no guest needed.

The sites and CR3 values are those of reference-7.2 (kernel PGD 0x3dc000, user 0x3dd000).
"""

from __future__ import annotations

from rig.machine.sites import Site
from rig.observe.findings import Rule
from rig.observe.transitions import Hit, TransitionChecker, agreed_signal
from rig.observe.watching import SiteTally, WatchResult

KERNEL, USER = 0x3DC000, 0x3DD000

ENTRY_STORE = Site(0x10, "signal-store", "entry_SYSCALL_64", "entry_SYSCALL_64+0x25", "movl $0x1,%gs:x", 1)
ENTRY_CR3 = Site(0x20, "cr3-write", "entry_SYSCALL_64", "entry_SYSCALL_64+0x30", "mov %rsp,%cr3")
EXIT_STORE = Site(
    0x30, "signal-store", "syscall_return_via_sysret", "syscall_return_via_sysret+0x86", "movl $0x0", 0
)
EXIT_CR3 = Site(
    0x40, "cr3-write", "syscall_return_via_sysret", "syscall_return_via_sysret+0x91", "mov %rdi,%cr3"
)
PARANOID_STORE = Site(0x50, "signal-store", "paranoid_entry", "paranoid_entry+0x69", "movl $0x1,(%rax)", 1)
PARANOID_CR3 = Site(0x60, "cr3-write", "paranoid_entry", "paranoid_entry+0x8b", "mov %rax,%cr3")
RESTORE_STORE = Site(0x70, "signal-store", "end_repeat_nmi", "end_repeat_nmi+0x4b", "mov %r12d,%gs:x")
RESTORE_CR3 = Site(0x80, "cr3-write", "end_repeat_nmi", "end_repeat_nmi+0x53", "mov %r14,%cr3")
#: the store of the exit that found the kernel CR3 (no CR3 write follows)
RESTORE_NOTE = Site(0x90, "signal-store", "end_repeat_nmi", "end_repeat_nmi+0x5e", "mov %r12d,%gs:x")
DB_RESTORE_STORE = Site(0xA0, "signal-store", "paranoid_exit", "paranoid_exit+0x3b", "mov %r12d,%gs:x")
DB_RESTORE_CR3 = Site(0xA8, "cr3-write", "paranoid_exit", "paranoid_exit+0x43", "mov %r14,%cr3")
DB_RESTORE_NOTE = Site(0xB0, "signal-store", "paranoid_exit", "paranoid_exit+0x4e", "mov %r12d,%gs:x")
SITES = (
    ENTRY_STORE, ENTRY_CR3, EXIT_STORE, EXIT_CR3, PARANOID_STORE, PARANOID_CR3,
    RESTORE_STORE, RESTORE_CR3, RESTORE_NOTE, DB_RESTORE_STORE, DB_RESTORE_CR3, DB_RESTORE_NOTE,
)  # fmt: skip


def round_trip(c: TransitionChecker, cpu: int = 1) -> list[str]:
    return [
        *c.check(Hit(cpu, ENTRY_STORE, USER, USER, 0, 1)),
        *c.check(Hit(cpu, ENTRY_CR3, USER, KERNEL, 1, 1)),
        *c.check(Hit(cpu, EXIT_STORE, KERNEL, KERNEL, 1, 0)),
        *c.check(Hit(cpu, EXIT_CR3, KERNEL, USER, 0, 0)),
    ]


def test_a_correct_round_trip_has_no_problems() -> None:
    c = TransitionChecker(2, SITES)
    assert round_trip(c) == [] and round_trip(c) == []


def test_kernel_cr3_loaded_with_signal_0_fails() -> None:
    c = TransitionChecker(2, SITES)
    problems = c.check(Hit(1, ENTRY_CR3, USER, KERNEL, 0, 0))
    assert len(problems) == 1 and "loaded the kernel CR3 (user->kernel) with the signal 0" in problems[0].text


def test_user_cr3_loaded_with_signal_1_fails() -> None:
    c = TransitionChecker(2, SITES)
    problems = c.check(Hit(0, EXIT_CR3, KERNEL, USER, 1, 1))
    assert len(problems) == 1 and "vCPU 0 at syscall_return_via_sysret+0x91" in problems[0].text


def test_signal_change_between_stops_without_a_store_fails() -> None:
    c = TransitionChecker(2, SITES)
    assert c.check(Hit(1, ENTRY_STORE, USER, USER, 0, 1)) == []
    # the next stop of vCPU 1 finds 0 although no store ran on it in between
    problems = c.check(Hit(1, ENTRY_CR3, USER, KERNEL, 0, 0))
    assert any("changed 1->0" in p.text and p.rule is Rule.UNLISTED_STORE for p in problems)
    # another vCPU's stream is independent
    assert c.check(Hit(0, EXIT_STORE, KERNEL, KERNEL, 1, 0)) == []


def test_paranoid_restore_must_put_back_what_its_entry_found() -> None:
    # an NMI over entry_SYSCALL_64 after the store of 1, still on the user CR3
    c = TransitionChecker(2, SITES)
    assert c.check(Hit(0, ENTRY_STORE, USER, USER, 0, 1)) == []
    assert c.paranoid_entry(0, 1) == []
    assert c.check(Hit(0, PARANOID_STORE, USER, USER, 1, 1)) == []
    assert c.check(Hit(0, PARANOID_CR3, USER, KERNEL, 1, 1)) == []
    assert c.check(Hit(0, RESTORE_STORE, KERNEL, KERNEL, 1, 1)) == []
    # the restore of the user CR3 with the signal 1 is right: that is what the entry found
    assert c.check(Hit(0, RESTORE_CR3, KERNEL, USER, 1, 1)) == []
    assert c.paranoid == [[], []]
    assert c.check(Hit(0, ENTRY_CR3, USER, KERNEL, 1, 1)) == []


def test_paranoid_exit_that_clobbers_the_signal_fails() -> None:
    # the reference as first written: the exit stored 0 whatever its entry found
    c = TransitionChecker(2, SITES)
    c.check(Hit(0, ENTRY_STORE, USER, USER, 0, 1))
    c.paranoid_entry(0, 1)
    c.check(Hit(0, PARANOID_STORE, USER, USER, 1, 1))
    c.check(Hit(0, PARANOID_CR3, USER, KERNEL, 1, 1))
    stored = c.check(Hit(0, RESTORE_STORE, KERNEL, KERNEL, 1, 0))
    assert stored and "the paranoid exit stored 0; its entry found 1" in stored[0].text
    restored = c.check(Hit(0, RESTORE_CR3, KERNEL, USER, 0, 0))
    assert restored and "found the signal 0; its entry found 1" in restored[0].text
    # and the interrupted entry then loads the kernel CR3 with the signal 0
    assert any("kernel CR3" in p.text for p in c.check(Hit(0, ENTRY_CR3, USER, KERNEL, 0, 0)))


def test_paranoid_exit_on_the_kernel_cr3_ends_at_its_store() -> None:
    # an NMI in kernel mode on the kernel CR3: the exit stores the found 1, writes no CR3
    c = TransitionChecker(2, SITES)
    c.paranoid_entry(1, 1)
    assert c.check(Hit(1, PARANOID_STORE, KERNEL, KERNEL, 1, 1)) == []
    assert c.check(Hit(1, RESTORE_NOTE, KERNEL, KERNEL, 1, 1)) == []
    assert c.paranoid[1] == []
    assert c.check(Hit(1, EXIT_STORE, KERNEL, KERNEL, 1, 0)) == []
    assert c.check(Hit(1, EXIT_CR3, KERNEL, USER, 0, 0)) == []


def debug_trap_entry(c: TransitionChecker) -> None:
    """A #DB in kernel mode on the user CR3 with the signal 0 (SYSENTER with TF)."""
    assert c.paranoid_entry(0, 0) == []
    assert c.check(Hit(0, PARANOID_STORE, USER, USER, 0, 1)) == []
    assert c.check(Hit(0, PARANOID_CR3, USER, KERNEL, 1, 1)) == []


def kernel_nmi(c: TransitionChecker) -> None:
    """An NMI in kernel mode on the kernel CR3 with the signal 1."""
    assert c.paranoid_entry(0, 1) == []
    assert c.check(Hit(0, PARANOID_STORE, KERNEL, KERNEL, 1, 1)) == []
    assert c.check(Hit(0, RESTORE_NOTE, KERNEL, KERNEL, 1, 1)) == []


def test_two_nmis_inside_a_debug_exception_each_end_their_own_entry() -> None:
    """Seen on the reference: two NMIs in one #DB handler with no site between them left
    the first NMI's entry on the stack (only one finished entry was popped per site), and
    the #DB's exit was judged against it ("stored 0; its entry found 1")."""
    c = TransitionChecker(2, SITES)
    debug_trap_entry(c)
    kernel_nmi(c)
    kernel_nmi(c)
    assert c.check(Hit(0, DB_RESTORE_STORE, KERNEL, KERNEL, 1, 0)) == []
    assert c.check(Hit(0, DB_RESTORE_CR3, KERNEL, USER, 0, 0)) == []
    assert c.paranoid[0] == []


def test_an_nmi_between_a_debug_exits_store_and_its_cr3_write() -> None:
    """The NMI finds the kernel CR3 with the signal 0 (the #DB's exit stored it); the
    #DB's entry stays on the stack for its CR3 write."""
    c = TransitionChecker(2, SITES)
    debug_trap_entry(c)
    assert c.check(Hit(0, DB_RESTORE_STORE, KERNEL, KERNEL, 1, 0)) == []
    assert c.paranoid_entry(0, 0) == []
    assert c.check(Hit(0, PARANOID_STORE, KERNEL, KERNEL, 0, 1)) == []
    assert c.check(Hit(0, RESTORE_NOTE, KERNEL, KERNEL, 1, 0)) == []
    assert c.check(Hit(0, DB_RESTORE_CR3, KERNEL, USER, 0, 0)) == []
    assert c.paranoid[0] == []
    # the exit that clobbers what its entry found is still caught there
    c = TransitionChecker(2, SITES)
    debug_trap_entry(c)
    assert c.check(Hit(0, DB_RESTORE_STORE, KERNEL, KERNEL, 1, 0)) == []
    assert c.paranoid_entry(0, 0) == []
    assert c.check(Hit(0, PARANOID_STORE, KERNEL, KERNEL, 0, 1)) == []
    clobbered = c.check(Hit(0, RESTORE_NOTE, KERNEL, KERNEL, 1, 1))
    assert clobbered and "the paranoid exit stored 1; its entry found 0" in clobbered[0].text


def test_restore_whose_entry_was_not_seen_is_counted_not_judged() -> None:
    c = TransitionChecker(2, SITES)
    assert c.check(Hit(0, RESTORE_CR3, KERNEL, USER, 1, 1)) == []
    assert c.unverified_restores == 1


def test_agreed_signal() -> None:
    assert agreed_signal([1, 1]) == (1, "")
    assert agreed_signal([None, 0]) == (0, "")
    assert agreed_signal([None, None]) == (None, "")
    value, problem = agreed_signal([1, 0])
    assert value == 1 and "different signals [1, 0]" in problem


def test_result_counts_transitions_per_site_and_cpu() -> None:
    sites = (ENTRY_STORE, ENTRY_CR3, EXIT_STORE, EXIT_CR3, PARANOID_CR3)
    r = WatchResult("k", 2, {s.address: SiteTally(s) for s in sites})
    for cpu in (0, 1, 1):
        r.record(Hit(cpu, ENTRY_STORE, USER, USER, 0, 1))
        r.record(Hit(cpu, ENTRY_CR3, USER, KERNEL, 1, 1))
        r.record(Hit(cpu, EXIT_STORE, KERNEL, KERNEL, 1, 0))
        r.record(Hit(cpu, EXIT_CR3, KERNEL, USER, 0, 0))
    assert (r.hits, r.transitions) == (12, 6)
    assert r.tallies[ENTRY_CR3.address].to_kernel == 3 and r.tallies[ENTRY_CR3.address].by_cpu == {0: 1, 1: 2}
    assert r.tallies[EXIT_CR3.address].to_user == 3 and r.tallies[EXIT_STORE.address].transitions == 0
    assert r.hits_by_cpu == {0: 4, 1: 8}
    assert r.executed() == {s.address for s in sites[:4]}
    table = r.table()
    assert "6 CR3 transitions checked" in table and "not hit: paranoid_entry+0x8b" in table


def test_strict_restores_check_an_unmatched_restore_as_a_user_cr3_write() -> None:
    """The exploration sees every paranoid entry: a restore without one is an ordinary
    user CR3 write (signal 0), not an unverified one."""
    restore = Site(0x60, "cr3-write", "paranoid_exit", "paranoid_exit+0x43", "mov %r14,%cr3")
    hit = Hit(0, restore, KERNEL, USER, 1, 1)
    lax = TransitionChecker(2, SITES)
    assert lax.check(hit) == [] and lax.unverified_restores == 1
    strict = TransitionChecker(2, SITES, strict_restores=True)
    problems = strict.check(hit)
    assert strict.unverified_restores == 0
    assert len(problems) == 1 and "loaded the user CR3 (kernel->user) with the signal 1" in problems[0].text
    assert not strict.restores_paranoid_entry(0, restore)
    strict.paranoid_entry(0, 1)
    assert strict.restores_paranoid_entry(0, restore)
