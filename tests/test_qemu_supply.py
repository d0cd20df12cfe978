"""rig.supply.qemu: a QEMU from another Debian suite, unpacked beside the system's (real apt, real QEMU)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rig.errors import ConfigError
from rig.supply.cache import default_cache_dir
from rig.supply.qemu import fetch_qemu, wrapper_script


def test_wrapper_puts_its_own_data_directory_first() -> None:
    text = wrapper_script(Path("/c/q/root"))
    assert text.startswith("#!/bin/sh\n")
    exe = "/c/q/root/usr/bin/qemu-system-x86_64"
    assert f'exec "{exe}" -L "/c/q/root/usr/share/qemu" -L /usr/share/qemu "$@"' in text


def test_backports_qemu_runs_here() -> None:
    """bookworm-backports' QEMU 10.0 starts, knows its machines and finds its own data directory."""
    wrapper = fetch_qemu("bookworm-backports", default_cache_dir())
    version = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("QEMU emulator version 10.0."), version
    machines = subprocess.run([str(wrapper), "-machine", "help"], capture_output=True, text=True, check=True)
    assert "pc-q35-10.0" in machines.stdout
    # the firmware comes from the unpacked data directory, not the system's 7.2 one
    assert (wrapper.parent / "root" / "usr" / "share" / "qemu" / "linuxboot.bin").exists()
    assert fetch_qemu("bookworm-backports", default_cache_dir()) == wrapper  # cached


def test_unknown_suite_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        fetch_qemu("no-such-suite", tmp_path)
    assert "apt-get update (no-such-suite) failed" in str(e.value) and "\n" not in str(e.value)
