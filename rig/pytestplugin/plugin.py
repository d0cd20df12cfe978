"""The cr3rig pytest plugin: its hooks and fixtures, and failure reports. The options
(one ``cr3rig`` group) are :mod:`rig.pytestplugin.options`, the resolved settings
:mod:`rig.pytestplugin.settings`, the guest pool :mod:`rig.pytestplugin.pool`.

Fixtures:

* ``rig_settings`` (session): the parsed options, the resolved kernel and initramfs.
* ``guest_pool`` (session): boots a guest once per distinct kernel command line and
  keeps at most one alive (a second command line closes the first); a boot fault is
  booted once more.
* ``guest`` (function): the default guest, its traces cleared for the test.
* ``pti_guest`` (function): the default guest, skipping the test if PTI is off.

On failure the report gets sections with the step trace (also written as JSON lines and
as a timeline page, rig.report.timeline), the console tail, every vCPU's registers and
the exact kernel and QEMU. Every testcase carries the provenance as JUnit properties; a
session that used the rig ends by writing ``<trace-dir>/index.html`` (rig.report.session).

Under pytest-xdist (``-n N``) each worker has its own session fixtures (its own guest);
the controller writes the report and the coverage table of the whole run
(rig.pytestplugin.distributed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rig.diagnosis import diagnose
from rig.errors import RigError
from rig.guest import Effort, Guest
from rig.machine.sites import SIGNAL
from rig.observe.coverage import SiteCoverage
from rig.observe.findings import FindingsFailure, failure_kind
from rig.pytestplugin import distributed
from rig.pytestplugin.failfast import (
    BootFailed,
    BootFailures,
    breaks_guest,
    kernel_crashed,
    one_line_head,
    one_line_report,
    wants_one_line,
)
from rig.pytestplugin.options import check_options as _check_options
from rig.pytestplugin.options import pytest_addoption
from rig.pytestplugin.pool import GuestPool
from rig.pytestplugin.settings import HOST_KEY as _HOST_KEY
from rig.pytestplugin.settings import (
    PTI_OFF_PARAMETERS,
    EndRun,
    RigSettings,
    missing_on_reference,
    pti_off_asked,
    rig_settings,
)
from rig.pytestplugin.settings import options_config as _options_config
from rig.pytestplugin.settings import run_ender as _run_ender
from rig.report import hooks as report_hooks
from rig.report.bootfault import BootFault
from rig.report.session import add_coverage_table, session_report
from rig.supply.kernel import DEFAULT_KERNEL, is_named_kernel
from rig.transport.host import sigterm_as_ctrl_c

__all__ = [
    "PTI_OFF_PARAMETERS",
    "SIGNAL",
    "EndRun",
    "GuestPool",
    "RigSettings",
    "missing_on_reference",
    "pti_off_asked",
    "pytest_addoption",
    "rig_settings",
]


def pytest_report_header(config: pytest.Config) -> str:
    """Where QEMU runs, which accelerator, and why (the KVM check runs on that host)."""
    host = config.stash.get(_HOST_KEY, None)
    if host is None:
        return "cr3rig: QEMU on local"
    if config.option.accel == "kvm":
        return f"cr3rig: QEMU on {host.label}, accel kvm (-cpu host; KVM checked there)"
    try:
        why = host.kvm_usable(config.option.qemu)
    except RigError as exc:
        why = str(exc)
    note = f"KVM not usable there: {why}" if why else "KVM is usable there: pass --accel kvm"
    return f"cr3rig: QEMU on {host.label}, accel tcg ({note})"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cmdline(extra, isolate=True): boot the guest with extra kernel parameters; "
        "isolate=False leaves out the rig's nohz_full/isolcpus",
    )
    _check_options(config)
    opt = config.option
    spec = str(opt.kernel or "")
    named = is_named_kernel(spec)  # built or fetched on first use
    plan = _options_config(
        opt,
        kernel=Path() if named else Path(spec).expanduser(),
        initrd=Path(),
        vmlinux=opt.vmlinux,
        label=(spec or DEFAULT_KERNEL) if named else spec,
    )
    report_hooks.start_session(config, config.stash[_HOST_KEY], plan, resolved=not named)
    distributed.use_run_temp_dir(config)
    if distributed.role(config) == "single":
        # not under xdist: its controller ends the workers with signals of its own, and a
        # KeyboardInterrupt raised there in the middle left their guests running
        sigterm_as_ctrl_c()
    if distributed.role(config) == "controller":
        config.pluginmanager.register(distributed.ControllerHooks(config), "cr3rig-xdist-controller")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group tests by kernel command line (stable), so each is booted once; under xdist
    each other command line than the default is one unit of work for one worker."""

    def key(item: pytest.Item) -> tuple[str, bool]:
        m = item.get_closest_marker("cmdline")
        if m is None:
            return ("", True)
        return (m.args[0] if m.args else "", bool(m.kwargs.get("isolate", True)))

    keys = {it.nodeid: key(it) for it in items}
    items.sort(key=lambda it: (keys[it.nodeid] != ("", True), keys[it.nodeid]))
    if distributed.role(config) == "worker":
        groups = {n: distributed.group_name(*k) for n, k in keys.items() if k != ("", True)}
        distributed.record_groups(config, groups)


