"""pytest-xdist (``pytest -n N``): one guest per worker, one report for the whole run.

Roles (:func:`role`): without xdist the plugin works as it always did. Under xdist
the *controller* runs no test; each *worker* is a full pytest session with its own
session fixtures (its own :class:`~rig.pytestplugin.pool.GuestPool`, so its own guest
and QEMU private directory, made by ``mkdtemp``).

* A worker writes nothing that is the run's: no ``index.html``, no ``site-coverage.md``,
  no coverage verdict. At its end it sends what it collected (:func:`worker_payload`:
  its testcases with their traces and guests, its site coverage, its exploration
  tables, whether it deselected anything, a fatal boot failure) in
  ``config.workeroutput``.
* The controller records every test report as it arrives
  (:meth:`ControllerHooks.pytest_runtest_logreport`), folds each worker's payload in
  when that worker goes down (``pytest_testnodedown``), and at the end writes the
  session report and the coverage table of the whole run, and judges
  ``--site-coverage require`` on it (plugin.py's summary and sessionfinish hooks read
  :func:`aggregate`).
* Boot failures are shared through a directory of the run (made by the controller,
  passed to the workers in ``workerinput``): a configuration that failed on one worker
  is not booted by another. If the default configuration cannot boot, the worker that
  saw it errors that test and stops (``session.shouldstop``); xdist then stops handing
  out tests, the other worker finishes the tests it already holds (each errors at once
  with the remembered line if it needs a new boot), and the controller ends the run
  with status 3 and the console tail, as a run without xdist does. Anything else that
  ends a plain run with ``pytest.exit`` (status 4) goes the same way (:func:`end_run`):
  ``pytest.exit`` inside a worker would crash xdist's controller.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from rig.errors import RigError
from rig.machine.sites import Site
from rig.observe.coverage import SiteCoverage
from rig.report.session import session_report

#: The key of this plugin's data in ``workerinput`` / ``workeroutput``.
WIRE_KEY = "cr3rig"

Role = Literal["worker", "controller", "single"]


def role(config: pytest.Config) -> Role:
    """``worker`` inside an xdist worker, ``controller`` in the process that drives the
    workers, ``single`` for a plain pytest run (and ``-n 0``)."""
    if hasattr(config, "workerinput"):
        return "worker"
    if config.pluginmanager.has_plugin("dsession") or (
        config.getoption("dist", "no") != "no" and config.getoption("tx", None)
    ):
        return "controller"  # (xdist's own pytest_configure may not have run yet)
    return "single"


def worker_id(config: pytest.Config) -> str:
    """``gw0``, ``gw1``, ... inside a worker, else ``""``."""
    winput = getattr(config, "workerinput", None)
    return str(winput.get("workerid", "")) if isinstance(winput, dict) else ""


def shared_run_dir(config: pytest.Config) -> Path | None:
    """The run's directory every worker shares (inside a worker), else None: the boot
    failures, and each worker's test groups (:func:`record_groups`)."""
    winput = getattr(config, "workerinput", None)
    if isinstance(winput, dict) and isinstance(winput.get(WIRE_KEY), dict):
        path = winput[WIRE_KEY].get("boot_failures")
        return Path(path) if path else None
    return None


def use_run_temp_dir(config: pytest.Config) -> None:
    """Inside a worker: make its temporary directories (QEMU's private directories among
    them) inside the run's directory, which the controller removes at its end. A worker
    that xdist kills in the middle of its cleanup (the controller's teardown does, after
    a timeout) then leaves no directory behind; its QEMU dies with it (``setpriv
    --pdeathsig``, rig.transport.host)."""
    shared = shared_run_dir(config)
    if shared is None:
        return
    mine = shared / f"tmp-{worker_id(config) or os.getpid()}"
    mine.mkdir(mode=0o700, exist_ok=True)
    tempfile.tempdir = str(mine)


# --- site coverage as plain data -------------------------------------------------------


def coverage_to_wire(cov: SiteCoverage) -> dict[str, Any]:
    """``cov`` as lists, dicts and scalars (what execnet can send)."""
    return {
        "kernel": cov.kernel,
        "has_signal": cov.has_signal,
        "pti": cov.pti,
        "sites": [[s.address, s.kind, s.function, s.where, s.insn, s.value] for s in cov.sites],
        "executed_by": [[a, list(who)] for a, who in cov.executed_by.items()],
    }


