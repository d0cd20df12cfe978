"""pytest's JUnit XML, read once for every tool (mutant runner, soak, container matrix).

One :class:`Case` per test id: the worst outcome of its phases (a failure in the call
and an error in the teardown is a failure), the one-line messages of its failures and
errors, its time, and its ``user_properties`` (what the rig's plugin records: the
kernel and QEMU, ``cr3rig.failure``, ``cr3rig.rules``, ``cr3rig.discarded``, effort).
"""

from __future__ import annotations

import enum
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from rig.observe.findings import FailureKind, SkipKind

__all__ = ["SKIP_KIND", "Case", "Outcome", "read_junit", "test_id"]

#: The property naming a typed skip's :class:`~rig.observe.findings.SkipKind`.
SKIP_KIND = "cr3rig.skip"


class Outcome(enum.Enum):
    """How one testcase ended, as recorded in JUnit XML."""

    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"
    SKIPPED = "skipped"


_SEVERITY = {Outcome.PASSED: 0, Outcome.SKIPPED: 1, Outcome.ERROR: 2, Outcome.FAILED: 3}
_TAGS = {"failure": Outcome.FAILED, "error": Outcome.ERROR, "skipped": Outcome.SKIPPED}


@dataclass
class Case:
    """One testcase: ``id`` (``testcases/test_x.py::test_y[p]``), worst ``outcome``, the
    one-line ``messages`` of its failures/errors (or its skip reason), ``seconds``, and
    ``properties`` (the last value of each name)."""

    id: str
    outcome: Outcome = Outcome.PASSED
    messages: list[str] = field(default_factory=list)
    seconds: float = 0.0
    properties: dict[str, str] = field(default_factory=dict)
    #: the message of the phase that set :attr:`outcome` (the first of the worst)
    outcome_message: str = ""

    @property
    def message(self) -> str:
        """The messages, one a line."""
        return "\n".join(self.messages)

    @property
    def failure_kind(self) -> FailureKind | None:
        """What made it fail (the plugin's ``cr3rig.failure``); None if it passed or
        skipped. A failure the plugin did not classify (a collection error, a crash of
        pytest itself) is a rig error."""
        if self.outcome not in (Outcome.FAILED, Outcome.ERROR):
            return None
        try:
            return FailureKind(self.properties.get("cr3rig.failure", FailureKind.RIG_ERROR.value))
        except ValueError:
            return FailureKind.RIG_ERROR

    @property
    def skip_kind(self) -> SkipKind | None:
        """Why it skipped, where the testcase said so in a typed way (:data:`SKIP_KIND`);
        None if it did not skip or gave no kind."""
        if self.outcome is not Outcome.SKIPPED:
            return None
        try:
            return SkipKind(self.properties[SKIP_KIND])
        except (KeyError, ValueError):
            return None


def test_id(classname: str, name: str) -> str:
    """``testcases.test_x`` + ``test_y[p]`` -> ``testcases/test_x.py::test_y[p]``.

    A class in the classname (``testcases.test_x.TestZ``) is kept as ``::TestZ`` when its
    first letter is upper case.
    """
    if not classname:
        return name
    parts = classname.split(".")
    classes: list[str] = []
    while len(parts) > 1 and parts[-1][:1].isupper():
        classes.insert(0, parts.pop())
    return "::".join(["/".join(parts) + ".py", *classes, name])


test_id.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def read_junit(source: str | Path) -> dict[str, Case]:
    """The testcases of a pytest JUnit XML report (a path, or the XML text), by id.

    Raises:
        ValueError: the XML cannot be read or parsed.
    """
    try:
        root = ET.parse(source).getroot() if isinstance(source, Path) else ET.fromstring(source)
    except (ET.ParseError, OSError) as e:
        raise ValueError(f"unreadable JUnit XML: {e}") from None
    cases: dict[str, Case] = {}
    for tc in root.iter("testcase"):
        if tc.get("name") is None:
            continue  # the test pytest.exit() ended: pytest writes a nameless, empty entry for it
        tid = test_id(tc.get("classname", ""), tc.get("name", "?"))
        case = cases.setdefault(tid, Case(tid))
        case.seconds += float(tc.get("time", "0") or 0)
        for p in tc.iter("property"):
            case.properties[p.get("name", "")] = p.get("value") or ""
        for child in tc:
            outcome = _TAGS.get(child.tag)
            if outcome is None:
                continue
            # the one-line message, not the traceback (whose console tail may say anything)
            text = (child.text or "").strip()
            message = child.get("message") or (text.splitlines()[0] if text else "")
            if outcome is Outcome.SKIPPED:
                message = message.removeprefix("Skipped: ")
            if _SEVERITY[outcome] > _SEVERITY[case.outcome]:
                case.outcome = outcome
                case.outcome_message = message
            case.messages.append(message)
    return cases
