"""What the pytest plugin's hooks do for reports: traces and timelines of failing tests,
provenance properties for JUnit XML, the session report at the end, pytest-html extras.

Each function takes what the hook has (the item, its guest if any) so plugin.py stays a
list of thin hooks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from rig.guest import Guest
from rig.report.provenance import guest_provenance
from rig.report.session import TraceFiles, session_report, write_index, write_traces


def _safe_name(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid)[-120:]


def add_junit_properties(item: pytest.Item, guest: Guest | None) -> None:
    """Give ``item`` the provenance of its guest (else of the session's last guest) as
    ``user_properties``: ``pytest --junitxml`` writes them as ``<property>`` elements."""
    report = session_report(item.config)
    if guest is not None and guest.release:
        report.add_provenance(item.nodeid, guest_provenance(guest))
        prov = report.provenances[report.records[item.nodeid].provenance or 0]
    elif report.provenances:
        prov = report.provenances[-1]
    else:
        return
    have = {name for name, _ in item.user_properties}
    item.user_properties.extend((k, v) for k, v in prov.items() if k not in have)


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def record_phase(
    item: pytest.Item, call: pytest.CallInfo[Any], report: pytest.TestReport, guest: Guest | None
) -> list[TraceFiles]:
    """Fold a phase report into the session report; for a failed call also write every
    trace of the test (JSON Lines + timeline HTML) and return the files written."""
    session = session_report(item.config)
    failure = ""
    message = ""
    if call.excinfo is not None:
        failure = str(call.excinfo.value)
        if report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        else:
            message = _first_line(failure) or call.excinfo.typename
    session.add_phase(report, message)
    if report.when != "call" or not report.failed or guest is None or not guest.traces:
        return []
    directory = session.directory or Path("results")
    try:
        files = write_traces(
            guest.traces, directory, _safe_name(item.nodeid), title=item.nodeid, failure=failure
        )
    except OSError as exc:
        report.sections.append(("cr3rig traces not written", str(exc)))
        return []
    session.record(item.nodeid).traces.extend(files)
    _pytest_html_links(item, report, files)
    return files


def _pytest_html_links(item: pytest.Item, report: pytest.TestReport, files: list[TraceFiles]) -> None:
    """With pytest-html installed, link each timeline from its report too (optional extra)."""
    if not item.config.pluginmanager.hasplugin("html"):
        return
    try:
        import pytest_html.extras as extras_mod  # type: ignore[import-not-found]
    except ImportError:
        return
    extras = list(getattr(report, "extras", []))
    for n, f in enumerate(files):
        extras.append(extras_mod.url(f.html.resolve().as_uri(), name=f"cr3rig timeline {n}"))
    report.extras = extras  # type: ignore[attr-defined]


def finish_session(session: pytest.Session, exitstatus: int) -> Path | None:
    """Write ``index.html`` if this session used the rig; return its path."""
    report = session_report(session.config)
    if report.directory is None:
        return None
    try:
        path = write_index(report, report.directory, exit_status=int(exitstatus))
    except OSError:
        return None
    tr = session.config.pluginmanager.getplugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"cr3rig: session report {path}")
    return path
