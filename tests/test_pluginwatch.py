"""Plugin watch mode (rig.observe.pluginwatch, rig/observe/cr3watch.c): the pure parts, and
real guests under QEMU 10.0 (bookworm-backports) with the plugin: the reference kernel
passes, a mutant kernel from the cache is caught, and QEMU 7.2 refuses with one line."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from rig.errors import ConfigError
from rig.guest import Guest, GuestConfig
from rig.machine.sites import SIGNAL, Site
from rig.observe.findings import Rule, render
from rig.observe.pluginwatch import (
    F_AT_NEXT,
    F_CR3_AFTER_BAD,
    F_CR3_BEFORE_BAD,
    F_SIG_AFTER,
    F_SIG_BEFORE,
    REC_PARANOID,
    REC_SITE,
    RECORD,
    CR3Sides,
    PluginWatch,
    PluginWatchResult,
    RecordChecker,
    _loaded_value_problems,
    operand,
    sites_file,
    watch,
)
from rig.observe.transitions import Hit, TransitionChecker
from rig.observe.watching import SiteTally
from rig.supply.cache import default_cache_dir
from rig.supply.kernel import resolve_kernel
from rig.supply.kernelbuild import build_kernel
from rig.supply.qemu import fetch_qemu
from rig.supply.qemuplugin import api_refusal, build_plugin, plugin_header, plugin_support
from rig.tools.mutants import DEFAULT_FLAVOR, MUTANTS_DIR
from rig.transport.local import LocalHost
from rig.transport.qemu import QemuConfig, QemuMachine, QemuPlugin

#: The mutant the plugin must catch: its SYSRET exit loads the user CR3 with the signal still 1.
MUTANT = "sysret-exit-no-clear"

WRITE = Site(
    0xFFFFFFFF81000030, "cr3-write", "entry_SYSCALL_64", "entry_SYSCALL_64+0x30", "mov %rdi,%cr3", None, 0x1
)
STORE = Site(0xFFFFFFFF81000025, "signal-store", "f", "f+0x25", "movl $0x1,%gs:0x0(%rip)", 1, 0x2)
REG_STORE = Site(0xFFFFFFFF81000040, "signal-store", "g", "g+0x3b", "mov %ebx,0x10(%rax)", None, 0x3)


def test_operands_name_what_the_instruction_writes() -> None:
    assert operand(WRITE) == "rdi"
    assert operand(STORE) == "$1"
    assert operand(REG_STORE) == "rbx"  # %ebx: the plugin reads rbx, the check keeps 32 bits
    assert operand(replace(WRITE, insn="mov %r12,%cr3")) == "r12"
    assert operand(replace(WRITE, insn="mov %r9d,%cr3")) == "r9"


def test_the_sites_file_lists_each_site_and_paranoid_entry() -> None:
    text = sites_file([STORE, WRITE], 0xFFFFFFFF81000100)
    assert text.splitlines() == [
        "0 ffffffff81000025 2 store $1",
        "1 ffffffff81000030 1 cr3 rdi",
        "2 ffffffff81000100 0 paranoid -",
    ]
    with pytest.raises(ConfigError, match="no following instruction"):
        sites_file([replace(STORE, next_address=0)], None)


def test_the_value_read_back_must_be_the_value_written() -> None:
    user = 0x1234000 | (1 << 12)
    assert _loaded_value_problems(Hit(1, WRITE, 0x1234000, user, 0, 0), user) == []
    assert _loaded_value_problems(Hit(1, WRITE, 0x1234000, user, 0, 0), user | (1 << 63)) == []  # NOFLUSH
    assert "CR3 reads" in _loaded_value_problems(Hit(1, WRITE, 0x1234000, 0x1234000, 0, 0), user)[0].text
    assert _loaded_value_problems(Hit(0, STORE, 0, 0, 0, 1), 1) == []
    assert "went elsewhere" in _loaded_value_problems(Hit(0, STORE, 0, 0, 0, 0), 1)[0].text


def test_a_side_change_between_watched_instructions_is_a_missed_write() -> None:
    sides = CR3Sides(2)
    kernel, user = 0x1234000, 0x1235000
    assert sides.continues(0, kernel, "a") == []  # first hit: nothing to compare
    sides.left(0, user)
    assert sides.continues(1, kernel, "b") == []  # another vCPU has its own side
    assert sides.continues(0, user, "c") == []
    sides.left(0, user)
    (problem,) = sides.continues(0, kernel, "paranoid_entry")
    assert problem.rule is Rule.UNLISTED_CR3_WRITE and problem.cpu == 0
    assert problem.text.startswith("vCPU 0 at paranoid_entry: CR3 went from the user to the kernel side")


def test_the_record_layout_matches_the_plugin() -> None:
    assert RECORD.size == 40  # cr3watch.c: _Static_assert(sizeof(struct record) == 40)


def test_the_plugin_argument_names_files_in_the_private_directory() -> None:
    plugin = QemuPlugin(Path("/x/cr3watch.so"), args=(("sites", "{dir}/s.txt"), ("sock", "{dir}/w.sock")))
    assert plugin.argument("/tmp/d") == "/x/cr3watch.so,sites=/tmp/d/s.txt,sock=/tmp/d/w.sock"
    m = QemuMachine(LocalHost(), QemuConfig(Path("k"), Path("i"), "", plugin=plugin))
    try:
        argv = m.argv("qemu")
        assert argv[argv.index("-plugin") + 1] == plugin.argument(str(m.dir))
    finally:
        m.close()


def mutant_build(name: str) -> tuple[Path, Path]:
    """(bzImage, vmlinux) of mutant ``name`` of the default flavor: a cache hit, or an
    incremental build of the reference tree (the mutant runner's own build)."""
    build = build_kernel(DEFAULT_FLAVOR, patches_extra=[(MUTANTS_DIR / f"{name}.patch").resolve()])
    return build.bzimage, build.vmlinux


@pytest.fixture(scope="module")
def qemu10() -> str:
    return str(fetch_qemu("bookworm-backports", default_cache_dir()))


def boot_watched(
    kernel: Path, vmlinux: Path, initrd: Path, qemu: str, label: str
) -> tuple[Guest, PluginWatch]:
    cache = default_cache_dir()
    pw = PluginWatch.prepare(vmlinux, signal=SIGNAL, qemu=qemu, cache_dir=cache)
    config = GuestConfig(kernel, initrd, vmlinux, qemu=qemu, label=label, cache_dir=cache, plugin=pw.plugin)
    return Guest.boot(config), pw


def test_the_reference_kernel_passes(initrd: Path, qemu10: str) -> None:
    k = resolve_kernel(None, None, default_cache_dir())
    if k.vmlinux is None:
        pytest.skip(f"the default kernel {k.label} has no vmlinux")
    g, pw = boot_watched(k.image, k.vmlinux, initrd, qemu10, k.label)
    try:
        g.start_workload("syscall-loop", g.config.isolated)
        g.start_workload("fault-loop", 0)
        # fault-loop on vCPU 0 is far slower than syscall-loop: 2,000 transitions can all
        # come from vCPU 1 before vCPU 0's first fault (seen once in CI); watch until both ran
        result = watch(g, pw, transitions=2000, nmi_every=100, min_per_cpu=10, max_seconds=60)
    finally:
        g.close()
    assert not result.problems, render(result.problems)
    assert result.transitions >= 2000
    assert set(result.hits_by_cpu) == {0, 1} and min(result.hits_by_cpu.values()) >= 10
    assert result.unreadable_signals == 0


def test_a_mutant_kernel_is_caught(initrd: Path, qemu10: str) -> None:
    g, pw = boot_watched(*mutant_build(MUTANT), initrd, qemu10, f"mutant {MUTANT}")
    try:
        g.start_workload("syscall-loop", g.config.isolated)
        result = watch(g, pw, transitions=200)
    finally:
        g.close()
    assert result.problems, f"plugin watch missed {MUTANT}:\n{result.table()}"
    assert "syscall_return_via_sysret" in result.problems[0].text
    assert "loaded the user CR3 (kernel->user) with the signal 1" in result.problems[0].text


def test_qemu_7_2_cannot_load_the_plugin(initrd: Path) -> None:
    why = plugin_support("qemu-system-x86_64")
    assert why is not None and "QEMU 7.2" in why and "bookworm-backports" in why
    k = resolve_kernel(None, None, default_cache_dir())
    if k.vmlinux is None:
        pytest.skip(f"the default kernel {k.label} has no vmlinux")
    with pytest.raises(ConfigError, match=r"QEMU >= 9\.2"):
        PluginWatch.prepare(
            k.vmlinux, signal=SIGNAL, qemu="qemu-system-x86_64", cache_dir=default_cache_dir()
        )
    # what the version check spares: QEMU 7.2 itself refuses the plugin at start (one line)
    plugin = QemuPlugin(
        build_plugin(default_cache_dir()), args=(("sites", "/dev/null"), ("sock", "{dir}/w.sock"))
    )
    m = QemuMachine(LocalHost(), QemuConfig(k.image, initrd, "", plugin=plugin))
    try:
        with pytest.raises(ConfigError, match="undefined symbol: qemu_plugin_read_memory_vaddr"):
            m.start()
    finally:
        m.close()
    assert not m.dir.exists()


def test_a_qemu_refusing_the_plugin_api_version_is_named(qemu10: str, tmp_path: Path) -> None:
    """The matrix's sid cell: QEMU 11.1 loads only plugins of API >= 7, and the plugin is
    built against API 4 (the newest qemu-plugin.h the mirror serves). The rig asks QEMU
    (``-machine none``, nothing boots) and quotes its refusal, so plugin watch falls back
    or says why. Here the other direction, on a real QEMU: a plugin declaring API 99."""
    header = plugin_header(default_cache_dir())
    src = tmp_path / "future.c"
    src.write_text(
        "#include <qemu-plugin.h>\n"
        "QEMU_PLUGIN_EXPORT int qemu_plugin_version = 99;\n"
        "QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,\n"
        "                                           int argc, char **argv) { return 0; }\n"
    )
    glib = subprocess.run(["pkg-config", "--cflags", "glib-2.0"], capture_output=True, text=True, check=True)
    lib = tmp_path / "future.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", f"-I{header.parent}", *glib.stdout.split(), "-o", str(lib), str(src)],
        check=True,
    )
    assert (
        api_refusal(qemu10, lib)
        == "plugin requires API version 99, but this QEMU supports only up to version 4"
    )
    assert api_refusal(qemu10, build_plugin(default_cache_dir())) is None


