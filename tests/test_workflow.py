"""The GitHub Actions workflow: actionlint-clean, and it runs the same cells through the same runner."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from rig.tools.matrix import DEFAULT_CELLS

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "matrix.yml"
#: installed into the venv by the dev extra (a wheel that carries the actionlint binary)
ACTIONLINT = Path(sys.executable).with_name("actionlint")


def test_workflow_passes_actionlint() -> None:
    assert ACTIONLINT.is_file(), f"{ACTIONLINT} missing: run scripts/setup.sh (dev extra installs actionlint)"
    # shellcheck (a Debian package setup.sh installs) makes actionlint check the run: scripts too
    assert shutil.which("shellcheck"), "shellcheck missing: run scripts/setup.sh"
    res = subprocess.run(
        [str(ACTIONLINT), "-no-color", str(WORKFLOW)], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    """The check can fail: an unknown matrix key in an expression is an error."""
    bad = WORKFLOW.read_text().replace("${{ matrix.cell }}", "${{ matrix.cel }}")
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "matrix.yml").write_text(bad)
    res = subprocess.run(
        [str(ACTIONLINT), "-no-color", ".github/workflows/matrix.yml"],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert res.returncode == 1 and "cel" in res.stdout


def test_workflow_runs_the_default_cells_with_the_runner() -> None:
    text = WORKFLOW.read_text()
    block = text.split("      matrix:\n        cell:\n", 1)[1].split("\n    steps:", 1)[0]
    cells = re.findall(r"^\s+- (\S+)$", block, re.MULTILINE)
    assert tuple(cells) == DEFAULT_CELLS
    assert "python3 -m rig.tools.matrix" in text and "--merge" in text
    assert "actions/cache" in text and "upload-artifact" in text
