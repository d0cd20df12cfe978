"""On the reference kernels a missing signal, PTI or site list is an error, not a skip;
skips stay for kernels the user passes and for what the user asked (no guest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rig.guest import GuestConfig
from rig.pytestplugin.settings import RigSettings, missing_on_reference, pti_off_asked
from rig.supply.kernel import is_reference_kernel
from rig.transport.local import LocalHost


def _settings(reference: bool) -> RigSettings:
    base = GuestConfig(kernel=Path("bzImage"), initrd=Path("initrd"), label="reference-7.2")
    return RigSettings(base, Path("results"), LocalHost(), "auto", reference)


def test_the_default_and_the_reference_flavors_are_reference_kernels() -> None:
    assert is_reference_kernel(None) and is_reference_kernel("")
    assert is_reference_kernel("reference-7.2") and is_reference_kernel("reference-6.1")
    assert not is_reference_kernel("debian")
    assert not is_reference_kernel("path/to/bzImage")


def test_a_missing_feature_fails_on_a_reference_kernel() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"the reference kernel reference-7\.2 is broken: no PTI"):
        missing_on_reference(_settings(True), "no PTI")


def test_a_missing_feature_skips_on_a_kernel_the_user_chose() -> None:
    with pytest.raises(pytest.skip.Exception, match=r"^no PTI$"):
        missing_on_reference(_settings(False), "no PTI")


@pytest.mark.parametrize(
    ("cmdline", "asked"),
    [
        ("console=ttyS0 pti=on nohz_full=1", False),
        ("console=ttyS0 nopti nohz_full=1", True),
        ("pti=off", True),
        ("pti=auto", True),
        ("quiet mitigations=off", True),
        ("nopti_x=1", False),
    ],
)
def test_what_turns_pti_off_is_the_users_choice(cmdline: str, asked: bool) -> None:
    assert pti_off_asked(cmdline) is asked


def test_each_selftest_has_its_watch_budget_unless_the_option_sets_one() -> None:
    from rig.pytestplugin.caseoptions import SELFTEST_SECONDS, CaseSettings

    assert CaseSettings().seconds_for("sigreturn_64") == SELFTEST_SECONDS
    assert CaseSettings().seconds_for("ldt_gdt_32") == 600.0  # its whole corpus under watch
    assert CaseSettings(None, "all", 30.0).seconds_for("ldt_gdt_32") == 30.0