def _record(
    rtype: int, flags: int, cpu: int, index: int, cr3s: tuple[int, int], sigs: tuple[int, int]
) -> tuple[int, ...]:
    """One plugin record as RecordChecker.feed receives it (RECORD unpacked)."""
    raw = RECORD.pack(rtype, flags, cpu, index, cr3s[0], 0, cr3s[1], sigs[0], sigs[1])
    return RECORD.unpack(raw)


def test_plugin_records_fail_closed() -> None:
    """A signal or CR3 the plugin could not read is a finding (a None read never passes)."""
    kernel, user = 0x1234000, 0x1235000
    ok = F_SIG_BEFORE | F_SIG_AFTER | F_AT_NEXT
    checker = TransitionChecker(2, [WRITE])
    clean = PluginWatchResult("k", 2, {WRITE.address: SiteTally(WRITE)})
    RecordChecker([WRITE], 2).feed(_record(REC_SITE, ok, 1, 0, (kernel, user), (0, 0)), clean, checker)
    assert clean.problems == [] and clean.unreadable_signals == 0
    for flags, rule in (
        (F_SIG_AFTER | F_AT_NEXT, Rule.SIGNAL_UNREADABLE),  # the read before failed
        (F_SIG_BEFORE | F_AT_NEXT, Rule.SIGNAL_UNREADABLE),  # the read after failed
        (ok | F_CR3_BEFORE_BAD, Rule.RIG_PREMISE),
        (ok | F_CR3_AFTER_BAD, Rule.RIG_PREMISE),
    ):
        result = PluginWatchResult("k", 2, {WRITE.address: SiteTally(WRITE)})
        checker = TransitionChecker(2, [WRITE])
        RecordChecker([WRITE], 2).feed(
            _record(REC_SITE, flags, 1, 0, (kernel, user), (0, 0)), result, checker
        )
        assert rule in [f.rule for f in result.problems], (flags, result.problems)
    paranoid = PluginWatchResult("k", 2, {WRITE.address: SiteTally(WRITE)})
    RecordChecker([WRITE], 2).feed(
        _record(REC_PARANOID, 0, 0, 1, (kernel, 0), (0, 0)), paranoid, TransitionChecker(2, [WRITE])
    )
    assert [f.rule for f in paranoid.problems] == [Rule.SIGNAL_UNREADABLE]
