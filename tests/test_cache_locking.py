"""The cache's lock and its log pruning hold when processes (xdist workers) race on them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

#: Read-modify-write of a counter file, N times, under rig.supply.cache.locked: without
#: the lock two processes lose each other's updates.
_COUNTER = """
import sys
from pathlib import Path
from rig.supply.cache import locked
counter, lock, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    with locked(lock):
        value = int(counter.read_text() or "0")
        counter.write_text(str(value + 1))
"""

#: Many fresh build logs at once, with pruning down to 3 kept: each process deletes
#: files the others are listing.
_LOGS = """
import sys
from pathlib import Path
from rig.supply.buildrun import log_path
logs, n = Path(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    p = log_path(logs, "reference-7.2", keep=3)
    p.with_name(p.stem + f"-{i}.log").write_text("x")
"""


def _run_all(script: str, args: list[str], processes: int) -> list[subprocess.CompletedProcess[str]]:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(processes)
    ]
    return [subprocess.CompletedProcess(c.args, c.wait(timeout=120), c.communicate()[0]) for c in children]


def test_locked_excludes_other_processes(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")
    done = _run_all(_COUNTER, [str(counter), str(tmp_path / "cache.lock"), "300"], processes=4)
    assert all(c.returncode == 0 for c in done), [c.stdout[-500:] for c in done]
    assert counter.read_text() == str(4 * 300)


def test_log_pruning_survives_concurrent_sessions(tmp_path: Path) -> None:
    """Two workers resolving the same kernel each open a build log and prune old ones:
    a log another process pruned between the listing and its stat() must not fail."""
    logs = tmp_path / "logs"
    done = _run_all(_LOGS, [str(logs), "200"], processes=4)
    assert all(c.returncode == 0 for c in done), [c.stdout[-800:] for c in done]
    assert len(list(logs.glob("reference-7.2-*.log"))) <= 4 * 3
