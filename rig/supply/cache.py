"""The rig's cache directory (kernels, initramfs, kallsyms)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$CR3RIG_CACHE`` if set, else ``~/.cache/cr3rig``."""
    env = os.environ.get("CR3RIG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cr3rig"
