"""Linux's x86 selftests: read from the kernel tree's Makefile, built statically, cached,
put into the initramfs (real tree, real gcc; no guest)."""

from __future__ import annotations

import gzip
import struct
import subprocess
import time
from pathlib import Path

import pytest

from rig import protocol
from rig.supply import initramfs, selftests
from rig.supply.cache import default_cache_dir
from rig.supply.selftests import SELFTEST_DIR, SelftestSourceMissing

REPO = Path(__file__).resolve().parents[1]
_PT_INTERP = 3


def _source() -> selftests.SelftestSource:
    try:
        return selftests.pristine_source(default_cache_dir())
    except SelftestSourceMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def build() -> selftests.SelftestBuild:
    _source()
    return selftests.build_selftests(default_cache_dir())


def _elf_class_and_interp(path: Path) -> tuple[int, bool]:
    """(32 or 64, has a PT_INTERP header) of an ELF file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", path
    bits = 64 if data[4] == 2 else 32
    if bits == 64:
        (phoff,) = struct.unpack_from("<Q", data, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    else:
        (phoff,) = struct.unpack_from("<I", data, 0x1C)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x2A)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return bits, _PT_INTERP in types


def test_targets_come_from_the_trees_makefile() -> None:
    src = _source()
    makefile = subprocess.run(
        ["git", "-C", str(src.repo), "show", f"{src.commit}:{SELFTEST_DIR}/Makefile"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    targets = {t.name: t for t in selftests.makefile_targets(makefile)}
    # both bitnesses, 64-bit only, 32-bit only, as the Makefile's lists say
    assert {"mov_ss_trap_32", "mov_ss_trap_64", "sysret_rip_64", "entry_from_vm86_32"} <= set(targets)
    assert "sysret_rip_32" not in targets and "entry_from_vm86_64" not in targets
    # its extra-files and per-target CFLAGS rules
    assert targets["sysret_ss_attrs_64"].extra_files == ("thunks.S",)
    assert targets["check_initial_reg_state_64"].extra_flags == ("-Wl,-ereal_start",)
    assert set(selftests.DEFAULT_SELFTESTS) <= set(targets)
    assert set(selftests.NOT_RUN) <= set(targets), set(selftests.NOT_RUN) - set(targets)


def test_sources_are_the_pristine_trees_not_copies() -> None:
    src = _source()
    path = f"{SELFTEST_DIR}/mov_ss_trap.c"
    blob = subprocess.run(
        ["git", "-C", str(src.repo), "rev-parse", f"{src.commit}:{path}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert src.blobs[path] == blob
    # sigreturn.c includes a header from arch/: found by its relative #include
    assert "arch/x86/include/asm/desc_defs.h" in src.blobs
    assert not list(REPO.glob("**/mov_ss_trap.c")), "a copy of the selftests in the repository"


def test_every_target_is_built_static_or_has_a_reason(build: selftests.SelftestBuild) -> None:
    names = [t.name for t in build.targets]
    assert set(build.binaries) | set(build.failed) == set(names)
    for reason in build.failed.values():
        assert reason.strip()
    for name, path in build.binaries.items():
        bits, interp = _elf_class_and_interp(path)
        assert bits == int(name.rsplit("_", 1)[1]), name
        assert not interp, f"{name} is dynamically linked"
    assert set(selftests.DEFAULT_SELFTESTS) <= set(build.binaries)
    table = build.table()
    for t in build.targets:
        assert t.name in table


def test_a_second_build_is_a_cache_hit(build: selftests.SelftestBuild) -> None:
    t0 = time.monotonic()
    again = selftests.build_selftests(default_cache_dir())
    assert again.directory == build.directory and again.key == build.key
    assert time.monotonic() - t0 < 10.0


def test_the_default_initramfs_holds_the_default_selftests(build: selftests.SelftestBuild) -> None:
    path = initramfs.build_initramfs(default_cache_dir())
    raw = gzip.decompress(path.read_bytes())
    for name in selftests.DEFAULT_SELFTESTS:
        data = build.binaries[name].read_bytes()
        member = f"{protocol.SELFTESTS_DIR}/{name}".encode() + b"\0"
        at = raw.find(member)
        assert at >= 0, f"{name} is not in {path}"
        assert data in raw, f"{name} in {path} differs from the build"
    other = next(n for n in build.binaries if n not in selftests.DEFAULT_SELFTESTS)
    assert f"{protocol.SELFTESTS_DIR}/{other}\0".encode() not in raw


def test_without_the_tree_the_initramfs_says_why(tmp_path: Path) -> None:
    path = initramfs.build_initramfs(tmp_path)
    raw = gzip.decompress(path.read_bytes())
    assert b"selftests/MISSING\0" in raw
    assert b"python -m rig.supply.kernelbuild reference-7.2" in raw


def test_a_verdict_reads_back_from_its_record() -> None:
    from rig.observe.selftestwatch import TIMED_OUT, SelftestVerdict

    v = SelftestVerdict(
        "mov_ss_trap_64", 139, {"OK": 0, "FAIL": 0, "SKIP": 0}, ["last: [RUN]\tMOV SS; SYSCALL"]
    )
    back = SelftestVerdict.from_json(v.name, v.to_json())
    assert back == v
    assert not v.passed and "killed by signal 11" in v.describe()
    assert not SelftestVerdict("x", 0, {"OK": 3, "FAIL": 1}).passed  # a [FAIL] line fails it
    assert SelftestVerdict("x", 0, {"OK": 3}).passed
    assert (
        SelftestVerdict("x", TIMED_OUT, {}, ["did not finish within 60 s"]).describe().startswith("TIMEOUT")
    )


def test_the_selftests_option_chooses_the_initramfs() -> None:
    """``--selftests`` without ``--initrd`` boots an initramfs that holds what it chose."""
    from rig.supply.initramfs import selftest_choice
    from rig.supply.selftests import DEFAULT_SELFTESTS

    assert selftest_choice("") == selftest_choice("default") == "default"
    assert selftest_choice(",".join(DEFAULT_SELFTESTS)) == "default"
    assert selftest_choice("all") == "all"
    assert selftest_choice(f"{DEFAULT_SELFTESTS[0]}, sigreturn_64") == "all"
