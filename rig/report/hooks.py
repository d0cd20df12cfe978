"""What the pytest plugin's hooks do for reports: traces and timelines of failing tests,
provenance properties for JUnit XML, the session report at the end, pytest-html extras.

Each function takes what the hook has (the item, its guest if any) so plugin.py stays a
list of thin hooks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rig.errors import RigError
from rig.guest import Guest, GuestConfig
from rig.machine.sites import SIGNAL, find_sites
from rig.observe.findings import Finding, FindingsFailure
from rig.report.bootfault import BootFault
from rig.report.provenance import guest_provenance, planned_provenance, qemu_version
from rig.report.session import TraceFiles, boot_fault_summary, session_report, write_index, write_traces
from rig.transport.host import Host

#: The signal stores of each vmlinux seen, by path and mtime (marked on the timelines).
_STORE_SITES: dict[tuple[Path, int], dict[int, str]] = {}


def store_sites(guest: Guest) -> dict[int, str]:
    """Address -> ``kernel_cr3_loaded`` for each signal store of ``guest``'s kernel (found
    in its vmlinux by :func:`rig.machine.sites.find_sites`, once per vmlinux); empty
    without a vmlinux, without the signal, or if objdump fails."""
    vmlinux = guest.config.vmlinux
    if vmlinux is None or SIGNAL not in guest.symbols:
        return {}
    try:
        key = (vmlinux, vmlinux.stat().st_mtime_ns)
        if key not in _STORE_SITES:
            found = find_sites(vmlinux, guest.symbols, SIGNAL)
            _STORE_SITES[key] = {s.address: SIGNAL for s in found if s.kind == "signal-store"}
        return _STORE_SITES[key]
    except (OSError, RigError):
        return {}


def _safe_name(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid)[-120:]


@dataclass
class _Plan:
    """What the session's guests will boot, as far as known before a boot."""

    config: GuestConfig
    host: Host
    resolved: bool
    qemu_version: str = ""
    provenance: dict[str, str] | None = None


_PLAN_KEY = pytest.StashKey[_Plan]()


def start_session(config: pytest.Config, host: Host, plan: GuestConfig, *, resolved: bool) -> None:
    """Note what will boot (``plan``, from the options, before the kernel is built or
    found; ``resolved`` if its files are already known): the provenance of a testcase
    that runs before any boot, or without a guest, comes from it."""
    config.stash[_PLAN_KEY] = _Plan(plan, host, resolved=resolved)


def settings_resolved(config: pytest.Config, base: GuestConfig) -> None:
    """The options resolved (the kernel built or found): refine the planned provenance."""
    plan = config.stash.get(_PLAN_KEY, None)
    if plan is not None:
        plan.config, plan.resolved, plan.provenance = base, True, None


def session_provenance(config: pytest.Config) -> dict[str, str] | None:
    """The provenance known before any boot (computed once, again once the options are
    resolved; ``qemu --version`` runs once a session); None outside a cr3rig session."""
    plan = config.stash.get(_PLAN_KEY, None)
    if plan is None:
        return None
    if plan.provenance is None:
        if not plan.qemu_version:
            plan.qemu_version = qemu_version(plan.host, plan.config.qemu)
        plan.provenance = planned_provenance(plan.config, plan.qemu_version, resolved=plan.resolved)
        session_report(config).planned = dict(plan.provenance)
    return plan.provenance


def add_junit_properties(item: pytest.Item, guest: Guest | None) -> None:
    """Give ``item`` the provenance of its guest, else of the session's last guest, else
    what the options say will boot, as ``user_properties``: ``pytest --junitxml`` writes
    them as ``<property>`` elements, for every testcase (skipped ones too)."""
    report = session_report(item.config)
    if guest is not None and guest.release:
        report.add_provenance(item.nodeid, guest_provenance(guest))
        prov = report.provenances[report.records[item.nodeid].provenance or 0]
    elif report.provenances:
        prov = report.provenances[-1]
    else:
        planned = session_provenance(item.config)
        if planned is None:
            return
        prov = planned
    have = {name for name, _ in item.user_properties}
    item.user_properties.extend((k, v) for k, v in prov.items() if k not in have)


def boot_fault(config: pytest.Config, fault: BootFault) -> None:
    """Note a boot fault of the guest pool; the testcase whose guest was booting gets it
    at its next phase report (:func:`record_phase`)."""
    session_report(config).pending_boot_faults.append(fault.to_json())


def _take_boot_faults(item: pytest.Item) -> None:
    """Give ``item`` the boot faults noted since the last phase report: in the session
    report and as the JUnit property ``cr3rig.boot_faults`` (JSON: a list of
    :meth:`BootFault.to_json`, console tail and RIP included)."""
    session = session_report(item.config)
    if not session.pending_boot_faults:
        return
    rec = session.record(item.nodeid)
    rec.boot_faults.extend(session.pending_boot_faults)
    session.pending_boot_faults = []
    item.user_properties[:] = [(k, v) for k, v in item.user_properties if k != "cr3rig.boot_faults"]
    item.user_properties.append(("cr3rig.boot_faults", json.dumps(rec.boot_faults)))


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def record_phase(
    item: pytest.Item, call: pytest.CallInfo[Any], report: pytest.TestReport, guest: Guest | None
) -> list[TraceFiles]:
    """Fold a phase report into the session report; for a failed call also write every
    trace of the test (JSON Lines + timeline HTML) and return the files written."""
    session = session_report(item.config)
    _take_boot_faults(item)
    failure = ""
    message = ""
    findings: tuple[Finding, ...] = ()
    if call.excinfo is not None:
        failure = str(call.excinfo.value)
        if isinstance(call.excinfo.value, FindingsFailure):
            findings = call.excinfo.value.findings
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
            guest.traces,
            directory,
            _safe_name(item.nodeid),
            title=item.nodeid,
            failure=failure,
            findings=findings,
            store_sites=store_sites(guest),
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
        if getattr(getattr(tr, "_tw", None), "width_of_current_line", 0):
            tr.write("\n")  # -q leaves its progress line open until after this hook
        for line in boot_fault_summary(report):
            tr.write_line(f"cr3rig: {line}")
        tr.write_line(f"cr3rig: session report {path}")
    return path
