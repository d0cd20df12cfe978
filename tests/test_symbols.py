"""Symbol tables, build-ids from kernel notes, per-CPU addresses (rig/symbols.py)."""

import subprocess
from pathlib import Path

import pytest

from rig.machine.symbols import (
    Symbol,
    SymbolTable,
    elf_build_id,
    elf_symbols,
    notes_build_id,
    parse_kallsyms,
    per_cpu_address,
)
from rig.supply.cache import default_cache_dir

KALLSYMS = """\
0000000000006000 A cpu_tss_rw
ffffffff81000000 T _text
ffffffff81c00080 T entry_SYSCALL_64
ffffffff8241cb60 D __per_cpu_offset
"""


def test_kallsyms_lookup_and_describe() -> None:
    t = SymbolTable(parse_kallsyms(KALLSYMS), "test")
    assert t.address("entry_SYSCALL_64") == 0xFFFFFFFF81C00080
    assert t.describe(0xFFFFFFFF81C00089) == "entry_SYSCALL_64+0x9"
    assert t.describe(0x401000) == "0x401000"
    assert "cpu_tss_rw" in t and len(t) == 4
    again = SymbolTable.from_json(t.to_json(), "cache")
    assert again.address("_text") == 0xFFFFFFFF81000000


def test_per_cpu_address_zero_based_and_absolute() -> None:
    t = SymbolTable(parse_kallsyms(KALLSYMS), "test")
    offsets = {0: 0xFF1100001F000000, 1: 0xFF1100001F100000}
    assert per_cpu_address(t, offsets, "cpu_tss_rw", 1) == 0xFF1100001F106000


def test_notes_build_id_matches_elf_build_id() -> None:
    # /bin/true has a GNU build-id note: parse its raw note section both ways
    from elftools.elf.elffile import ELFFile

    path = Path("/bin/true")
    with open(path, "rb") as f:
        sect = ELFFile(f).get_section_by_name(".note.gnu.build-id")
        assert sect is not None
        raw = sect.data()
    assert notes_build_id(raw) == elf_build_id(path)
    assert notes_build_id(b"") is None


def _pyelftools_symbols(path: Path) -> list[Symbol]:
    """The former elf_symbols: pyelftools' per-symbol objects (the reference)."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    with open(path, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        out = []
        for sym in symtab.iter_symbols():
            if not sym.name or sym["st_info"]["type"] in ("STT_FILE", "STT_SECTION"):
                continue
            kind = "T" if sym["st_info"]["type"] == "STT_FUNC" else "D"
            out.append(Symbol(sym.name, int(sym["st_value"]), kind))
        return out


def test_elf_symbols_equal_pyelftools(tmp_path: Path) -> None:
    # a small unstripped ELF with functions, data, a file symbol and section symbols
    src = tmp_path / "syms.c"
    src.write_text(
        "int counter = 3;\nstatic int hidden;\nint bump(void) { return ++counter + hidden; }\n"
        "static void helper(void) { hidden++; }\nint main(void) { helper(); return bump(); }\n"
    )
    exe = tmp_path / "syms"
    subprocess.run(["gcc", "-O0", "-o", str(exe), str(src)], check=True)
    got = elf_symbols(exe)
    assert got == _pyelftools_symbols(exe)
    names = {s.name: s.kind for s in got}
    assert names["bump"] == "T" and names["counter"] == "D" and names["helper"] == "T"
    assert "syms.c" not in names  # STT_FILE is skipped


def test_elf_symbols_of_a_cached_vmlinux_equal_pyelftools() -> None:
    builds = sorted(default_cache_dir().glob("kernels/builds/*/vmlinux"))
    if not builds:
        pytest.skip(f"no vmlinux under {default_cache_dir()}/kernels/builds (scripts/setup.sh builds one)")
    got = elf_symbols(builds[0])
    assert len(got) > 10_000
    assert got == _pyelftools_symbols(builds[0])