@pytest.fixture(scope="session")
def guest_pool(
    rig_settings: RigSettings, pytestconfig: pytest.Config, request: pytest.FixtureRequest
) -> Iterator[GuestPool]:
    def show_console(failed: BootFailed) -> None:
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        capman = pytestconfig.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capman is not None and failed.console_tail:
            with capman.global_and_fixture_disabled():
                reporter.write_sep("-", "cr3rig: console tail of the failed boot")
                reporter.write_line(failed.console_tail)

    def on_boot_fault(fault: BootFault) -> None:
        report_hooks.boot_fault(pytestconfig, fault)

    if distributed.role(pytestconfig) == "worker":
        failures = BootFailures(distributed.shared_run_dir(pytestconfig), distributed.worker_id(pytestconfig))
        pool = GuestPool(rig_settings, None, failures, _run_ender(request), on_boot_fault)
    else:
        pool = GuestPool(rig_settings, show_console, on_boot_fault=on_boot_fault)
    pytestconfig.stash[_POOL_KEY] = pool
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def site_coverage(guest_pool: GuestPool, guest: Guest) -> SiteCoverage | None:
    """The session's CR3 switch-site coverage (None if the kernel has no vmlinux)."""
    return guest_pool.coverage(guest)


@pytest.fixture
def exploration_report(pytestconfig: pytest.Config) -> list[str]:
    """Where testcases put their exploration tables (printed at the end of the session)."""
    return pytestconfig.stash.setdefault(_EXPLORATIONS_KEY, [])


_POOL_KEY = pytest.StashKey[GuestPool]()
_DESELECTED_KEY = pytest.StashKey[bool]()
_EXPLORATIONS_KEY = pytest.StashKey[list[str]]()


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        items[0].config.stash[_DESELECTED_KEY] = True


def _coverage_required(config: pytest.Config, coverage: SiteCoverage) -> bool:
    mode = config.option.site_coverage
    if mode != "auto":
        return bool(mode == "require")
    testcases = (config.rootpath / "testcases").resolve()
    full = [Path(a.split("::")[0]).resolve() for a in config.args] in (
        [testcases],
        [config.rootpath.resolve()],
    )
    return coverage.has_signal and full and not _deselected(config)


def _deselected(config: pytest.Config) -> bool:
    """Whether this run (under xdist: any worker) deselected a test."""
    agg = distributed.aggregate(config)
    return agg.deselected if agg is not None else config.stash.get(_DESELECTED_KEY, False)


