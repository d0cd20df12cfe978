"""Tests for rig.supply.initramfs: the archive is read back with a tiny newc parser.

These build the real archive (busybox-static and gcc needed, no root, no QEMU).
"""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    from rig.supply import initramfs
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from rig.supply import initramfs

from rig import protocol
from rig.errors import ConfigError
from rig.transport.console import strip_console_noise

# --------------------------------------------------------------------------
# A minimal newc ("070701") reader


@dataclass(frozen=True)
class Member:
    """One cpio member as stored in the archive."""

    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    rdev: tuple[int, int]
    data: bytes


def read_newc(raw: bytes) -> dict[str, Member]:
    """Parse a newc archive up to its trailer; return members by name."""
    members: dict[str, Member] = {}
    pos = 0
    while True:
        header = raw[pos : pos + 110]
        assert len(header) == 110, f"truncated header at {pos}"
        assert header[:6] == b"070701", f"bad magic at {pos}: {header[:6]!r}"
        f = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, check = f
        assert check == 0
        name_end = pos + 110 + namesize
        name_bytes = raw[pos + 110 : name_end]
        assert name_bytes.endswith(b"\0"), "name not NUL-terminated"
        name = name_bytes[:-1].decode()
        pos = (name_end + 3) & ~3
        if name == "TRAILER!!!":
            assert raw[pos:].strip(b"\0") == b"", "data after trailer"
            return members
        data = raw[pos : pos + size]
        assert len(data) == size, f"truncated data for {name}"
        pos = (pos + size + 3) & ~3
        assert name not in members, f"duplicate member {name}"
        members[name] = Member(name, ino, mode, uid, gid, nlink, mtime, (rmaj, rmin), data)