def coverage_from_wire(data: Mapping[str, Any]) -> SiteCoverage:
    """The :class:`SiteCoverage` that :func:`coverage_to_wire` sent."""
    sites = [
        Site(int(a), kind, str(fn), str(where), str(insn), None if v is None else int(v))
        for a, kind, fn, where, insn, v in data["sites"]
    ]
    cov = SiteCoverage(str(data["kernel"]), sites, bool(data["has_signal"]), pti=bool(data["pti"]))
    for address, who in data["executed_by"]:
        for test in who:
            cov.record(str(test), [int(address)])
    return cov


def merge_coverage(into: SiteCoverage | None, other: SiteCoverage) -> SiteCoverage:
    """The union of two workers' coverage of one kernel: a site is executed if either
    worker executed it; PTI reached the sites if it ran on either worker's guest."""
    if into is None:
        return other
    into.pti = into.pti or other.pti
    for address, who in other.executed_by.items():
        for test in who:
            into.record(test, [address])
    return into


# --- the worker's side -----------------------------------------------------------------


@dataclass
class WorkerState:
    """What a worker must tell the controller beyond the test reports."""

    fatal: dict[str, str] | None = None  # the run must end: line, returncode, console tail


WORKER_KEY = pytest.StashKey[WorkerState]()


def worker_state(config: pytest.Config) -> WorkerState:
    """This worker's state (created on first use)."""
    if WORKER_KEY not in config.stash:
        config.stash[WORKER_KEY] = WorkerState()
    return config.stash[WORKER_KEY]


class RunEnded(RigError):
    """Raised in a worker where a run without xdist would end with :func:`pytest.exit`
    (bad input found late, a kernel that cannot be had): the test errors with it."""


def end_run(session: pytest.Session, line: str, returncode: int, console_tail: str, *, tell: bool) -> None:
    """End the run from a worker: it stops after its current test (xdist then hands out
    no more tests and stops the others), and, if ``tell``, the controller learns the
    line, status and console tail (``tell`` is False for a boot failure another worker
    saw first: that worker tells it)."""
    if tell:
        worker_state(session.config).fatal = {
            "line": line,
            "returncode": str(returncode),
            "console_tail": console_tail,
        }
    session.shouldstop = line


def worker_payload(
    config: pytest.Config,
    coverage: SiteCoverage | None,
    explorations: Sequence[str],
    deselected: bool,
    host_summary: str | None,
) -> dict[str, Any]:
    """What a worker sends at its end (plain data), and puts it in ``workeroutput``."""
    report = session_report(config)
    payload: dict[str, Any] = {
        "directory": None if report.directory is None else str(report.directory),
        "started": report.started,
        "records": report.to_wire(),
        "coverage": None if coverage is None else coverage_to_wire(coverage),
        "explorations": list(explorations),
        "deselected": deselected,
        "host_summary": host_summary,
        "fatal": worker_state(config).fatal,
    }
    config.workeroutput[WIRE_KEY] = payload  # type: ignore[attr-defined]
    return payload


# --- the controller's side -------------------------------------------------------------


@dataclass
class Aggregate:
    """The whole run as the controller sees it once the workers have reported."""

    coverage: SiteCoverage | None = None
    explorations: list[str] = field(default_factory=list)
    deselected: bool = False
    host_summaries: list[str] = field(default_factory=list)
    fatal: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (worker, failure)
    lost: list[str] = field(default_factory=list)  # workers that went down without a payload
    boot_failures: Path | None = None


AGGREGATE_KEY = pytest.StashKey[Aggregate]()


def aggregate(config: pytest.Config) -> Aggregate | None:
    """The controller's aggregate (None outside the controller)."""
    return config.stash.get(AGGREGATE_KEY, None)