def _run_coverage(config: pytest.Config) -> SiteCoverage | None:
    """The switch-site coverage of the run (under xdist: of all workers together)."""
    agg = distributed.aggregate(config)
    if agg is not None:
        return agg.coverage
    pool = config.stash.get(_POOL_KEY, None)
    return pool._coverage if pool is not None else None


def _host_summaries(config: pytest.Config) -> list[str]:
    agg = distributed.aggregate(config)
    if agg is not None:
        return agg.host_summaries
    host = config.stash.get(_HOST_KEY, None)
    line = host.summary() if host is not None else None
    return [line] if line else []


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    for line in _host_summaries(config):
        terminalreporter.write_line(f"cr3rig: {line}")
    agg = distributed.aggregate(config)
    tables = agg.explorations if agg is not None else config.stash.get(_EXPLORATIONS_KEY, [])
    if tables:
        terminalreporter.section("cr3rig: explorations (an NMI at each boundary of each window)")
        for table in tables:
            terminalreporter.write_line(table)
    coverage = _run_coverage(config)
    if coverage is None or config.option.site_coverage == "off":
        return
    terminalreporter.section("cr3rig: CR3 switch-site coverage")
    terminalreporter.write_line(coverage.table())
    missing = coverage.missing()
    if missing and _coverage_required(config, coverage):
        terminalreporter.write_line(
            f"FAILED: {len(missing)} reachable CR3 switch site(s) executed by no testcase: "
            + ", ".join(s.where for s in missing)
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    role = distributed.role(config)
    pool = config.stash.get(_POOL_KEY, None)
    if role == "worker":  # the controller writes the run's files from what workers send
        explorations: list[str] = config.stash.get(_EXPLORATIONS_KEY, [])
        distributed.worker_payload(
            config,
            pool._coverage if pool is not None else None,
            explorations,
            config.stash.get(_DESELECTED_KEY, False),
            next(iter(_host_summaries(config)), None),
        )
        return
    agg = distributed.aggregate(config)
    if agg is not None:
        exitstatus = _finish_controller(session, agg)
    coverage = _run_coverage(config)
    directory = pool.settings.trace_dir if pool is not None else session_report(config).directory
    if coverage is not None and directory is not None and config.option.site_coverage != "off":
        with contextlib.suppress(OSError):
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "site-coverage.md").write_text(coverage.markdown())
        add_coverage_table(config, "CR3 switch sites (who executed each)", coverage.rows())
    if (
        coverage is not None
        and exitstatus == 0
        and coverage.missing()
        and _coverage_required(session.config, coverage)
    ):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    report_hooks.finish_session(session, exitstatus)


def _finish_controller(session: pytest.Session, agg: distributed.Aggregate) -> int:
    """Under xdist: a default configuration that did not boot on a worker ends the run
    with status 3 and its console tail, as without xdist; a worker that went down
    without reporting is named. Returns the exit status."""
    tr = session.config.pluginmanager.getplugin("terminalreporter")
    if tr is not None:
        for worker in agg.lost:
            tr.write_line(f"cr3rig: worker {worker} ended without reporting (its traces are not listed)")
        tail = distributed.fatal_console_tail(agg)
        if tail:  # xdist's "Interrupted: cr3rig: ... cannot boot" line follows
            tr.write_sep("-", "cr3rig: console tail of the failed boot")
            tr.write_line(tail)
    if agg.fatal:
        session.exitstatus = int(agg.fatal[0][1]["returncode"])
    return int(session.exitstatus)


