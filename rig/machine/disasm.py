"""Disassemble captured instruction bytes with binutils' objdump (AT&T syntax, like GDB).

All instructions of a trace go through one objdump call: each is placed in a 32-byte
slot (its bytes, then NOPs), so whatever garbage follows an instruction inside its slot
ends before the next slot and the decoder is back in step at every slot start.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping

from rig.errors import ConfigError

_SLOT = 32

#: AT&T text of a write to CR3 (``mov %reg,%cr3``), as :func:`disassemble` gives it.
MOV_TO_CR3 = re.compile(r"^mov\s+%\w+,%cr3$")


def disassemble(code: Mapping[int, bytes]) -> dict[int, str]:
    """address -> instruction text for each entry of ``code`` (empty bytes give ``?``)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        raise ConfigError("objdump not found: install it with `apt-get install binutils`")
    addrs = [a for a, b in code.items() if b]
    out = {a: "?" for a, b in code.items() if not b}
    if not addrs:
        return out
    blob = bytearray()
    for a in addrs:
        b = code[a][:15]
        blob += b + b"\x90" * (_SLOT - len(b))
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(blob)
        f.flush()
        text = subprocess.run(
            [objdump, "-D", "-b", "binary", "-m", "i386:x86-64", "--no-show-raw-insn", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found: dict[int, str] = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([0-9a-f]+):\s+(.*)$", line)
        if m:
            off = int(m.group(1), 16)
            if off % _SLOT == 0:
                found[off // _SLOT] = " ".join(m.group(2).split())
    for i, a in enumerate(addrs):
        out[a] = found.get(i, "?")
    return out