def absorb(config: pytest.Config, worker: str, payload: Mapping[str, Any] | None) -> None:
    """Fold one worker's payload into the run's report and aggregate."""
    agg = aggregate(config)
    assert agg is not None
    if payload is None:
        agg.lost.append(worker)
        return
    report = session_report(config)
    if payload["directory"] is not None:
        report.directory = Path(payload["directory"])
        report.started = min(report.started, float(payload["started"]))
    report.absorb(payload["records"], worker)
    if payload["coverage"] is not None:
        agg.coverage = merge_coverage(agg.coverage, coverage_from_wire(payload["coverage"]))
    agg.explorations.extend(payload["explorations"])
    agg.deselected = agg.deselected or bool(payload["deselected"])
    if payload["host_summary"]:
        agg.host_summaries.append(f"[{worker}] {payload['host_summary']}")
    if payload["fatal"]:
        agg.fatal.append((worker, dict(payload["fatal"])))


def _message(report: pytest.TestReport) -> str:
    """The first line of why a phase failed or skipped (the worker's own is better; this
    one stands if the worker never reports)."""
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    crash = getattr(report.longrepr, "reprcrash", None)
    text = str(crash.message) if crash is not None else report.longreprtext
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


class ControllerHooks:
    """The controller's hooks (registered by plugin.py only in the controller)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.agg = Aggregate(boot_failures=Path(tempfile.mkdtemp(prefix="cr3rig-run-")))
        config.stash[AGGREGATE_KEY] = self.agg
        config.add_cleanup(self.remove_run_dir)

    def remove_run_dir(self) -> None:
        if self.agg.boot_failures is not None:
            shutil.rmtree(self.agg.boot_failures, ignore_errors=True)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """``-n N`` (``--dist load``, given or implied): :class:`CmdlineScheduling`."""
        if config.getvalue("dist") != "load" or self.agg.boot_failures is None:
            return None
        return make_cmdline_scheduling(config, log, self.agg.boot_failures)

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[WIRE_KEY] = {"boot_failures": str(self.agg.boot_failures)}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        rep = session_report(self.config)
        message = _message(report) if (report.failed or report.skipped) else ""
        rep.add_phase(report, message)
        node = getattr(report, "node", None)
        gateway = getattr(node, "gateway", None)
        if gateway is not None:
            rep.record(report.nodeid).worker = str(gateway.id)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object | None) -> None:
        output = getattr(node, "workeroutput", None)
        payload = output.get(WIRE_KEY) if isinstance(output, dict) else None
        absorb(self.config, str(node.gateway.id), payload)


def fatal_console_tail(agg: Aggregate) -> str:
    """The console tail of the first default-configuration boot that failed ("" if none)."""
    return next((f.get("console_tail", "") for _, f in agg.fatal if f.get("console_tail")), "")


#: A worker's map from the node ids it collected to their group (in the run directory).
GROUPS_FILE = "groups-{worker}.json"


def group_name(extra: str, isolate: bool) -> str:
    """The group of the tests booted with kernel parameters ``extra``."""
    return f"cmdline:{extra or '-'}{'' if isolate else ':no-isolation'}"


def record_groups(config: pytest.Config, groups: Mapping[str, str]) -> None:
    """In a worker: write its tests' groups (node id to :func:`group_name`) to the run
    directory, for :class:`CmdlineScheduling`. Written before the worker reports its
    collection, so the controller, which schedules once every worker reported, finds
    every file."""
    run_dir = shared_run_dir(config)
    if run_dir is not None:
        path = run_dir / GROUPS_FILE.format(worker=worker_id(config))
        path.write_text(json.dumps(dict(groups)))


def make_cmdline_scheduling(config: pytest.Config, log: Any, run_dir: Path) -> Any:
    """The scheduler of ``-n N``: xdist's ``loadscope`` whose scopes are the kernel
    command lines. Each test of the default command line is a scope of its own (spread
    as ``load`` spreads them); the tests of each other command line are one scope, run
    by one worker, which boots it once (``load`` sent them to every worker, and each
    booted it: 2.5-3 s a boot here). (xdist's own ``loadgroup`` reads a group from the
    node id, which pytest 9.2 no longer lets it change: pytest-xdist issue 1386.)"""
    from xdist.scheduler import LoadScopeScheduling

    class CmdlineScheduling(LoadScopeScheduling):  # type: ignore[misc]
        _groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._groups is None:
                self._groups = {}
                for path in sorted(run_dir.glob(GROUPS_FILE.format(worker="*"))):
                    self._groups.update(json.loads(path.read_text()))
            return self._groups.get(nodeid, nodeid)

    return CmdlineScheduling(config, log)
