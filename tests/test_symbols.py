"""Symbol tables, build-ids from kernel notes, per-CPU addresses (rig/symbols.py)."""

from pathlib import Path

from rig.machine.symbols import SymbolTable, elf_build_id, notes_build_id, parse_kallsyms, per_cpu_address

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
