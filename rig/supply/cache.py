"""The rig's cache directory (kernels, initramfs, kallsyms) and its lock.

The cache is shared by concurrent sessions and by the workers of one ``pytest -n N``
run. Every entry is written beside its final name and renamed into place (a reader
sees a whole entry or none); work that must be done once (building a kernel, fetching
a package) runs under :func:`locked` on a lock file next to its entry, and checks again
for the entry once it holds the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def default_cache_dir() -> Path:
    """``$CR3RIG_CACHE`` if set, else ``~/.cache/cr3rig``."""
    env = os.environ.get("CR3RIG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cr3rig"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the block; waits
    as long as another process holds it (the kernel drops it if that process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