def is_static_x86_64_elf(data: bytes) -> bool:
    """True for a 64-bit little-endian x86-64 ELF with no PT_INTERP."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    if int.from_bytes(data[0x12:0x14], "little") != 62:  # EM_X86_64
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
            return False
    return True


def is_static_i386_elf(data: bytes) -> bool:
    """True for a 32-bit little-endian i386 ELF executable with no PT_INTERP."""
    if data[:4] != b"\x7fELF" or data[4] != 1 or data[5] != 1:
        return False
    if int.from_bytes(data[0x12:0x14], "little") != 3:  # EM_386
        return False
    phoff = int.from_bytes(data[0x1C:0x20], "little")
    phentsize = int.from_bytes(data[0x2A:0x2C], "little")
    phnum = int.from_bytes(data[0x2C:0x2E], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
            return False
    return True


# --------------------------------------------------------------------------
# Fixtures


@dataclass(frozen=True)
class Built:
    """A cold build and what was measured about it."""

    path: Path
    cache_dir: Path
    seconds: float
    members: dict[str, Member]


def _build_or_skip(cache_dir: Path) -> Path:
    try:
        return initramfs.build_initramfs(cache_dir)
    except ConfigError as exc:  # busybox-static / gcc missing on this host
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    cache = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    path = _build_or_skip(cache)
    seconds = time.perf_counter() - start
    members = read_newc(gzip.decompress(path.read_bytes()))
    return Built(path, cache, seconds, members)


# --------------------------------------------------------------------------
# Archive contents


def test_output_location_and_format(built: Built) -> None:
    assert built.path.parent == built.cache_dir / "initramfs"
    assert built.path.name.endswith(".cpio.gz")
    key = built.path.name.removesuffix(".cpio.gz")
    assert len(key) == 64 and all(c in "0123456789abcdef" for c in key)
    raw = built.path.read_bytes()
    assert raw[:2] == b"\x1f\x8b", "not gzip"
    assert raw[4:8] == b"\0\0\0\0", "gzip mtime must be 0"
    # Only the finished archive: no temp files left behind.
    assert sorted(p.name for p in built.path.parent.iterdir()) == [built.path.name]


def test_every_member_is_root_owned_with_zero_mtime(built: Built) -> None:
    for m in built.members.values():
        assert (m.uid, m.gid, m.mtime) == (0, 0, 0), m.name
        assert not m.name.startswith("/"), m.name
    inos = [m.ino for m in built.members.values()]
    assert len(set(inos)) == len(inos), "inode numbers must be unique"


def test_init(built: Built) -> None:
    init = built.members["init"]
    assert init.mode == stat.S_IFREG | 0o755
    text = init.data.decode()
    assert text.startswith("#!/bin/busybox sh\n")
    assert (initramfs.SOURCE_DIR / "init").read_bytes() == init.data
    # The protocol constants the rest of the rig relies on.
    assert f'echo "{protocol.READY_MARKER}"' in text
    assert f"PS1='{protocol.PROMPT}'" in text
    assert "export PATH=/bin:/sbin:/usr/bin" in text
    assert "setsid cttyhack sh" in text
    assert "poweroff -f" in text


def test_init_parses_with_busybox_sh() -> None:
    busybox = shutil.which("busybox") or str(initramfs.BUSYBOX_PATH)
    if not Path(busybox).exists():
        pytest.skip("busybox not installed")
    proc = subprocess.run(
        [busybox, "sh", "-n", str(initramfs.SOURCE_DIR / "init")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_dev_console_node(built: Built) -> None:
    console = built.members["dev/console"]
    assert stat.S_ISCHR(console.mode)
    assert stat.S_IMODE(console.mode) == 0o600
    assert console.rdev == (5, 1)
    assert console.data == b""


def test_directories(built: Built) -> None:
    for d in ("bin", "dev", "etc", "proc", "sys", "tmp"):
        assert stat.S_ISDIR(built.members[d].mode), d
    assert stat.S_IMODE(built.members["tmp"].mode) == 0o1777
    # Parents come before their children.
    names = list(built.members)
    for i, name in enumerate(names):
        if "/" in name:
            assert name.rsplit("/", 1)[0] in names[:i], name


def test_busybox_and_applets(built: Built) -> None:
    bb = built.members["bin/busybox"]
    assert bb.mode == stat.S_IFREG | 0o755
    assert bb.data == initramfs.BUSYBOX_PATH.read_bytes()
    assert is_static_x86_64_elf(bb.data)
    for applet in ("sh", "mount", "mknod", "setsid", "cttyhack", "poweroff", "uname", "stty"):
        link = built.members[f"bin/{applet}"]
        assert link.mode == stat.S_IFLNK | 0o777, applet
        assert link.data == b"busybox", applet
    listed = subprocess.run(
        [str(initramfs.BUSYBOX_PATH), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in listed:
        assert f"bin/{applet}" in built.members, applet


@pytest.mark.parametrize("name", initramfs.WORKLOADS)
def test_workload_binaries(built: Built, name: str) -> None:
    member = built.members[f"bin/{name}"]
    assert member.mode == stat.S_IFREG | 0o755
    if name in initramfs.COMPAT_WORKLOADS:
        assert is_static_i386_elf(member.data), f"{name} is not a static i386 ELF"
    else:
        assert is_static_x86_64_elf(member.data), f"{name} is not a static x86-64 ELF"
    assert protocol.WORKLOAD_MARKER.encode() in member.data
    assert (initramfs.SOURCE_DIR / "workloads" / f"{name}.c").is_file()


def test_protocol_constants() -> None:
    assert protocol.READY_MARKER == "CR3RIG-READY"
    assert protocol.PROMPT == "cr3rig# "
    assert protocol.WORKLOAD_MARKER == "CR3RIG-WORKLOAD"
    # every workload source is installed, and every installed name has a source
    sources = {p.stem for p in (initramfs.SOURCE_DIR / "workloads").glob("*.c")}
    assert set(initramfs.WORKLOADS) == sources, sorted(set(initramfs.WORKLOADS) ^ sources)
    assert set(initramfs.COMPAT_WORKLOADS) <= set(initramfs.WORKLOADS)
    header = (initramfs.SOURCE_DIR / "workloads" / "workload.h").read_text()
    assert f'"{protocol.WORKLOAD_MARKER}"' in header
    compat_header = (initramfs.SOURCE_DIR / "workloads" / "compat32.h").read_text()
    assert f'"{protocol.WORKLOAD_MARKER}"' in compat_header


def test_strip_console_noise() -> None:
    raw = "\x1b[6necho hi\r\r\nhi\r\r\ncr3rig# "
    assert strip_console_noise(raw) == "echo hi\nhi\ncr3rig# "


# --------------------------------------------------------------------------
# Caching, reproducibility, atomicity


def test_second_build_is_a_cache_hit(built: Built) -> None:
    before = built.path.stat().st_mtime_ns
    start = time.perf_counter()
    again = initramfs.build_initramfs(built.cache_dir)
    elapsed = time.perf_counter() - start
    assert again == built.path
    assert built.path.stat().st_mtime_ns == before, "archive was rewritten"
    assert elapsed < 1.0, f"cache hit took {elapsed:.2f}s (cold build {built.seconds:.2f}s)"


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CR3RIG_CACHE", str(tmp_path))
    assert initramfs.default_cache_dir() == tmp_path
    monkeypatch.delenv("CR3RIG_CACHE")
    assert initramfs.default_cache_dir() == Path.home() / ".cache" / "cr3rig"


def test_build_is_reproducible(built: Built, tmp_path: Path) -> None:
    other = _build_or_skip(tmp_path)
    assert other.name == built.path.name
    assert other.read_bytes() == built.path.read_bytes()


def test_cache_key_follows_sources(built: Built, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(initramfs.SOURCE_DIR, src)
    key = initramfs.initramfs_cache_key(source_dir=src, cache_dir=built.cache_dir)
    assert built.path.name == f"{key}.cpio.gz"
    with (src / "workloads" / "user-spin.c").open("a") as f:
        f.write("/* changed */\n")
    assert initramfs.initramfs_cache_key(source_dir=src, cache_dir=built.cache_dir) != key


def test_interrupted_build_leaves_nothing(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Boom(gzip.GzipFile):
        def write(self, data: object) -> int:
            raise KeyboardInterrupt

    monkeypatch.setattr(gzip, "GzipFile", Boom)  # the module rig.supply.initramfs uses
    with pytest.raises(KeyboardInterrupt):
        initramfs.build_initramfs(tmp_path)
    assert list((tmp_path / "initramfs").iterdir()) == []


# --------------------------------------------------------------------------
# Errors


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    return msg


def test_missing_busybox(tmp_path: Path) -> None:
    with pytest.raises(initramfs.BusyboxMissingError) as info:
        initramfs.build_initramfs(tmp_path, busybox=tmp_path / "no-busybox")
    assert "apt-get install busybox-static" in _one_line(info.value)
    assert isinstance(info.value, initramfs.InitramfsError)
    assert isinstance(info.value, RuntimeError)


def test_dynamic_busybox_is_rejected(tmp_path: Path) -> None:
    dynamic = Path(sys.executable).resolve()
    if is_static_x86_64_elf(dynamic.read_bytes()[:65536]):
        pytest.skip("python is static here")
    with pytest.raises(initramfs.BusyboxMissingError) as info:
        initramfs.build_initramfs(tmp_path, busybox=dynamic)
    assert "apt-get install busybox-static" in _one_line(info.value)


def test_missing_gcc(tmp_path: Path) -> None:
    if not initramfs.BUSYBOX_PATH.exists():
        pytest.skip("busybox-static not installed")
    with pytest.raises(initramfs.CompilerMissingError) as info:
        initramfs.build_initramfs(tmp_path, cc="cr3rig-no-such-gcc")
    assert "apt-get install gcc libc6-dev" in _one_line(info.value)


def test_compile_error_is_one_line(built: Built, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(initramfs.SOURCE_DIR, src)
    (src / "workloads" / "poke.c").write_text("int main(void) { return undefined_thing; }\n")
    with pytest.raises(initramfs.WorkloadCompileError) as info:
        initramfs.build_initramfs(tmp_path / "cache", source_dir=src)
    msg = _one_line(info.value)
    assert "poke.c" in msg and "undefined_thing" in msg
    assert "undefined_thing" in info.value.stderr
    assert not list((tmp_path / "cache" / "initramfs").glob("*.cpio.gz"))
