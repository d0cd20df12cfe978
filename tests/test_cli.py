"""The ``cr3rig`` command as installed: its list of subcommands, an unknown one, each
subcommand's own help, and ``cr3rig report`` on a trace. Every call runs the entry point
pip installed into the venv (``.venv/bin/cr3rig``), in a subprocess; nothing boots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rig.cli import SUBCOMMANDS

#: The subcommands the command must offer (issue: one command for every tool).
EXPECTED = (
    "kernel", "initramfs", "mutants", "matrix", "soak", "sshd", "bench", "report", "litmus", "tcgorder",
)  # fmt: skip


def cr3rig(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "cr3rig"
    assert exe.is_file(), f"{exe} is not installed: pip install -e '.[dev]' (scripts/setup.sh venv)"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_help_lists_every_subcommand_with_one_line() -> None:
    res = cr3rig("--help")
    assert res.returncode == 0, res.stderr
    listed = {}
    lines = res.stdout.splitlines()
    start = lines.index("subcommands:") + 1
    for line in lines[start:]:
        if not line.strip():
            break
        name, summary = line.split(maxsplit=1)
        listed[name] = summary
    assert tuple(listed) == EXPECTED, listed
    assert tuple(s.name for s in SUBCOMMANDS) == EXPECTED
    for s in SUBCOMMANDS:
        assert listed[s.name] == s.summary


def test_unknown_subcommand_is_one_line_and_status_2() -> None:
    res = cr3rig("no-such-tool")
    assert res.returncode == 2
    assert res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "unknown subcommand 'no-such-tool'" in res.stderr and "matrix" in res.stderr


def test_no_subcommand_is_status_2_with_the_list() -> None:
    res = cr3rig()
    assert res.returncode == 2
    assert "subcommands:" in res.stderr


@pytest.mark.parametrize("name", EXPECTED)
def test_each_subcommand_has_its_help(name: str) -> None:
    res = cr3rig(name, "--help")
    assert res.returncode == 0, f"cr3rig {name} --help: exit {res.returncode}\n{res.stderr[-2000:]}"
    assert res.stdout.startswith("usage: "), res.stdout[:300]
    assert res.stderr == "", res.stderr[-2000:]


def test_report_timeline_redraws_a_trace(tmp_path: Path) -> None:
    rows = [
        {"step": n, "cpu": 1, "rip": ["0xffffffff81000000", f"{0xFFFFFFFF81001000 + n:#x}"],
         "cr3": ["0x1000", "0x3000" if n < 3 else "0x2000"],
         "words": {"kernel_cr3_loaded": [1, 1]}, "insn": "nop", "where": f"entry_SYSCALL_64+{n:#x}"}
        for n in range(6)
    ]  # fmt: skip
    jsonl = tmp_path / "t.0.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = cr3rig("report", "timeline", str(jsonl), "--violation-step", "3")
    assert res.returncode == 0, res.stderr
    page = Path(res.stdout.strip())
    assert page == jsonl.with_suffix(".html")
    html = page.read_text()
    assert "<svg" in html and 'id="violation"' in html and "step 3" in html
    assert 'href="t.0.jsonl"' in html


def test_report_names_a_file_that_is_not_a_trace(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    res = cr3rig("report", "timeline", str(bad))
    assert res.returncode == 1
    assert res.stderr.startswith(f"report: {bad}:1: not a snapshot of a step trace"), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_report_mutants_redraws_the_page(tmp_path: Path) -> None:
    (tmp_path / "mutants.md").write_text(
        "# Mutants (reference-7.2)\n\n| mutant | verdict |\n| --- | --- |\n"
        "| reference | OK |\n| wrong-cpu | CAUGHT |\n"
    )
    (tmp_path / "mutants" / "wrong-cpu").mkdir(parents=True)
    (tmp_path / "mutants" / "wrong-cpu" / "index.html").write_text("<html></html>")
    res = cr3rig("report", "mutants", "--results", str(tmp_path))
    assert res.returncode == 0, res.stderr
    page = tmp_path / "mutants.html"
    assert res.stdout.strip() == str(page)
    assert 'href="mutants/wrong-cpu/index.html"' in page.read_text()