@pytest.fixture
def guest(guest_pool: GuestPool, request: pytest.FixtureRequest) -> Iterator[Guest]:
    """The guest for this test (the ``cmdline`` marker adds kernel parameters)."""
    marker = request.node.get_closest_marker("cmdline")
    g = guest_pool.get(
        marker.args[0] if marker and marker.args else "",
        isolate=bool(marker.kwargs.get("isolate", True)) if marker else True,
    )
    g.traces.clear()
    g.effort = Effort()
    try:
        g.resume()  # a previous test may have left it stopped at a breakpoint
    except RigError:
        g.close()  # not reused by the next test
        raise
    request.node.stash[_GUEST_KEY] = g
    yield g
    coverage = guest_pool.coverage(g)
    if coverage is not None:
        for trace in g.traces:
            coverage.record_trace(request.node.nodeid, trace)
    if request.node.stash.get(_BROKEN_KEY, False):
        g.close()  # a rig error mid-test: the next test gets a fresh guest
    elif g.machine.alive and not g.closed:
        try:
            g.kill_workloads()
        except RigError:
            g.close()  # a guest in an unknown state is not reused


#: Kernel parameters with which the user turns PTI off (a skip of the PTI testcases is theirs).
@pytest.fixture
def pti_guest(guest: Guest, rig_settings: RigSettings) -> Guest:
    """The guest, or a skip saying exactly why PTI testcases cannot run on it (an error
    on a reference kernel whose command line did not turn PTI off)."""
    if not guest.pti_enabled:
        why = (
            f"kernel {guest.release} runs without PTI ("
            + (
                "its entry code is not mapped in the user half of the PGD pair"
                if guest.config.vmlinux
                else "dmesg has no 'page tables isolation: enabled'"
            )
            + f"; cmdline: {guest.config.cmdline()})"
        )
        if pti_off_asked(guest.config.cmdline()):
            pytest.skip(why)
        missing_on_reference(rig_settings, why)
    return guest


_GUEST_KEY = pytest.StashKey[Guest]()
_BROKEN_KEY = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    g = item.stash.get(_GUEST_KEY, None)
    if call.when == "teardown":
        report_hooks.add_junit_properties(item, g)
    outcome: Any = yield
    report = outcome.get_result()
    if report.when == "call" and g is not None:
        # the testcases' retries (breakpoint hits taken, steps of each stepped trace), for the soak
        item.user_properties.append(("cr3rig.breaks", g.effort.breaks))
        item.user_properties.append(("cr3rig.steps", ",".join(map(str, g.effort.steps))))
        item.user_properties.append(("cr3rig.discarded", " | ".join(g.effort.discarded)))
        if g.effort.discarded:
            report.sections.append(
                ("cr3rig discarded tries (each judged first)", "\n".join(g.effort.discarded))
            )
    if report.failed:
        exc = call.excinfo.value if call.excinfo is not None else None
        kind = failure_kind(exc, crashed=kernel_crashed(exc, g))
        item.user_properties.append(("cr3rig.failure", kind.value))
        if isinstance(exc, FindingsFailure):
            rules = sorted({f.rule.value for f in exc.findings})
            item.user_properties.append(("cr3rig.rules", ",".join(rules)))
        if breaks_guest(exc):
            item.stash[_BROKEN_KEY] = True
        if wants_one_line(exc, item.config.option.tbstyle):
            assert exc is not None
            where, lineno, _ = item.location
            head = one_line_head(exc)
            report.longrepr = one_line_report(
                head, diagnose(g, head) if g is not None else "", where, (lineno or 0) + 1
            )
        if isinstance(exc, BootFailed) and exc.console_tail:
            report.sections.append(("cr3rig console tail of the failed boot", exc.console_tail))
    files = report_hooks.record_phase(item, call, report, g)
    if report.when != "call" or not report.failed or g is None:
        return
    for n, trace in enumerate(g.traces):
        where = f"{files[n].jsonl}, timeline {files[n].html}" if n < len(files) else "not written"
        report.sections.append(
            (
                f"cr3rig step trace {n} ({len(trace.snapshots)} steps, vCPU {trace.cpu}; {where})",
                trace.render(80),
            )
        )
    report.sections.append(("cr3rig console tail", g.machine.console_tail(40)))
    report.sections.append(("cr3rig registers", g.registers_report()))
    report.sections.append(("cr3rig kernel and QEMU", g.describe()))
