"""What the testcases read besides their guest: their own options, and typed skips.

A pytest plugin of its own (entry point ``cr3rig-cases``, beside ``cr3rig``), so that no
testcase reads an environment variable:

* ``--watch-transitions N``: how many CR3 transitions the watch testcases check (default:
  each testcase's own, ``WATCH_TRANSITIONS`` / ``PLUGIN_TRANSITIONS``);
* ``--selftests default|all|NAME,NAME``: which x86 selftests run under watch mode;
* ``--selftest-seconds S``: how long one selftest may take under watch mode.

The testcases read them through :class:`CaseSettings` (the ``case_settings`` fixture, or
:func:`case_settings_of` at collection).

A skip a tool must tell apart (the container matrix: which skips a kernel kind may give)
is recorded with its :class:`~rig.observe.findings.SkipKind` as the JUnit property
``cr3rig.skip`` (:func:`note_skip`, :func:`skip`): the matrix reads that, never the
reason's text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

import pytest

from rig.observe.findings import SkipKind
from rig.report.junit import SKIP_KIND
from rig.supply.selftests import WATCH_SECONDS

__all__ = ["CaseSettings", "case_settings_of", "note_skip", "skip"]

#: Default of ``--selftest-seconds``.
SELFTEST_SECONDS = 120.0


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("cr3rig", "cr3rig: boot a kernel under QEMU and single-step its entry code")
    g.addoption(
        "--watch-transitions",
        default=None,
        type=int,
        help="CR3 transitions the watch testcases check (default: each testcase's own; "
        "test_cr3_watch.py 1000, test_cr3_watch_plugin.py 20000)",
    )
    g.addoption(
        "--selftests",
        default="default",
        help="x86 selftests run under watch mode: 'default' (the default subset), 'all' (every one "
        "that runs here; pass an initramfs that holds them), or NAME,NAME",
    )
    g.addoption(
        "--selftest-seconds",
        default=None,
        type=float,
        help=f"seconds every selftest may take under watch mode (default {SELFTEST_SECONDS:g}, "
        "more for the slow ones: rig.supply.selftests.WATCH_SECONDS)",
    )


@dataclass(frozen=True)
class CaseSettings:
    """The testcases' own options, parsed."""

    #: CR3 transitions a watch testcase checks; None: the testcase's default
    watch_transitions: int | None = None
    #: ``default``, ``all`` or a comma-separated list of selftest names
    selftests: str = "default"
    #: seconds every selftest may take; None: :meth:`seconds_for` decides per selftest
    selftest_seconds: float | None = None

    def seconds_for(self, name: str) -> float:
        """How long selftest ``name`` may run under watch mode: the option if given, else
        :data:`SELFTEST_SECONDS` or the selftest's own larger budget (``WATCH_SECONDS``)."""
        if self.selftest_seconds is not None:
            return self.selftest_seconds
        return max(SELFTEST_SECONDS, WATCH_SECONDS.get(name, 0.0))

    def transitions(self, default: int) -> int:
        """:attr:`watch_transitions`, or ``default`` when the option was not given."""
        return default if self.watch_transitions is None else self.watch_transitions


def case_settings_of(config: pytest.Config) -> CaseSettings:
    """The testcases' options of this session (also at collection, before any fixture)."""
    opt = config.option
    return CaseSettings(
        getattr(opt, "watch_transitions", None),
        str(getattr(opt, "selftests", "default") or "default").strip(),
        None if getattr(opt, "selftest_seconds", None) is None else float(opt.selftest_seconds),
    )


@pytest.fixture(scope="session")
def case_settings(pytestconfig: pytest.Config) -> CaseSettings:
    """The testcases' own options (:class:`CaseSettings`)."""
    return case_settings_of(pytestconfig)


def note_skip(node: pytest.Item, kind: SkipKind) -> None:
    """Record that ``node`` skips (if it does) for a reason of ``kind``: the JUnit property
    ``cr3rig.skip``. For a skip raised elsewhere (the plugin's ``missing_on_reference``)."""
    node.user_properties.append((SKIP_KIND, kind.value))


def skip(node: pytest.Item, kind: SkipKind, reason: str) -> NoReturn:
    """Skip ``node`` for ``reason``, recording its ``kind`` (:func:`note_skip`).

    Raises:
        pytest.skip.Exception: always.
    """
    note_skip(node, kind)
    pytest.skip(reason)
