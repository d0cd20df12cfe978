"""Tests of the pure parts of rig.supply.kernelbuild (no kernel is built)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rig.errors import ConfigError
from rig.supply import kernelbuild
from rig.supply.kernelbuild import (
    FLAVORS,
    KernelBuildError,
    UnknownFlavorError,
    cache_key,
    check_config,
    get_flavor,
    parse_fragment,
    series_patches,
)

PATCH_A = b"From 1 Mon Sep 17 00:00:00 2001\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n"
FRAGMENT = b"CONFIG_64BIT=y\n# CONFIG_MODULES is not set\n"


def _key(patches: list[tuple[str, bytes]], fragment: bytes = FRAGMENT, version: str = "v1") -> str:
    return cache_key("reference-7.2", version, patches, fragment)


def test_cache_key_is_stable() -> None:
    assert _key([("0001-a.patch", PATCH_A)]) == _key([("0001-a.patch", PATCH_A)])
    assert len(_key([])) == 64


def test_cache_key_changes_with_each_input() -> None:
    base = _key([("0001-a.patch", PATCH_A)])
    edited = PATCH_A.replace(b"+b", b"+c")
    assert _key([("0001-a.patch", edited)]) != base
    assert _key([("0001-a.patch", PATCH_A), ("extra.patch", b"x")]) != base
    assert _key([("0002-a.patch", PATCH_A)]) != base
    assert _key([("0001-a.patch", PATCH_A)], fragment=FRAGMENT + b"CONFIG_X=y\n") != base
    assert _key([("0001-a.patch", PATCH_A)], version="v2") != base
    assert cache_key("reference-6.1", "v1", [("0001-a.patch", PATCH_A)], FRAGMENT) != base


def test_cache_key_is_not_fooled_by_concatenation() -> None:
    assert _key([("a", b"bc")]) != _key([("ab", b"c")])
    assert _key([("p", b"x"), ("q", b"")]) != _key([("p", b"xq")])


def test_unknown_flavor_message_names_valid_flavors() -> None:
    with pytest.raises(UnknownFlavorError) as info:
        get_flavor("reference-9.9")
    message = str(info.value)
    assert "\n" not in message
    assert "reference-9.9" in message
    for name in FLAVORS:
        assert name in message
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, KernelBuildError)


def test_build_kernel_rejects_unknown_flavor_before_doing_anything(tmp_path: Path) -> None:
    with pytest.raises(UnknownFlavorError):
        kernelbuild.build_kernel("nope", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_unknown_flavor_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert kernelbuild.main(["nope", "--cache-dir", "/nonexistent"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "valid flavors" in err


def test_flavor_table_points_at_repo_files() -> None:
    for flavor in FLAVORS.values():
        assert flavor.fragment.is_file(), flavor.fragment
        patches = series_patches(flavor)
        assert patches, flavor.patch_dir
        assert [p.name for p in patches] == sorted(p.name for p in patches)


def test_parse_fragment() -> None:
    text = '# comment\n\nCONFIG_A=y\nCONFIG_B="str"\n# CONFIG_C is not set\nCONFIG_D=0x10\n'
    assert parse_fragment(text) == {
        "CONFIG_A": "y",
        "CONFIG_B": '"str"',
        "CONFIG_C": None,
        "CONFIG_D": "0x10",
    }
    with pytest.raises(ValueError):
        parse_fragment("CONFIG_A y\n")


def test_check_config_accepts_matching_config() -> None:
    fragment = "CONFIG_A=y\nCONFIG_N=8\n# CONFIG_B is not set\n# CONFIG_C is not set\n"
    config = "CONFIG_A=y\nCONFIG_N=8\n# CONFIG_B is not set\nCONFIG_OTHER=y\n"
    assert check_config(fragment, config) == []


def test_check_config_detects_missing_and_wrong_options() -> None:
    fragment = "CONFIG_A=y\nCONFIG_TRACK_CR3=y\nCONFIG_N=8\n# CONFIG_B is not set\n"
    config = "CONFIG_A=y\n# CONFIG_TRACK_CR3 is not set\nCONFIG_N=2\nCONFIG_B=y\n"
    problems = check_config(fragment, config)
    assert len(problems) == 3
    joined = "\n".join(problems)
    assert "CONFIG_TRACK_CR3=y requested, is unset" in joined
    assert "CONFIG_N=8 requested, is CONFIG_N=2" in joined
    assert "CONFIG_B should be unset, is CONFIG_B=y" in joined


def test_check_config_detects_option_absent_from_config() -> None:
    assert check_config("CONFIG_GONE=y\n", "CONFIG_A=y\n") == ["CONFIG_GONE=y requested, is unset"]


def test_shipped_fragments_parse() -> None:
    for flavor in FLAVORS.values():
        options = parse_fragment(flavor.fragment.read_text())
        assert options.get("CONFIG_TRACK_CR3") == "y"
        assert "CONFIG_RANDOMIZE_BASE" in options
        assert options["CONFIG_RANDOMIZE_BASE"] is None


def test_kernel_build_error_carries_log_tail() -> None:
    err = KernelBuildError("kernel build failed", ["line 1", "error: boom"])
    assert err.summary == "kernel build failed"
    assert err.log_tail == ["line 1", "error: boom"]
    assert str(err).splitlines()[0] == "kernel build failed"
    assert "error: boom" in str(err)


def test_sources_list_for_suites() -> None:
    sid = kernelbuild._sources_list("sid")
    assert sid.count("\n") == 1 and " sid main" in sid
    bookworm = kernelbuild._sources_list("bookworm")
    assert " bookworm main" in bookworm
    assert " bookworm-updates main" in bookworm
    assert " bookworm-security main" in bookworm
