"""What a kernel file is: an x86 bzImage, an x86-64 ELF, a complete vmlinux with symbols.

Static checks of the files a user names (``--kernel``, ``--vmlinux``), run before anything
starts: pyelftools reads the ELF header and section table only (well under a second even
for a 600 MB debug vmlinux).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["is_kernel_image", "vmlinux_problem", "x86_64_elf_problem"]


def is_kernel_image(path: Path) -> str | None:
    """None if ``path`` looks like an x86 bzImage or an ELF vmlinux, else why not."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x210)
    except OSError as exc:
        return f"cannot read it ({exc.strerror})"
    if head[:4] == b"\x7fELF":
        why = x86_64_elf_problem(path)
        return None if why is None else f"it is {why}"
    if len(head) >= 0x206 and head[0x202:0x206] == b"HdrS":
        return None
    return "it is neither a bzImage (no 'HdrS' boot header) nor an ELF vmlinux"


def x86_64_elf_problem(path: Path) -> str | None:
    """None if ``path`` is an x86-64 ELF, else why not (one phrase). Reads the header only."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return "not an ELF file (no \\x7fELF magic)"
            f.seek(0)
            elf = ELFFile(f)
            machine = elf["e_machine"]
            cls = elf.elfclass
    except OSError as exc:
        return f"cannot read it ({exc.strerror})"
    except (ELFError, ValueError, KeyError) as exc:
        return f"not a valid ELF file ({exc})"
    if machine != "EM_X86_64" or cls != 64:
        arch = str(machine).removeprefix("EM_")
        return f"an ELF{cls} for {arch}, not x86-64"
    return None


def vmlinux_problem(vmlinux: Path) -> str | None:
    """None if ``vmlinux`` is a complete x86-64 ELF with a symbol table, else why not.

    Checked statically (pyelftools, headers and section table only: well under a second
    even for a 600 MB debug vmlinux): not an ELF, another architecture, truncated
    (a section or the section table ends beyond the end of the file), no ``.symtab``.
    """
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    why = x86_64_elf_problem(vmlinux)
    if why is not None:
        return why
    size = vmlinux.stat().st_size
    try:
        with open(vmlinux, "rb") as f:
            elf = ELFFile(f)
            table_end = elf["e_shoff"] + elf["e_shnum"] * elf["e_shentsize"]
            if elf["e_shnum"] == 0 or table_end > size:
                return f"truncated ({size} bytes; its section table ends at byte {table_end})"
            has_symtab = False
            for sect in elf.iter_sections():
                end = sect["sh_offset"] + sect["sh_size"]
                if sect["sh_type"] != "SHT_NOBITS" and end > size:
                    return f"truncated ({size} bytes; section {sect.name} ends at byte {end})"
                has_symtab |= sect["sh_type"] == "SHT_SYMTAB"
    except (ELFError, ValueError, KeyError, OSError) as exc:
        return f"not a valid ELF file ({exc})"
    if not has_symtab:
        return "no symbol table (.symtab; stripped?)"
    return None
